"""One LightningModule per method, all subclasses of :class:`ClassifierModule` (docs/architecture.md)."""

from manynets.lightning_modules.classifier import ClassifierModule
from manynets.lightning_modules.ensemble import CheckpointEnsembleModule
from manynets.lightning_modules.mixmo import MixMoModule
from manynets.lightning_modules.pinet import PiNetModule
from manynets.lightning_modules.probe import ProbeModule
from manynets.lightning_modules.subspaces import SubspaceModule
from manynets.lightning_modules.superposition import SuperpositionModule

__all__ = [
    "CheckpointEnsembleModule",
    "ClassifierModule",
    "MixMoModule",
    "PiNetModule",
    "ProbeModule",
    "SubspaceModule",
    "SuperpositionModule",
]
