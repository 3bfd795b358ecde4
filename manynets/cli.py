"""The ``manynets`` command: Lightning's CLI over our modules and data modules.

``manynets fit --config configs/quickstart/digits.yaml`` then
``manynets test --config configs/quickstart/digits.yaml --ckpt_path <run>/checkpoints/last.ckpt``
(or ``manynets fit ... --test_after_fit=true``: the test of ``last.ckpt`` right after training).
Subcommands ``fit / validate / test / predict``; ``--config`` repeats; ``--print_config``.
``model`` and ``data`` take any subclass of :class:`ClassifierModule` / :class:`ImageDataModule`
by class path (short names work for the classes manynets ships). ``data.num_classes`` and
``data.image_shape`` are linked into the model. A ``checkpoint`` group configures
:class:`~manynets.callbacks.RunCheckpoint` (``last.ckpt`` always the newest state + best by ``val/acc``).

A run lives in its run directory, ``trainer.default_root_dir``: logs, ``config.yaml`` and
``checkpoints/`` (unless ``checkpoint.dirpath`` is given); TensorBoard, CSV and W&B loggers write under it
unless their ``save_dir`` says otherwise; every ``test`` writes ``results.json`` (:func:`write_results`) and
``predict`` writes ``predictions.csv`` (:class:`~manynets.callbacks.PredictionWriter`) into it. Default
callbacks: a progress bar (Lightning's RichProgressBar on a terminal, plain lines otherwise:
:class:`~manynets.callbacks.progress.PlainProgress`), LearningRateMonitor (``lr/decay``, ``lr/no_decay``),
TensorBoard's ``hp_metric`` = the monitored metric, a model summary without Lightning's all-zero FLOPs.
``fit`` refuses a checkpoint directory that already holds checkpoints unless it resumes (``--ckpt_path last``)
or ``--overwrite=true``; ``validate/test/predict`` refuse to evaluate initial weights unless ``--ckpt_path`` is
given or ``--allow_untrained=true``. Every expected error is one ``manynets: error: ...`` line and exit
status 2; ``MANYNETS_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import sys
import uuid
import warnings
from datetime import datetime, timezone
from pathlib import Path

import lightning.pytorch as pl
import torch
from jsonargparse import Namespace
from lightning.fabric.utilities.rank_zero import _get_rank
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import BasePredictionWriter, ModelSummary, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI

import manynets.callbacks  # noqa: F401  (short class names in configs)
import manynets.datamodules  # noqa: F401
import manynets.lightning_modules  # noqa: F401
import manynets.networks  # noqa: F401
from manynets.callbacks.hp_metric import MonitoredHpMetric
from manynets.callbacks.model_summary import ParameterSummary
from manynets.callbacks.progress import PlainProgress
from manynets.callbacks.run_checkpoint import RunCheckpoint
from manynets.datamodules.base import ImageDataModule
from manynets.errors import CheckpointMismatchError, ConfigError, ManynetsError, RunDirectoryError
from manynets.lightning_modules.classifier import ClassifierModule
from manynets.stacked_configs import check_config_files, reset_replaced_classes
from manynets.shipped_configs import resolve_config_names

_RUN_DIR_LOGGERS = ("CSVLogger", "TensorBoardLogger", "WandbLogger")
"""Loggers whose ``save_dir`` defaults to the run directory (an empty ``save_dir`` means it too)."""
RESULTS_FILE = "results.json"
# Commands beside Lightning's fit / validate / test / predict: module with a ``main(argv) -> int``, help line.
_OTHER_COMMANDS = {
    "list": ("manynets.catalog", "the methods, backbones, data modules, callbacks and shipped configs"),
    "report": ("manynets.report", "one table (Markdown, CSV, figures) of finished runs: `manynets report RUN_DIR...`"),
    "grid": ("manynets.grid", "run every combination of a grid of options: `manynets grid --config grid.yaml`"),
}
EPILOG = "other commands:\n" + "\n".join(f"  {name:<8} {text}" for name, (_, text) in _OTHER_COMMANDS.items())
DEBUG_ENV = "MANYNETS_DEBUG"


class ManynetsCLI(LightningCLI):
    """LightningCLI with manynets defaults: seed 0, linked data shapes, run directory, checkpoint checks."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("model_class", ClassifierModule)
        kwargs.setdefault("datamodule_class", ImageDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault(
            "parser_kwargs",
            {"prog": "manynets", "exit_on_error": False, "allow_abbrev": False, "epilog": EPILOG,
             "formatter_class": argparse.RawDescriptionHelpFormatter},
        )
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.image_shape", "model.init_args.image_shape", apply_on="instantiate")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch:03d}-acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_argument(
            "--overwrite", type=bool, default=False,
            help="fit: start a new run even though the checkpoint directory holds checkpoints (they are deleted).",
        )
        parser.add_argument(
            "--allow_untrained", type=bool, default=False,
            help="validate/test/predict: evaluate the initial weights on purpose (no --ckpt_path).",
        )
        parser.add_argument(
            "--test_after_fit", type=bool, default=False,
            help="fit: test the last checkpoint (last.ckpt, the state at the end of training, as the shipped "
                 "configs' published numbers) right after training, into the same run directory and logger "
                 "version as the training curves; writes results.json like `manynets test`.",
        )

    # -- before anything is built -------------------------------------------------------
    def _parse_ckpt_path(self) -> None:
        """Settle the run directory and the checkpoint before Lightning restores hyper-parameters from it."""
        sub = self.config.get("subcommand")
        if not sub:
            return
        self._prepare_run(sub, self.config[sub])
        ckpt_path = self.config[sub].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        # As LightningCLI does, plus the upgrade of hyper-parameters that a method has moved since.
        hparams = dict(_load(ckpt_path).get("hyper_parameters", {}))
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        class_path = hparams.pop("_class_path", None)
        upgrade = getattr(_model_class(class_path), "upgrade_hyperparameters", None)
        if upgrade is not None:
            hparams = upgrade(hparams)
        if class_path:
            hparams = {"class_path": class_path, "dict_kwargs": hparams}
        self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)

    def _prepare_run(self, sub: str, cfg: Namespace) -> None:
        root = Path(cfg.trainer.default_root_dir or os.getcwd()).expanduser()
        if cfg.checkpoint.dirpath is None:
            cfg.checkpoint.dirpath = str(root / "checkpoints")
        ckpt_dir = Path(cfg.checkpoint.dirpath).expanduser()
        _require_writable(root, "trainer.default_root_dir")
        if sub == "fit":
            _require_writable(ckpt_dir, "checkpoint.dirpath")
        if cfg.trainer.get("sync_batchnorm") and not torch.cuda.is_available() and not cfg.trainer.get("plugins"):
            raise ConfigError(
                "trainer.sync_batchnorm = true needs CUDA devices (torch.nn.SyncBatchNorm is GPU-only) and none is "
                "available. Drop it on CPU, or give a SyncBatchNorm plugin that runs on CPU with --trainer.plugins."
            )
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path in ("last", "best"):
            cfg.ckpt_path = ckpt_path = str(_resolve_named_checkpoint(ckpt_path, ckpt_dir))
        if ckpt_path and ckpt_path not in ("hpc", "registry"):
            _check_checkpoint(ckpt_path, cfg.model.get("class_path"))
        elif sub == "fit":
            existing = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
            if existing and _is_rank_zero():
                if not cfg.overwrite:
                    raise RunDirectoryError(
                        f"The checkpoint directory '{ckpt_dir}' already holds {len(existing)} checkpoint(s) "
                        f"({', '.join(p.name for p in existing[:3])}) from an earlier run. Resume it with "
                        "--ckpt_path last, start the new run elsewhere with --trainer.default_root_dir=<new dir>, "
                        "or replace it with --overwrite=true (deletes those checkpoints)."
                    )
                for path in existing:
                    path.unlink()
        elif not cfg.allow_untrained and not _model_class_attr(cfg.model.get("class_path"), "loads_own_weights"):
            raise ConfigError(
                f"`manynets {sub}` without --ckpt_path would evaluate untrained weights. Give the checkpoint "
                f"to evaluate (--ckpt_path {ckpt_dir / 'last.ckpt'}, or --ckpt_path last / best for this run "
                "directory's), or pass --allow_untrained=true to evaluate the initial weights on purpose."
            )

    def before_instantiate_classes(self) -> None:
        """Loggers under the run directory; default callbacks (part of the saved config.yaml) unless disabled or
        already there: LearningRateMonitor, ReliabilityDiagram for test (and fit with test_after_fit),
        PredictionWriter for predict."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg.trainer
        root = str(Path(trainer.default_root_dir or os.getcwd()).expanduser())
        for logger in trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]:
            _default_save_dir(logger, root)
        callbacks = list(trainer.callbacks or [])
        classes = [_class(c) for c in callbacks]
        names = {str(getattr(c, "class_path", "")).rsplit(".", 1)[-1] for c in callbacks}

        def add(class_path: str) -> None:
            callbacks.append(Namespace(class_path=class_path, init_args=Namespace()))

        if trainer.logger is not False and "LearningRateMonitor" not in names:
            add("lightning.pytorch.callbacks.LearningRateMonitor")
        testing = self.subcommand == "test" or (self.subcommand == "fit" and cfg.get("test_after_fit"))
        if testing and hasattr(manynets.callbacks, "ReliabilityDiagram") and "ReliabilityDiagram" not in names:
            add("manynets.callbacks.ReliabilityDiagram")
        if self.subcommand == "predict" and not any(isinstance(c, type) and issubclass(c, BasePredictionWriter)
                                                    for c in classes):  # fmt: skip
            add("manynets.callbacks.PredictionWriter")
        trainer.callbacks = callbacks

    def instantiate_trainer(self, **kwargs) -> pl.Trainer:
        """Callbacks of this session only (not in config.yaml): the progress bar that fits the output
        (RichProgressBar on a terminal, PlainProgress lines otherwise), a model summary without the FLOPs
        column of zeros, TensorBoard's hp_metric = the monitored metric."""
        config = (self.config_init[self.subcommand] if self.subcommand else self.config_init).trainer
        given = config.callbacks if isinstance(config.callbacks, list) else [c for c in [config.callbacks] if c]
        session = []
        if config.enable_progress_bar is not False and not any(isinstance(c, ProgressBar) for c in given):
            session.append(RichProgressBar() if sys.stdout.isatty() else PlainProgress())
        if config.enable_model_summary is not False and not any(isinstance(c, ModelSummary) for c in given):
            session.append(ParameterSummary())
            kwargs["enable_model_summary"] = False  # Lightning's own summary, and its note about ours, stay off
        if config.logger is not False:
            session.append(MonitoredHpMetric())
        return super().instantiate_trainer(callbacks=[*given, *session], **kwargs)

    # -- after the command ----------------------------------------------------------------
    def after_fit(self) -> None:
        """``--test_after_fit=true``: test ``last.ckpt`` (else the weights in memory) with the same trainer, so
        the test metrics go to the logger version of the training curves; then write results.json."""
        cfg = self.config["fit"]
        if not cfg.get("test_after_fit") or self.trainer.interrupted:
            return
        last = Path(cfg.checkpoint.dirpath) / "last.ckpt"
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=str(last) if last.is_file() else None)
        self.after_test()

    def after_test(self) -> None:
        if self.trainer.is_global_zero:
            path = write_results(self.trainer, self.config[self.subcommand])
            print(f"results: {path}", flush=True)


def _default_save_dir(logger: object, root: str) -> None:
    """A TensorBoard, CSV or W&B logger without ``save_dir`` (or ``""``; W&B: ``"."``, its default, and no
    ``dir``) writes into the run directory ``root``."""
    name = str(getattr(logger, "class_path", "")).rsplit(".", 1)[-1]
    args = getattr(logger, "init_args", None)
    if name not in _RUN_DIR_LOGGERS or args is None:
        return
    unset = (None, "", ".") if name == "WandbLogger" else (None, "")
    if args.get("save_dir") in unset and not args.get("dir"):
        args.save_dir = root


def _class(callback: object) -> type | None:
    """The class named by a callback's ``class_path`` (None if it cannot be imported)."""
    module, _, name = str(getattr(callback, "class_path", "")).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        return None


def write_results(trainer: pl.Trainer, cfg: Namespace) -> Path:
    """``<run dir>/results.json`` of the test that has just run (read by ``manynets report``)::

        {"config": [--config files], "ckpt_path": str or null, "model": class path, "backbone": class path
         or null, "data": class path, "epochs": training epochs the checkpoint completed, "global_step": int,
         "metrics": {"test/...": float}, "finished": ISO time (UTC)}
    """
    ckpt_path = trainer.ckpt_path
    state = {}
    if ckpt_path and Path(ckpt_path).is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    progress = state.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    model = cfg.model
    backbone = model.get("init_args", Namespace()).get("backbone") if isinstance(model, Namespace) else None
    results = {
        "config": [os.path.abspath(str(path)) for path in cfg.get("config") or [] if path is not None],
        "ckpt_path": os.path.abspath(ckpt_path) if ckpt_path else None,
        "model": model.get("class_path") if isinstance(model, Namespace) else None,
        "backbone": backbone.get("class_path") if isinstance(backbone, Namespace) else None,
        "data": cfg.data.get("class_path") if isinstance(cfg.get("data"), Namespace) else None,
        "epochs": int(progress.get("processed", state.get("epoch", -1) + 1 if state else 0)),
        "global_step": int(state.get("global_step", 0)),
        "metrics": {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("test/")},
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = Path(trainer.default_root_dir).resolve() / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def _is_rank_zero() -> bool:
    """Rank 0 of the whole job (DDP re-runs this command in every process)."""
    return (_get_rank() or 0) == 0 and int(os.environ.get("NODE_RANK", "0") or 0) == 0


def _require_writable(directory: Path, name: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".manynets-write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RunDirectoryError(
            f"{name} = '{directory}' cannot be written ({err.strerror or err}). Choose a directory you can "
            f"write to with --{name}=<dir>."
        ) from None


def _resolve_named_checkpoint(name: str, ckpt_dir: Path) -> Path:
    """``last`` -> ``<ckpt_dir>/last.ckpt``; ``best`` -> the best checkpoint recorded in it."""
    last = ckpt_dir / "last.ckpt"
    if not last.is_file():
        raise CheckpointMismatchError(
            f"--ckpt_path {name}: there is no '{last}', so there is no run to {'resume' if name == 'last' else 'use'} "
            "in this run directory. Point --trainer.default_root_dir (or --checkpoint.dirpath) at the run, give "
            "the path of a .ckpt, or start a new run without --ckpt_path."
        )
    if name == "last":
        return last
    state = _load(last).get("callbacks", {})
    best = next((s.get("best_model_path") for k, s in state.items() if "Checkpoint" in k and s.get("best_model_path")), "")
    if not best or not Path(best).is_file():
        raise CheckpointMismatchError(
            f"--ckpt_path best: '{last}' records no best checkpoint that still exists ({best or 'none'}). "
            "Use --ckpt_path last or give a .ckpt path."
        )
    return Path(best)


def _load(path: str | Path) -> dict:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:
        raise CheckpointMismatchError(
            f"--ckpt_path '{path}' cannot be read as a Lightning checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}). It may be truncated or not a checkpoint; use a .ckpt written by "
            "`manynets fit`."
        ) from None


def _check_checkpoint(ckpt_path: str, wanted: str | None) -> None:
    if not Path(ckpt_path).is_file():
        raise CheckpointMismatchError(
            f"--ckpt_path '{ckpt_path}' is not a file. Give the path of a .ckpt written by `manynets fit` "
            "(by default <trainer.default_root_dir>/checkpoints/), or --ckpt_path last."
        )
    saved = _load(ckpt_path).get("hyper_parameters", {}).get("_class_path")
    if saved and wanted and saved.rsplit(".", 1)[-1] != wanted.rsplit(".", 1)[-1]:
        raise CheckpointMismatchError(
            f"--ckpt_path '{ckpt_path}' was saved by {saved}, but the config builds {wanted}. "
            "Use the config the checkpoint was trained with (config.yaml in its log directory)."
        )


def _model_class(class_path: str | None) -> type | None:
    if not class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name) if module else getattr(manynets.lightning_modules, name)
    except (ImportError, AttributeError):
        return None


def _model_class_attr(class_path: str | None, attr: str) -> bool:
    return bool(getattr(_model_class(class_path), attr, False))


def _expected(err: BaseException) -> BaseException | None:
    """The expected error behind ``err`` (itself or a cause), or None for a bug."""
    seen = err
    while seen is not None:
        if isinstance(seen, (ManynetsError, argparse.ArgumentError, MisconfigurationException)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes: [", "Expected a <class 'NoneType'>",
          "Given value type:", "Given value:", "Errors:")


def _tidy(message: str) -> str:
    """jsonargparse's union-type report without the lines about the ``None`` alternative, plus the new key of
    an option that moved (:func:`_moved_options`)."""
    lines = [line for line in message.splitlines() if not line.strip().lstrip("- ").startswith(_NOISE)]
    moved = _moved_options()
    for key in dict.fromkeys(re.findall(r"Option '([\w.]+)' is not accepted|No action for key \"([\w.]+)\"", message)):
        old = "model.init_args." + next(k for k in key if k)
        if old in moved:
            lines.append(f"{old} has moved: set {moved[old]} instead.")
    return "\n".join(lines).strip()


def _moved_options() -> dict[str, str]:
    """Former config keys -> their new keys, from every method module's ``MOVED_OPTIONS``."""
    moved: dict[str, str] = {}
    for name in dir(manynets.lightning_modules):
        module = sys.modules.get(getattr(getattr(manynets.lightning_modules, name), "__module__", ""))
        moved.update(getattr(module, "MOVED_OPTIONS", {}))
    return moved


def _print_config_checked(argv: list[str]) -> None:
    """``--print_config`` prints before anything is built; build the classes first, so bad values fail here too."""
    sub = argv[0] if argv and not argv[0].startswith("-") else None
    skip = ("--print_config", "--ckpt_path", "--overwrite", "--allow_untrained")
    rest = [a for a in argv[1 if sub else 0:] if not a.startswith(skip)]
    ManynetsCLI(args=rest, run=False)


def _logger_save_dirs(argv: list[str]) -> list[str]:
    """After ``--trainer.logger=<CSV/TensorBoard/W&B logger class>`` add an empty ``save_dir`` (the run
    directory, see :func:`_default_save_dir`), which the CSV and TensorBoard loggers require; a later
    ``--trainer.logger.init_args.save_dir`` still wins."""
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        value = arg.partition("=")[2] if arg.startswith("--trainer.logger=") else None
        if arg == "--trainer.logger" and i + 1 < len(argv):
            continue
        if i and argv[i - 1] == "--trainer.logger":
            value = arg
        if value and value.rsplit(".", 1)[-1] in _RUN_DIR_LOGGERS:
            out.append("--trainer.logger.init_args.save_dir=")
    return out


class _DropMessage(logging.Filter):
    """Drop the log records whose message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _quiet_known_messages() -> None:
    """Silence what every run printed without meaning anything here: Lightning's tip to install litlogger,
    torch's deprecation of ``LeafSpec`` (Lightning's own pytree code calls it). The model summary's FLOPs
    column of zeros goes by :class:`ParameterSummary`."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in logger.filters):
            logger.addFilter(_DropMessage("try installing [litlogger]"))
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``manynets`` console script and ``python -m manynets``."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] and argv[0] in _OTHER_COMMANDS:  # list / report / grid: see their modules
        command = importlib.import_module(_OTHER_COMMANDS[argv[0]][0])
        raise SystemExit(command.main(argv[1:]))
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    _quiet_known_messages()
    try:
        argv = resolve_config_names(argv)
        argv = _logger_save_dirs(argv)
        check_config_files(argv)
        argv = reset_replaced_classes(argv)
        if any(a.startswith("--print_config") for a in argv):
            _print_config_checked(argv)
        ManynetsCLI(args=argv)
    except Exception as err:  # noqa: BLE001  (expected errors become one line; bugs keep their traceback)
        expected = _expected(err)
        if expected is None or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        message = _tidy(str(expected)) or type(expected).__name__
        print(f"manynets: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
