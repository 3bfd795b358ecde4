from manynets.layers.binding import HRRBinding, LearnedUnbinding, MBATBinding, SumBinding  # noqa: F401
from manynets.layers.isometry import isometry_regularization  # noqa: F401
from manynets.layers.covariance import StreamingCovariance, intrinsic_dimension, saturation  # noqa: F401
from manynets.layers.pca import PCAProjection  # noqa: F401
from manynets.layers.subspace import cosine_similarity_squared, set_point, subspace_coefficients, to_subspace  # noqa: F401
from manynets.layers.pi_optim import PiSGD, clip_gradients  # noqa: F401
from manynets.layers.pi import InfPiLayer, PiInputLayer  # noqa: F401
from manynets.layers.pi_finite import FinPiLayer, PiReLU  # noqa: F401
