"""``manynets predict`` writes its predictions: ``<run dir>/predictions.csv``, one row per image.

:class:`PredictionWriter` is Lightning's ``BasePredictionWriter`` (the manynets CLI adds it to ``predict``
unless another prediction writer is configured). The columns (comma-separated, probabilities as
fractions, as every manynets table: :func:`~manynets.analysis.write_csv`):

- ``index``: the image's position in the predict set (the data module's ``predict_dataloader``: its
  test set(s), in order); ``set``: the set's name, when there are several (e.g. corruptions);
- ``label``: the true class, when the data has labels;
- ``predicted``, ``probability``: the default prediction (the method's ``predict_step``: the softmax of
  the mean member logits for ensembles) and its probability;
- per evaluation variant of the method (``evaluation_logits``; superposition: ``n1/predicted``,
  ``n1/probability``, ... for every n) and per member of an ensemble (MixMo: ``member0/predicted``,
  ``member0/probability``, ...). Computing them costs one more forward pass per batch; ``variants: false``
  writes the default prediction only.

Several processes (DDP): each rank writes ``predictions.rank{r}.csv`` into the run directory (which must
be shared by the ranks, as the checkpoints are); after a barrier rank 0 merges them into
``predictions.csv`` in index order, dropping the images that Lightning's DistributedSampler repeats to
give every rank as many, and deletes the rank files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from manynets.analysis.outputs import read_csv, write_csv
from manynets.errors import check_arg


class PredictionWriter(BasePredictionWriter):
    """Write every image's prediction to ``predictions.csv`` in the run directory (see the module docstring).

    Args:
        filename: name of the CSV file.
        dirpath: folder of the file (default: the run directory, ``trainer.default_root_dir``).
        variants: also write the method's evaluation variants and ensemble members (one more forward pass
            per batch); false writes the default prediction only.
        digits: decimals kept of each probability.
    """

    def __init__(self, filename: str = "predictions.csv", dirpath: str | None = None, variants: bool = True,
                 digits: int = 6) -> None:  # fmt: skip
        super().__init__(write_interval="batch")
        name = "trainer.callbacks[PredictionWriter].init_args"
        check_arg(bool(filename) and "/" not in filename, f"{name}.filename", filename, "a file name without '/'",
                  "Give the folder with dirpath.")
        check_arg(0 <= digits <= 17, f"{name}.digits", digits, "0..17 decimals")
        self.filename, self.dirpath, self.variants, self.digits = filename, dirpath, variants, digits
        self.rows: list[dict[str, Any]] = []
        self._seen: dict[int, int] = {}
        self.path: Path | None = None
        self.count = 0

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows, self._seen = [], {}

    # -- one batch ------------------------------------------------------------------------
    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:  # fmt: skip
        images, labels = _split(batch)
        probabilities = torch.as_tensor(prediction).float()
        columns: dict[str, torch.Tensor] = {}
        _add_choice(columns, "", probabilities)
        if self.variants and hasattr(pl_module, "evaluation_logits"):
            for variant, logits in pl_module.evaluation_logits(images).items():
                prefix = f"{variant}/" if variant else ""
                if variant:
                    ensemble = logits.mean(0) if logits.dim() == 3 else logits
                    _add_choice(columns, prefix, ensemble.float().softmax(-1))
                if logits.dim() == 3:
                    for k, member in enumerate(logits):
                        _add_choice(columns, f"{prefix}member{k}/", member.float().softmax(-1))
        count = probabilities.shape[0]
        indices = list(batch_indices) if batch_indices is not None and len(batch_indices) == count else None
        if indices is None:  # no sampler indices (a plain iterable): positions in arrival order
            start = self._seen.get(dataloader_idx, 0)
            indices = list(range(start, start + count))
        self._seen[dataloader_idx] = self._seen.get(dataloader_idx, 0) + count
        values = {name: column.tolist() for name, column in columns.items()}
        label_list = labels.tolist() if labels is not None else None
        for i in range(count):
            row: dict[str, Any] = {"_loader": dataloader_idx, "index": int(indices[i])}
            if label_list is not None:
                row["label"] = int(label_list[i])
            for name, column in values.items():
                row[name] = round(column[i], self.digits) if name.endswith("probability") else int(column[i])
            self.rows.append(row)

    # -- the file -------------------------------------------------------------------------
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        directory = Path(self.dirpath or trainer.default_root_dir).resolve()
        final = directory / self.filename
        names = self._set_names(trainer)
        rows = [self._public(row, names) for row in self.rows]
        if trainer.world_size == 1:
            self.path, self.count = _write(final, rows), len(rows)
        else:
            rank_file = directory / f"{final.stem}.rank{trainer.global_rank}{final.suffix}"
            _write(rank_file, rows)
            trainer.strategy.barrier("PredictionWriter")
            if trainer.is_global_zero:
                parts = [directory / f"{final.stem}.rank{r}{final.suffix}" for r in range(trainer.world_size)]
                merged = {}
                for part in parts:
                    for row in read_csv(part):
                        merged.setdefault((names.index(row["set"]) if "set" in row else 0, int(row["index"])), row)
                self.path, self.count = _write(final, [merged[key] for key in sorted(merged)]), len(merged)
                for part in parts:
                    part.unlink()
            trainer.strategy.barrier("PredictionWriter merged")
        if trainer.is_global_zero and self.path is not None:
            print(f"predictions: {self.path} ({self.count} images)", flush=True)
        self.rows = []

    @staticmethod
    def _set_names(trainer: pl.Trainer) -> list[str]:
        count = len(trainer.num_predict_batches)
        names = list(getattr(trainer.datamodule, "test_set_names", None) or [])
        return names if len(names) == count else [f"set{i}" for i in range(count)]

    @staticmethod
    def _public(row: dict[str, Any], names: list[str]) -> dict[str, Any]:
        loader = row.pop("_loader")
        return {"set": names[loader], **row} if len(names) > 1 else row


def _split(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, labels or None) of a predict batch: ``(images, labels, ...)`` or images alone."""
    if isinstance(batch, (tuple, list)):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) and batch[1].dim() == 1 else None
        return batch[0], labels
    return batch, None


def _add_choice(columns: dict[str, torch.Tensor], prefix: str, probabilities: torch.Tensor) -> None:
    """``{prefix}predicted`` (the most probable class) and ``{prefix}probability`` (its probability)."""
    top, predicted = probabilities.max(-1)
    columns[f"{prefix}predicted"], columns[f"{prefix}probability"] = predicted, top


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    units = {k: "fraction" for row in rows[:1] for k in row if k.endswith("probability")}
    return write_csv(path, rows, units)
