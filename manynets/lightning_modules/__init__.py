"""One LightningModule per method, all subclasses of :class:`ClassifierModule`."""

from manynets.lightning_modules.classifier import ClassifierModule
from manynets.lightning_modules.mixmo import MixMoModule

__all__ = ["ClassifierModule", "MixMoModule"]
