"""Extra passes over a data loader after (or beside) training: PCA fitting and sweeps, probe features.

:func:`each_batch` runs a function on every ``(images, labels)`` batch of a loader, moved to the model's
device, without gradients and with the model in eval mode; the train/eval flag of **every** submodule is
restored afterwards (a frozen backbone in eval mode inside a training module stays so). ``max_batches``
stops early. :func:`prediction` is the default prediction of a manynets module (the mean of member
logits for ensembles); :func:`evaluate` scores it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

Batch = Callable[[torch.Tensor, torch.Tensor], None]


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a module without any)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextmanager
def evaluation(model: nn.Module) -> Iterator[nn.Module]:
    """``no_grad`` and eval mode inside the block; every submodule's mode is restored at its end."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, training in modes:
            module.training = training


def each_batch(model: nn.Module, loader: Iterable, fn: Batch, device: torch.device | str | None = None,
               max_batches: int | None = None) -> int:  # fmt: skip
    """Call ``fn(images, labels)`` on the batches of ``loader`` inside :func:`evaluation` ``(model)``.

    Images and labels are moved to ``device`` (default: the model's). Returns the number of batches run.
    """
    device = device_of(model) if device is None else torch.device(device)
    count = 0
    with evaluation(model):
        for batch in loader:
            if max_batches is not None and count >= max_batches:
                break
            images, labels = batch[0], batch[1]
            fn(images.to(device), labels.to(device))
            count += 1
    return count


def prediction(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The default prediction (B, C) of a manynets module: ``predict_logits`` (its evaluation variant
    ``""``) with members (M, B, C) averaged, as every ensemble of manynets; a plain network: ``model(x)``."""

    def predict(images: torch.Tensor) -> torch.Tensor:
        logits = model.predict_logits(images) if hasattr(model, "predict_logits") else model(images)
        return logits.mean(0) if logits.dim() == 3 else logits

    return predict


def evaluate(model: nn.Module, loader: Iterable, predict: Callable[[torch.Tensor], torch.Tensor] | None = None,
             device: torch.device | str | None = None) -> tuple[float, float]:  # fmt: skip
    """(accuracy, mean cross-entropy in nats) of ``predict`` (default ``model``) over ``loader``, eval mode."""
    predict = predict or model
    totals = {"correct": 0, "loss": 0.0, "n": 0}

    def score(images: torch.Tensor, labels: torch.Tensor) -> None:
        logits = predict(images)
        totals["correct"] += int((logits.argmax(-1) == labels).sum())
        totals["loss"] += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        totals["n"] += len(labels)

    each_batch(model, loader, score, device)
    n = max(totals["n"], 1)
    return totals["correct"] / n, totals["loss"] / n


def train_and_test_loaders(trainer, who: str) -> tuple[Iterable, Iterable]:
    """The training loader and the first test loader of the trainer's data module (set up for both)."""
    dm = trainer.datamodule
    if dm is None:
        raise ValueError(f"{who} needs a data module (its training split and its first test set); "
                         "run it through `manynets` with a data: section.")  # fmt: skip
    dm.setup("fit")
    dm.setup("test")
    tests = dm.test_dataloader()
    return dm.train_dataloader(), tests[0] if isinstance(tests, (list, tuple)) else tests
