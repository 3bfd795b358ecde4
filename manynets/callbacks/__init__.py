from manynets.callbacks.gradient_filter import GradientFilter  # noqa: F401
from manynets.callbacks.receptive_field import ReceptiveField  # noqa: F401
from manynets.callbacks.saturation import Saturation  # noqa: F401
from manynets.callbacks.subspace_sweep import SubspaceSweep  # noqa: F401
from manynets.callbacks.pca_sweep import PCADeltaSweep  # noqa: F401
from manynets.callbacks.feature_kernel import FeatureKernelTransfer  # noqa: F401
from manynets.callbacks.run_checkpoint import RunCheckpoint  # noqa: F401
