"""What a user of `manynets` sees: progress lines without a terminal, predictions.csv, loggers under the run
directory, test right after fit, results.json, learning-rate tags, quiet output (issue 13, items 4-7, 10).

One tiny digits fit (subprocess, stdout not a terminal, the README's CSV logger line, ``--test_after_fit``)
is shared by the end-to-end tests; ``predict`` runs in-process on its checkpoint and the README's W&B line
(offline) runs ``test`` on it in a fresh working directory.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from manynets.analysis.progress import Progress, tracked

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "configs" / "quickstart" / "digits.yaml"
RUN = Path("runs/quickstart/digits")  # the config's trainer.default_root_dir, relative to the working directory
TINY = ["--model.init_args.backbone.init_args.depth=10", "--model.init_args.backbone.init_args.width=1"]
SHORT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
         "--trainer.limit_test_batches=2", "--trainer.log_every_n_steps=1"]  # fmt: skip
HARMLESS = ("litlogger", "LeafSpec", "FLOPs", "Total Flops")
"""Messages every run printed before issue 13 (the CLI silences them)."""


def run_cli(*args: str, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "manynets", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """(working directory, process) of `manynets fit` with the README's CSV logger line and test_after_fit."""
    cwd = tmp_path_factory.mktemp("user")
    proc = run_cli("fit", "--config", DIGITS, *TINY, *SHORT, "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
                   "--test_after_fit=true", cwd=cwd)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc


# -- end to end -----------------------------------------------------------------------------
@pytest.mark.slow
def test_fit_without_terminal_prints_progress_tests_after_fit_and_writes_results(fitted):
    cwd, proc = fitted
    out = proc.stdout
    steps = [line for line in out.splitlines() if line.startswith("epoch 1/1, step ")]
    assert [line.split(",")[1].strip() for line in steps] == ["step 1/3 (33 %)", "step 2/3 (67 %)", "step 3/3 (100 %)"]
    assert all("train/loss" in line and "images/s" in line and "left in epoch" in line for line in steps)
    assert any(line.startswith("epoch 1/1 validation") and "val/acc" in line for line in out.splitlines())
    assert "test: batch 2/2 (100 %)" in out
    for text in HARMLESS:
        assert text not in out + proc.stderr, text
    assert "Trainable params" in proc.stderr  # the model summary, without its FLOPs

    assert sorted(p.name for p in cwd.iterdir()) == ["runs"]  # nothing outside the run directory
    run = cwd / RUN
    versions = sorted(p.name for p in (run / "lightning_logs").iterdir())
    assert versions == ["version_0"]  # the test went to the training curves' logger version
    with open(run / "lightning_logs" / "version_0" / "metrics.csv") as f:
        columns = next(csv.reader(f))
    assert {"lr/decay", "lr/no_decay", "train/loss", "val/acc", "test/acc"} <= set(columns)
    assert (run / "lightning_logs" / "version_0" / "config.yaml").is_file()

    results = json.loads((run / "results.json").read_text())
    assert list(results) == ["config", "ckpt_path", "model", "backbone", "data", "epochs", "global_step", "metrics",
                             "finished"]  # fmt: skip
    assert [Path(c).resolve() for c in results["config"]] == [DIGITS.resolve()]
    assert results["ckpt_path"] == str((run / "checkpoints" / "last.ckpt").resolve())
    assert results["model"].endswith("ClassifierModule") and results["backbone"].endswith("WideResNet")
    assert results["data"].endswith("DigitsDataModule")
    assert (results["epochs"], results["global_step"]) == (1, 3)
    assert {"test/acc", "test/nll", "test/ece", "test/brier"} <= set(results["metrics"])
    assert all(isinstance(v, float) for v in results["metrics"].values())
    assert f"results: {(run / 'results.json').resolve()}" in out


@pytest.mark.slow
def test_predict_writes_one_row_per_image(fitted, capsys):
    from manynets.cli import main
    from manynets.datamodules.digits import DigitsDataModule

    cwd, _ = fitted
    run = cwd / RUN
    main(["predict", "--config", str(DIGITS), *TINY, f"--trainer.default_root_dir={run}", "--ckpt_path", "last",
          "--trainer.logger=false"])  # fmt: skip
    printed = capsys.readouterr().out
    path = run / "predictions.csv"
    assert f"predictions: {path}" in printed
    assert "predict: batch" in printed  # plain progress lines (pytest's stdout is no terminal)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    size = DigitsDataModule().test_size
    assert len(rows) == size
    assert [int(r["index"]) for r in rows] == list(range(size))
    assert list(rows[0]) == ["index", "label", "predicted", "probability (fraction)"]
    assert all(0.0 < float(r["probability (fraction)"]) <= 1.0 and 0 <= int(r["predicted"]) < 10 for r in rows)


@pytest.mark.slow
def test_wandb_offline_writes_only_into_the_run_directory(fitted, tmp_path):
    pytest.importorskip("wandb")
    cwd, _ = fitted
    ckpt = cwd / RUN / "checkpoints" / "last.ckpt"
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    env = {"WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(home), "WANDB_CACHE_DIR": str(home),
           "WANDB_DATA_DIR": str(home), "WANDB_SILENT": "true"}  # fmt: skip
    proc = run_cli("test", "--config", DIGITS, *TINY, "--trainer.limit_test_batches=2", "--ckpt_path", ckpt,
                   "--trainer.logger=lightning.pytorch.loggers.WandbLogger", cwd=work, env_extra=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in work.iterdir()) == ["runs"]
    run = work / RUN
    assert (run / "config.yaml").is_file() and (run / "wandb").is_dir()
    results = json.loads((run / "results.json").read_text())
    assert results["ckpt_path"] == str(ckpt.resolve()) and results["epochs"] == 1 and "test/acc" in results["metrics"]


# -- pieces -------------------------------------------------------------------------------
def test_logger_lines_get_the_run_directory_as_save_dir():
    from manynets.cli import _logger_save_dirs

    csv_line = ["fit", "--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.max_epochs=1"]
    assert _logger_save_dirs(csv_line) == [*csv_line[:2], "--trainer.logger.init_args.save_dir=", csv_line[2]]
    spaced = ["fit", "--trainer.logger", "WandbLogger"]
    assert _logger_save_dirs(spaced) == [*spaced, "--trainer.logger.init_args.save_dir="]
    for untouched in (["--trainer.logger=false"], ["--trainer.logger=lightning.pytorch.loggers.MLFlowLogger"]):
        assert _logger_save_dirs(untouched) == untouched


def test_progress_prints_every_tenth(capsys):
    for _ in tracked(range(20), "sweep, test set"):
        pass
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10
    assert lines[0].startswith("sweep, test set: 2/20 batches (10 %)") and "elapsed" in lines[0] and "left" in lines[0]
    assert lines[-1].startswith("sweep, test set: 20/20 batches (100 %)")
    progress = Progress("fits", None, "layers", interval=0.0)
    progress.update(3)
    assert capsys.readouterr().out.startswith("fits: 3 layers, 0:00:00 elapsed")


def test_plain_progress_lines_in_a_fit(capsys):
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    from manynets.callbacks import PlainProgress

    class Logged(BoringModel):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            self.log("train/loss", out["loss"], prog_bar=True)
            return out

        def validation_step(self, batch, batch_idx):
            self.log("val/acc", torch.tensor(0.5))

    trainer = pl.Trainer(max_epochs=1, limit_train_batches=20, limit_val_batches=2, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_model_summary=False,
                         callbacks=[PlainProgress()], accelerator="cpu")  # fmt: skip
    trainer.fit(Logged())
    lines = capsys.readouterr().out.splitlines()
    steps = [line for line in lines if line.startswith("epoch 1/1, step ")]
    assert len(steps) == 10 and steps[-1].startswith("epoch 1/1, step 20/20 (100 %), train/loss ")
    assert any(line.startswith("epoch 1/1 validation (step 20): val/acc 0.5") for line in lines)


def test_prediction_columns_per_n_and_per_member(tmp_path):
    from functools import partial

    from manynets.callbacks import PredictionWriter
    from manynets.lightning_modules import MixMoModule, SuperpositionModule
    from manynets.networks import MLP

    backbone = partial(MLP, depth=2, width=8)
    images, labels = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4])
    modules = {"superposition": SuperpositionModule(backbone, 10, (3, 8, 8), capacity=2, eval_n=[1, 2]),
               "mixmo": MixMoModule(backbone, 10, (3, 8, 8), num_members=2)}  # fmt: skip
    header = {}
    for name, module in modules.items():
        module.eval()
        writer = PredictionWriter(filename=f"{name}.csv")
        trainer = SimpleNamespace(default_root_dir=str(tmp_path), world_size=1, global_rank=0, is_global_zero=True,
                                  num_predict_batches=[1], datamodule=None)  # fmt: skip
        writer.on_predict_start(trainer, module)
        with torch.no_grad():
            prediction = module.predict_step((images, labels), 0)
            writer.write_on_batch_end(trainer, module, prediction, [10, 11, 12, 13, 14], (images, labels), 0, 0)
        writer.on_predict_end(trainer, module)
        with open(tmp_path / f"{name}.csv") as f:
            rows = list(csv.DictReader(f))
        assert [int(r["index"]) for r in rows] == [10, 11, 12, 13, 14] and [r["label"] for r in rows] == list("01234")
        assert [int(r["predicted"]) for r in rows] == prediction.argmax(-1).tolist()
        header[name] = list(rows[0])
    assert header["superposition"][4:] == ["n1/predicted", "n1/probability (fraction)", "n2/predicted",
                                           "n2/probability (fraction)"]  # fmt: skip
    assert header["mixmo"][4:] == ["member0/predicted", "member0/probability (fraction)", "member1/predicted",
                                   "member1/probability (fraction)"]  # fmt: skip


def test_hp_metric_is_the_monitored_metric():
    from lightning.pytorch.loggers import TensorBoardLogger

    from manynets.callbacks.hp_metric import MonitoredHpMetric

    logged = []

    class Recorder(TensorBoardLogger):
        def __init__(self):  # no files
            pass

        def log_metrics(self, metrics, step=None):
            logged.append((metrics, step))

    trainer = SimpleNamespace(sanity_checking=False, checkpoint_callback=SimpleNamespace(monitor="val/acc"),
                              callback_metrics={"val/acc": torch.tensor(0.75)}, loggers=[Recorder()], global_step=7)
    MonitoredHpMetric().on_validation_end(trainer, None)
    assert logged == [({"hp_metric": 0.75}, 7)]


def test_long_analysis_passes_report_progress(capsys):
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from manynets.analysis import delta_sweep

    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    loader = DataLoader(TensorDataset(torch.randn(40, 1, 4, 4), torch.randint(0, 3, (40,))), batch_size=4)
    delta_sweep(net, loader, loader, deltas=[0.5, 0.9, 0.99, 3.0])
    lines = capsys.readouterr().out.splitlines()
    fitting = [line for line in lines if line.startswith("PCA sweep, covariances: ")]
    assert len(fitting) == 10 and fitting[-1].startswith("PCA sweep, covariances: 10/10 batches (100 %)")
    assert [line.split(" (")[0] for line in lines if line.startswith("PCA sweep, deltas")] == [
        f"PCA sweep, deltas: {k}/4 deltas" for k in range(1, 5)]  # fmt: skip
