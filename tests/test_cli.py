"""The `manynets` command end to end: fit -> validate/test from the checkpoint, DDP, bad inputs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "configs" / "quickstart" / "digits.yaml"
TINY = [  # a small, fast backbone for the end-to-end runs
    "--model.init_args.backbone.init_args.depth=10",
    "--model.init_args.backbone.init_args.width=1",
]


def run_cli(*args: str, cwd: Path, env_extra: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "manynets", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def last_metrics(csv_path: Path) -> dict[str, float]:
    values: dict[str, float] = {}
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


def csv_logger(save_dir: Path, name: str) -> list[str]:
    return [
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        f"--trainer.logger.init_args.name={name}",
    ]


@pytest.mark.slow
def test_fit_then_validate_and_test_from_checkpoint(tmp_path):
    """Fit one epoch in a subprocess, from another working directory; the checkpoint reproduces val metrics."""
    ckpt_dir = tmp_path / "ckpt"
    common = ["--config", str(DIGITS), *TINY, "--trainer.enable_progress_bar=false"]
    fit = run_cli(
        "fit", *common, "--trainer.max_epochs=1", "--trainer.limit_train_batches=5", f"--checkpoint.dirpath={ckpt_dir}",
        f"--trainer.default_root_dir={tmp_path}", *csv_logger(tmp_path, "fit"), cwd=tmp_path,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = ckpt_dir / "last.ckpt"
    assert ckpt.is_file()
    fit_metrics = last_metrics(tmp_path / "fit" / "version_0" / "metrics.csv")
    assert (tmp_path / "fit" / "version_0" / "config.yaml").is_file()  # config saved beside the run

    val = run_cli("validate", *common, f"--ckpt_path={ckpt}", *csv_logger(tmp_path, "val"), cwd=tmp_path)
    assert val.returncode == 0, val.stderr[-3000:]
    val_metrics = last_metrics(tmp_path / "val" / "version_0" / "metrics.csv")
    for key in ("val/acc", "val/nll", "val/ece", "val/brier"):
        assert val_metrics[key] == pytest.approx(fit_metrics[key], abs=1e-5), key

    test = run_cli("test", *common, f"--ckpt_path={ckpt}", *csv_logger(tmp_path, "test"), cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test/acc" in test.stdout
    test_metrics = last_metrics(tmp_path / "test" / "version_0" / "metrics.csv")
    assert 0.0 <= test_metrics["test/acc"] <= 1.0 and test_metrics["test/nll"] > 0


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_two_ranks_train_on_disjoint_shards(tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    result = run_cli(
        "fit", "--config", str(DIGITS), *TINY,
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", "--trainer.logger=false",
        "--data.init_args.val_split=181",  # 1256 training images: divisible by 2, no padding samples
        f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
        "--trainer.callbacks+=record_shard.RecordShard", f"--trainer.callbacks.init_args.out_dir={out}",
        cwd=tmp_path, env_extra={"PYTHONPATH": str(REPO / "tests" / "helpers")}, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    shards = [json.loads((out / f"rank{r}_epoch0.json").read_text()) for r in range(2)]
    assert all(s["world_size"] == 2 and s["sampler"] == "EpochSampler" for s in shards)  # a DistributedSampler
    a, b = (set(s["indices"]) for s in shards)
    assert len(a) == len(b) == 628 and not a & b
    assert a | b == set(range(1256))
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()


# -- bad inputs (in process: one import of Lightning for all of them) ----------------------


def cli(args: list[str]):
    from manynets.cli import main

    return main(args)


def test_unknown_config_key_names_the_key(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli(["fit", "--config", str(DIGITS), "--model.init_args.backbone.init_args.widht=2"])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "widht" in err and "not accepted" in err


def test_moved_option_names_its_new_key(tmp_path, capsys):
    """PiNetModule's network options moved to its PiMLP backbone: the former key fails naming the new one."""
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  init_args:\n    depth: 3\n")
    with pytest.raises(SystemExit) as exc:
        cli(["fit", "--config", str(REPO / "configs" / "quickstart" / "pinet_digits.yaml"), "--config", str(old)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "model.init_args.depth has moved: set model.init_args.backbone.init_args.depth instead." in err


def test_unknown_key_in_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(DIGITS.read_text().replace("max_epochs: 8", "max_epoch: 8"))
    with pytest.raises(SystemExit):
        cli(["fit", "--config", str(bad)])
    assert "max_epoch" in capsys.readouterr().err


def test_missing_data_directory_is_named(tmp_path, capsys):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(SystemExit) as exc:
        cli([
            "fit", "--config", str(DIGITS), "--data=manynets.datamodules.cifar.CIFAR10DataModule",
            f"--data.data_dir={missing}", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}", f"--checkpoint.dirpath={tmp_path}",
        ])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "download" in err


def _tiny_checkpoint(tmp_path: Path) -> Path:
    ckpt_dir = tmp_path / "ckpt"
    cli([
        "fit", "--config", str(DIGITS), *TINY, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}", f"--checkpoint.dirpath={ckpt_dir}",
        "--trainer.enable_model_summary=false",
    ])
    return ckpt_dir / "last.ckpt"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return _tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def test_checkpoint_of_another_model_class(tmp_path, tiny_checkpoint, capsys):
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt["hyper_parameters"]["_class_path"] = "manynets.lightning_modules.other.OtherModule"
    other = tmp_path / "other.ckpt"
    torch.save(ckpt, other)
    with pytest.raises(SystemExit) as exc:
        cli(["test", "--config", str(DIGITS), f"--ckpt_path={other}", "--trainer.logger=false"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "OtherModule" in err and "config the checkpoint was trained with" in err


def test_checkpoint_of_another_backbone(tmp_path, tiny_checkpoint, capsys):
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    del ckpt["hyper_parameters"]  # weights only: the config's (bigger) backbone is built
    stripped = tmp_path / "weights.ckpt"
    torch.save(ckpt, stripped)
    with pytest.raises(SystemExit) as exc:
        cli(["test", "--config", str(DIGITS), f"--ckpt_path={stripped}", "--trainer.logger=false",
             "--trainer.enable_progress_bar=false"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "does not fit ClassifierModule with backbone WideResNet" in err and "shape differs" in err


def test_truncated_checkpoint(tmp_path, tiny_checkpoint, capsys):
    data = tiny_checkpoint.read_bytes()
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(data[: len(data) // 3])
    with pytest.raises(SystemExit) as exc:
        cli(["test", "--config", str(DIGITS), f"--ckpt_path={broken}", "--trainer.logger=false"])
    assert exc.value.code == 2
    assert "truncated" in capsys.readouterr().err


def test_missing_checkpoint_path(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli(["test", "--config", str(DIGITS), f"--ckpt_path={tmp_path / 'nope.ckpt'}"])
    assert "nope.ckpt" in capsys.readouterr().err


def test_nan_loss_fails_clearly_and_keeps_last_epoch_checkpoint(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from manynets.lightning_modules.classifier import ClassifierModule, NonFiniteLossError
    from manynets.networks import MLP

    class NaNInSecondEpoch(ClassifierModule):
        def training_loss(self, images, labels):
            loss, logits, targets = super().training_loss(images, labels)
            return (loss * float("nan") if self.current_epoch == 1 else loss), logits, targets

    data = DataLoader(TensorDataset(torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,))), batch_size=8)
    module = NaNInSecondEpoch(backbone=MLP, num_classes=3, image_shape=(1, 4, 4))
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, callbacks=[ckpt],
                         enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(NonFiniteLossError, match="Training loss is nan at epoch 1.*GradientFilter.*last.ckpt"):
        trainer.fit(module, data)
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["epoch"] == 0  # hparams hold the MLP class


@pytest.mark.slow
def test_wandb_logger_offline(tmp_path, monkeypatch):
    """W&B is selectable and works with WANDB_MODE=offline and no network."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cli([
        "fit", "--config", str(DIGITS), *TINY, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        "--trainer.logger=lightning.pytorch.loggers.WandbLogger", "--trainer.logger.init_args.project=manynets-test",
        f"--trainer.logger.init_args.save_dir={tmp_path}", f"--checkpoint.dirpath={tmp_path / 'ckpt'}",
    ])
    import wandb

    wandb.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(runs[0].glob("*.wandb"))
