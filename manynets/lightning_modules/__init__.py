"""One LightningModule per method, all subclasses of :class:`ClassifierModule`."""

from manynets.lightning_modules.classifier import ClassifierModule
from manynets.lightning_modules.mixmo import MixMoModule
from manynets.lightning_modules.probe import ProbeModule
from manynets.lightning_modules.superposition import SuperpositionModule

__all__ = ["ClassifierModule", "MixMoModule", "ProbeModule", "SuperpositionModule"]
from manynets.lightning_modules.subspaces import SubspaceModule  # noqa: F401
from manynets.lightning_modules.ensemble import CheckpointEnsembleModule  # noqa: F401
from manynets.lightning_modules.pinet import PiNetModule  # noqa: F401
