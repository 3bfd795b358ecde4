from manynets.layers.binding import HRRBinding, LearnedUnbinding, MBATBinding, SumBinding  # noqa: F401
from manynets.layers.isometry import isometry_regularization  # noqa: F401
from manynets.layers.covariance import StreamingCovariance, intrinsic_dimension, saturation  # noqa: F401
from manynets.layers.pca import PCAProjection, delta_sweep, insert_pca_layers  # noqa: F401
from manynets.layers.subspace import cosine_similarity_squared, set_point, subspace_coefficients, to_subspace  # noqa: F401
