"""One LightningModule per method, all subclasses of :class:`ClassifierModule`."""

from manynets.lightning_modules.classifier import ClassifierModule

__all__ = ["ClassifierModule"]
