"""Layer saturation tracked online during training (delve / PHD-LAB, spec pinet_saturation §2.1-2.3).

:class:`Saturation` hooks the outputs of the Conv2d and Linear layers of any backbone (raw outputs:
pre-BN, pre-activation, as delve does) and, per layer and per mode (``train`` batches, ``eval`` =
validation batches, ``test``), accumulates a float64 covariance over the **whole epoch** (delve >=
0.1.45 only keeps the last batch, spec §2.3; this is PHD-LAB's intended behaviour with the
0.1.41 it pins). At the end of every training epoch the sums are all-reduced across DDP ranks, the
intrinsic dimension and the saturation (spec §2.2, ``manynets.layers.covariance``) are computed and

- logged as ``saturation/{mode}/{layer}`` and ``idim/{mode}/{layer}``,
- written to ``saturation.csv`` (one row per epoch; on resume the rows of the re-run epochs are
  replaced, so the file never holds duplicates),
- drawn as a per-layer bar plot ``saturation_epoch{k:03d}.png`` (also sent to TensorBoard / any
  logger with ``log_image``).

Layer names are the module paths inside the backbone joined by ``-`` (delve's naming, e.g.
``body-0-conv1``, ``head``). Overhead: one ``addmm`` per tracked layer and recorded batch on the
device, at the batch end, no host synchronisation per step; ``matmul_dtype: float32`` halves its
cost (batch-centred products, see :class:`~manynets.layers.covariance.StreamingCovariance`);
``every_n_batches`` records every k-th batch.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from torch import nn

from manynets.errors import ConfigError, check_arg
from manynets.layers.covariance import (
    ConvMethod,
    Count,
    StreamingCovariance,
    count_from_eigenvalues,
    eigen_descending,
    layer_samples,
)

_TYPES = {"Conv2d": nn.Conv2d, "Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv3d": nn.Conv3d}
Mode = Literal["train", "eval", "test"]


def backbone_of(pl_module: nn.Module) -> nn.Module:
    """The backbone (``.network``) of a manynets module, else the module itself."""
    return getattr(pl_module, "network", pl_module)


def check_layer_options(prefix: str, layers: str | None, types: list[str] | tuple[str, ...]) -> None:
    """Constructor check of the ``layers`` regular expression and ``types`` names; ``prefix`` is the
    argument path as written in a config (``model.init_args.``, ``trainer.callbacks[Saturation].init_args.``)."""
    try:
        re.compile(layers or "")
    except re.error as err:
        raise ConfigError(f"{prefix}layers = {layers!r}: expected a regular expression on layer names ({err}). "
                          "Escape special characters, e.g. 'body-0' or 'stem|head'.") from None  # fmt: skip
    unknown = [t for t in types if t not in _TYPES]
    check_arg(bool(types) and not unknown, prefix + "types", list(types), f"names among {sorted(_TYPES)}",
              f"These are unknown: {unknown}." if unknown else "Give at least one layer type.")


def select_layers(
    network: nn.Module, layers: str | None = None, types: list[str] | tuple[str, ...] = ("Conv2d", "Linear")
) -> dict[str, nn.Module]:
    """Leaf modules of the given types whose delve-style name (path joined by ``-``) matches ``layers``.

    ``layers`` is a regular expression searched in the name (``None``: all). Raises when nothing matches,
    listing the candidate names.
    """
    unknown = [t for t in types if t not in _TYPES]
    if unknown:
        raise ValueError(f"layer types {unknown}; expected names among {sorted(_TYPES)}")
    classes = tuple(_TYPES[t] for t in types)
    candidates = {name.replace(".", "-"): m for name, m in network.named_modules() if name and isinstance(m, classes)}
    pattern = re.compile(layers) if layers else None
    chosen = {n: m for n, m in candidates.items() if pattern is None or pattern.search(n)}
    if not chosen:
        raise ValueError(
            f"layer filter {layers!r} with types {list(types)} matches no layer of {type(network).__name__}; "
            f"candidates: {', '.join(list(candidates)[:30])}{' ...' if len(candidates) > 30 else ''}"
        )
    return chosen


def layer_width(module: nn.Module) -> int:
    """D of a layer: output channels / features."""
    for attr in ("out_channels", "out_features"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    raise ValueError(f"cannot tell the width of {type(module).__name__}; track Conv or Linear layers")


class Saturation(pl.Callback):
    """Per-layer saturation and intrinsic dimension over every epoch (spec §2.1-2.3).

    Args:
        layers: regular expression on layer names (``-``-joined module paths in the backbone); ``None``: all.
        types: module class names tracked (``Conv2d``, ``Linear``, ``Conv1d``, ``Conv3d``).
        delta: threshold in (0, 1] of the cumulative explained variance (delve ``sat_threshold``; 0.97-0.9995).
        count: ``delve`` (the published rule, ID = #{k : p_k < delta}) or ``textbook`` (min{k : p_k >= delta}).
        conv_method: ``channelwise`` (every position a sample; delve's default), ``mean`` or ``flatten``.
        downsampling: resize conv maps larger than d x d to d x d (nearest) before accumulating.
        every_n_batches: record every k-th batch (delve ``log_interval``).
        modes: which loops are recorded: ``train``, ``eval`` (validation), ``test``.
        matmul_dtype: ``float64`` (delve) or ``float32`` products (still accumulated in float64).
        dirpath: folder of the CSV and plots (default: the trainer's ``log_dir``).
        plot: write the per-layer bar plot PNG each epoch.
    """

    def __init__(
        self,
        layers: str | None = None,
        types: list[str] = ["Conv2d", "Linear"],  # noqa: B006 (jsonargparse needs a plain default)
        delta: float = 0.99,
        count: Count = "delve",
        conv_method: ConvMethod = "channelwise",
        downsampling: int | None = None,
        every_n_batches: int = 1,
        modes: list[Mode] = ["train", "eval"],  # noqa: B006
        matmul_dtype: Literal["float64", "float32"] = "float64",
        dirpath: str | None = None,
        plot: bool = True,
    ) -> None:
        super().__init__()
        c = "trainer.callbacks[Saturation].init_args."
        check_layer_options(c, layers, types)
        check_arg(0 < delta <= 1, c + "delta", delta, "a fraction in (0, 1] of the explained variance",
                  "delta is a fraction: 0.99, not 99.")
        check_arg(downsampling is None or downsampling >= 1, c + "downsampling", downsampling, "null or a side >= 1")
        check_arg(every_n_batches >= 1, c + "every_n_batches", every_n_batches, ">= 1", "1 records every batch.")
        bad = [m for m in modes if m not in ("train", "eval", "test")]
        check_arg(bool(modes) and not bad, c + "modes", list(modes), "a non-empty list out of 'train', 'eval', 'test'")
        self.layers, self.types, self.delta, self.count = layers, list(types), delta, count
        self.conv_method, self.downsampling, self.every_n_batches = conv_method, downsampling, every_n_batches
        self.modes = list(modes)
        self.matmul_dtype = getattr(torch, matmul_dtype)
        self.dirpath, self.plot = dirpath, plot
        self.covariances: dict[str, dict[str, StreamingCovariance]] = {}
        self.widths: dict[str, int] = {}
        self.rows: list[dict[str, float]] = []
        self.last: dict[str, float] = {}
        self._mode: str | None = None
        self._pending: list[tuple[str, torch.Tensor]] = []
        self._handles: list = []

    # -- hooks on the backbone ---------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._handles:
            return
        chosen = select_layers(backbone_of(pl_module), self.layers, self.types)
        for name, module in chosen.items():
            self.widths[name] = layer_width(module)
            self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _make_hook(self, name: str):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            if self._mode is not None and torch.is_tensor(output):
                self._pending.append((name, output.detach()))

        return hook

    def flush(self) -> None:
        """Add the outputs recorded in this batch to the covariances of the current mode.

        Done at the batch end (after the backward pass) rather than inside the forward hooks: the same
        products, measured ~2 points of step time cheaper on a CPU (they no longer interleave with the
        forward pass). The outputs are alive until then anyway (autograd saves them for the backward).
        """
        mode, pending, self._pending = self._mode, self._pending, []
        if mode is None:
            return
        per_mode = self.covariances.setdefault(mode, {})
        for name, output in pending:
            samples = layer_samples(output, self.conv_method, self.downsampling)
            if name not in per_mode:
                per_mode[name] = StreamingCovariance(samples.shape[1], samples.device, self.matmul_dtype)
            per_mode[name].update(samples)

    def _start(self, trainer: pl.Trainer, mode: str, batch_idx: int) -> None:
        record = mode in self.modes and not trainer.sanity_checking and batch_idx % self.every_n_batches == 0
        self._mode = mode if record else None
        self._pending = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start(trainer, "train", batch_idx)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._start(trainer, "eval", batch_idx)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._start(trainer, "test", batch_idx)

    def _stop(self, *args, **kwargs) -> None:
        self.flush()
        self._mode = None

    on_train_batch_end = on_validation_batch_end = on_test_batch_end = _stop

    # -- epoch ends ---------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """On resume keep the CSV rows of the finished epochs only (no duplicates, spec §2.11.7)."""
        path = self._dir(trainer) / "saturation.csv"
        if trainer.current_epoch > 0 and path.is_file() and not self.rows:
            with open(path, newline="") as f:
                self.rows = [
                    {k: float(v) for k, v in row.items() if v != ""}
                    for row in csv.DictReader(f)
                    if int(float(row["epoch"])) < trainer.current_epoch
                ]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning runs the epoch's validation before this hook, so both modes are complete here.
        self._finish(trainer, pl_module, [m for m in ("train", "eval") if m in self.modes], trainer.current_epoch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate" and "eval" in self.modes:  # `manynets validate`: no training epoch
            self._finish(trainer, pl_module, ["eval"], trainer.current_epoch, csv_name="saturation_validate.csv")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "test" in self.modes:
            self._finish(trainer, pl_module, ["test"], trainer.current_epoch, csv_name="saturation_test.csv")

    def compute(self, mode: str) -> dict[str, tuple[int, float]]:
        """All-reduce and evaluate one mode: ``{layer: (intrinsic dimension, saturation)}``; resets the sums.

        Every rank must call it (collective); every layer is reduced in the same order on every rank.
        """
        results = {}
        per_mode = self.covariances.get(mode, {})
        for name in self.widths:
            cov = per_mode.get(name)
            if cov is None:
                continue
            cov.all_reduce()
            if cov.n == 0:
                continue
            eig = eigen_descending(cov.covariance())[0]
            idim = count_from_eigenvalues(eig, self.delta, self.count)
            results[name] = (idim, idim / cov.dim)
            cov.reset()
        return results

    def _finish(self, trainer, pl_module, modes: list[str], epoch: int, csv_name: str = "saturation.csv") -> None:
        row: dict[str, float] = {"epoch": epoch}
        by_mode: dict[str, dict[str, float]] = {}
        for mode in modes:
            results = self.compute(mode)
            by_mode[mode] = {name: sat for name, (_, sat) in results.items()}
            for name, (idim, sat) in results.items():
                row[f"saturation/{mode}/{name}"] = sat
                row[f"idim/{mode}/{name}"] = idim
        if len(row) == 1:
            return
        self.last = row
        metrics = {k: float(v) for k, v in row.items() if k != "epoch"}
        if trainer.logger is not None and not trainer.sanity_checking:
            pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=False, rank_zero_only=True)
        if not trainer.is_global_zero:
            return
        directory = self._dir(trainer)
        directory.mkdir(parents=True, exist_ok=True)
        rows = self.rows if csv_name == "saturation.csv" else []  # test/validate runs: one row
        rows.append(row)
        _write_csv(directory / csv_name, rows)
        if self.plot:
            tag = csv_name.removesuffix(".csv")
            fig = plot_saturation(by_mode, self.widths, f"{tag}, epoch {epoch}, delta {self.delta}")
            fig.savefig(directory / f"{tag}_epoch{epoch:03d}.png", dpi=100, bbox_inches="tight")
            log_figure(trainer, tag, fig, trainer.global_step)
            import matplotlib.pyplot as plt

            plt.close(fig)

    def _dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)


def _write_csv(path: Path, rows: list[dict[str, float]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot_saturation(by_mode: dict[str, dict[str, float]], widths: dict[str, int], title: str):
    """Grouped bar plot of saturation (%) per layer, one colour per mode (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = [n for n in widths if any(n in v for v in by_mode.values())]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names) + 2), 4))
    width = 0.8 / max(len(by_mode), 1)
    for i, (mode, values) in enumerate(by_mode.items()):
        xs = [j + (i - (len(by_mode) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [100 * values.get(n, float("nan")) for n in names], width, label=mode)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("saturation (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def log_figure(trainer: pl.Trainer, tag: str, fig, step: int) -> None:
    """Send a matplotlib figure to every logger that takes images (TensorBoard ``add_figure``, ``log_image``)."""
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_figure"):
            experiment.add_figure(tag, fig, global_step=step, close=False)
        elif hasattr(logger, "log_image"):
            try:
                logger.log_image(key=tag, images=[fig], step=step)
            except (TypeError, ValueError):  # a logger whose log_image takes other arguments
                pass
