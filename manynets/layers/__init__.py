from manynets.layers.covariance import StreamingCovariance, intrinsic_dimension, saturation  # noqa: F401
from manynets.layers.pca import PCAProjection, delta_sweep, insert_pca_layers  # noqa: F401
