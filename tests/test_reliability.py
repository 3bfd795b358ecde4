"""Runs that never lose work (issue 11): newest last.ckpt, exact resume after kill -9, run directories,
no silent evaluation of untrained weights, one error path, stacked configs, a table of bad inputs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "configs" / "quickstart" / "digits.yaml"
MIXMO = REPO / "configs" / "quickstart" / "mixmo_digits.yaml"
TINY = [
    "--model.init_args.backbone.init_args.depth=10",
    "--model.init_args.backbone.init_args.width=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def cli(args: list[str]):
    from manynets.cli import main

    return main([str(a) for a in args])


def run_cli(*args, cwd: Path, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO / "tests" / "helpers"), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "manynets", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


def last_row(metrics_csv: Path, key: str) -> dict[str, float]:
    """The last logged value of every column, from the rows that have ``key``."""
    values: dict[str, float] = {}
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            if row.get(key):
                values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


# -- 1. last.ckpt is always the newest state ---------------------------------------------------------------


def test_last_checkpoint_is_the_final_state_when_val_acc_never_improves(tmp_path):
    """lr 0: val/acc is the same every epoch, so only epoch 0 is a top-k checkpoint; last.ckpt still follows."""
    cli(["fit", "--config", DIGITS, *TINY, "--trainer.max_epochs=3", "--trainer.limit_train_batches=2",
         "--trainer.limit_val_batches=1", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
         "--model.init_args.optimizer.init_args.lr=0", "--model.init_args.lr_scheduler=null"])  # fmt: skip
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["epoch000-acc" + p.name[12:] for p in ckpts.glob("epoch*")] \
        + ["last.ckpt"]  # fmt: skip
    last = load(ckpts / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (2, 6)
    best = load(next(ckpts.glob("epoch000*")))
    assert best["global_step"] == 2
    assert not list(ckpts.glob("last-v*.ckpt"))


# -- 2. exact resume after kill -9 ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kill_step", [12, 18], ids=["mid-epoch-checkpoint", "epoch-end-checkpoint"])
def test_resume_after_kill_reproduces_the_uninterrupted_run(kill_step, tmp_path):
    """A run killed by SIGKILL (at step 12: last checkpoint at step 10, mid-epoch; at step 18: last checkpoint at
    the end of epoch 1, step 16) and resumed with --ckpt_path last ends with the same weights and validation
    metrics as the run that was never stopped (augmentation on, deterministic algorithms)."""
    common = ["fit", "--config", DIGITS, *TINY, "--trainer.max_epochs=3", "--trainer.limit_train_batches=8",
              "--trainer.limit_val_batches=2", "--trainer.deterministic=true", "--checkpoint.every_n_train_steps=5",
              "--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.log_every_n_steps=1",
              "--data.init_args.val_split=64"]  # fmt: skip
    straight = run_cli(*common, f"--trainer.default_root_dir={tmp_path / 'a'}",
                       f"--trainer.logger.init_args.save_dir={tmp_path / 'a'}", cwd=tmp_path)  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-3000:]

    run_b = [f"--trainer.default_root_dir={tmp_path / 'b'}", f"--trainer.logger.init_args.save_dir={tmp_path / 'b'}"]
    killed = run_cli(*common, *run_b, "--trainer.callbacks+=kill_at_step.KillAtStep",
                     f"--trainer.callbacks.init_args.step={kill_step}", cwd=tmp_path)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-3000:]
    interrupted = load(tmp_path / "b" / "checkpoints" / "last.ckpt")
    # last.ckpt every 5 steps and at each epoch end (8 steps an epoch): at most the steps since then are lost
    assert interrupted["global_step"] == max(s for s in (5, 8, 10, 15, 16, 20) if s < kill_step)
    if kill_step == 12:  # the default: resumed from the middle of epoch 1, 2 of its 8 batches done
        assert interrupted["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 2

    resumed = run_cli(*common, *run_b, "--ckpt_path", "last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load(tmp_path / "a" / "checkpoints" / "last.ckpt"), load(tmp_path / "b" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 24
    diffs = {k: (a["state_dict"][k].double() - b["state_dict"][k].double()).abs().max().item()
             for k in a["state_dict"] if a["state_dict"][k].is_floating_point()}  # fmt: skip
    print("max weight difference, uninterrupted vs resumed:", max(diffs.values()))
    assert max(diffs.values()) <= 1e-6, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    val_a = last_row(tmp_path / "a" / "lightning_logs" / "version_0" / "metrics.csv", "val/acc")
    val_b = last_row(tmp_path / "b" / "lightning_logs" / "version_1" / "metrics.csv", "val/acc")
    print("val metrics uninterrupted:", {k: val_a[k] for k in ("val/acc", "val/nll")},
          "resumed:", {k: val_b[k] for k in ("val/acc", "val/nll")})  # fmt: skip
    for key in ("val/acc", "val/nll", "val/ece", "val/brier"):
        assert val_b[key] == pytest.approx(val_a[key], abs=1e-6), key


def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    from manynets import random_state

    states = random_state.gather()
    torch.save({"random_states": states}, tmp_path / "s.ckpt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random_state.restore(load(tmp_path / "s.ckpt")["random_states"][0])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_training_loader_resumes_mid_epoch_and_augments_by_seed_epoch_and_image():
    from manynets.datamodules.digits import DigitsDataModule

    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    full = list(dm.train_dataloader())
    torch.manual_seed(123)  # the global generator plays no part in order or augmentation
    again = dm.train_dataloader()
    again.load_state_dict({"epoch": 0, "batches": 5, "batch_size": 32})
    rest = list(again)
    assert len(rest) == len(full) - 5
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(full[5:], rest))
    next_epoch = dm.train_dataloader()
    next_epoch.sampler.set_epoch(1)
    assert not torch.equal(next(iter(next_epoch))[1], full[0][1])
    state = torch.get_rng_state()
    list(dm.train_dataloader())
    assert torch.equal(state, torch.get_rng_state())  # iterating the loader draws nothing from the global generator


def test_saved_training_position_applies_to_a_resumed_fit_only():
    """Testing from an end-of-epoch checkpoint passes over the whole training set (BN recompute, sweeps)."""
    import lightning.pytorch as pl

    from manynets.datamodules.digits import DigitsDataModule

    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    whole = len(dm.train_dataloader())
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    dm.trainer = trainer
    for fn, expected in (("test", whole), ("fit", whole - 5)):
        dm.load_state_dict({"train_position": {"epoch": 0, "batches": 5, "batch_size": 32}})
        trainer.state.fn = fn
        assert len(list(dm.train_dataloader())) == expected, fn


# -- 3. everything of a run lives under its run directory ---------------------------------------------------


def _fit_tiny(root: Path, *extra: str):
    return cli(["fit", "--config", DIGITS, *TINY, "--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
                "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={root}", *extra])  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    _fit_tiny(root)
    return root


def test_run_directory_holds_logs_config_and_checkpoints(finished_run):
    assert (finished_run / "checkpoints" / "last.ckpt").is_file()
    assert (finished_run / "lightning_logs" / "version_0" / "config.yaml").is_file()
    assert not list(finished_run.glob("checkpoints/last-v*.ckpt"))


def test_second_fit_in_the_same_run_directory_is_refused_before_anything_is_written(finished_run, capsys):
    before = sorted(p.relative_to(finished_run) for p in finished_run.rglob("*"))
    with pytest.raises(SystemExit) as exc:
        _fit_tiny(finished_run)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "already holds" in err and "--ckpt_path last" in err and "--overwrite=true" in err
    assert sorted(p.relative_to(finished_run) for p in finished_run.rglob("*")) == before


def test_overwrite_replaces_the_earlier_checkpoints(tmp_path):
    _fit_tiny(tmp_path)
    stale = tmp_path / "checkpoints" / "epoch999-acc0.0000.ckpt"
    stale.write_bytes(b"")
    _fit_tiny(tmp_path, "--overwrite=true", "--trainer.logger=false")
    assert not stale.exists() and (tmp_path / "checkpoints" / "last.ckpt").is_file()


# -- 4. no silent evaluation of untrained weights -------------------------------------------------------------


@pytest.mark.parametrize("sub", ["validate", "test", "predict"])
def test_evaluation_without_checkpoint_is_refused(sub, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli([sub, "--config", DIGITS, *TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "untrained weights" in err and "--ckpt_path" in err and "--allow_untrained=true" in err


def test_untrained_evaluation_on_purpose_and_from_named_checkpoints(finished_run, tmp_path, capsys):
    base = ["--config", DIGITS, *TINY, "--trainer.logger=false", "--trainer.limit_test_batches=1"]
    cli(["test", *base, f"--trainer.default_root_dir={tmp_path}", "--allow_untrained=true"])
    cli(["test", *base, f"--trainer.default_root_dir={finished_run}", "--ckpt_path", "last"])
    cli(["test", *base, f"--trainer.default_root_dir={finished_run}", "--ckpt_path", "best"])
    assert capsys.readouterr().out.count("test/acc") == 3


# -- 8. one error path ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_errors_are_one_line_without_traceback_and_debug_shows_it(tmp_path):
    args = ["test", "--config", DIGITS, "--ckpt_path", tmp_path / "missing.ckpt"]
    plain = run_cli(*args, cwd=tmp_path)
    assert plain.returncode == 2
    lines = [line for line in plain.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("manynets: error: --ckpt_path") and "Traceback" not in plain.stderr
    assert "usage:" not in plain.stderr
    debug = run_cli(*args, cwd=tmp_path, env_extra={"MANYNETS_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "CheckpointMismatchError" in debug.stderr


# -- 9. stacked configs -----------------------------------------------------------------------------------------


def test_a_later_config_that_changes_the_model_class_resets_its_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli(["fit", "--config", MIXMO, "--config", DIGITS, "--print_config"])
    assert exc.value.code == 0
    out, err = capsys.readouterr()
    model = out[out.index("\nmodel:"):out.index("\ndata:")]
    assert "ClassifierModule" in model and "stride_on: conv1" in model and "init: kaiming" in model  # WRN defaults
    assert "MixMoModule" in err and "dropped" in err


def test_a_later_config_that_changes_the_backbone_class_resets_its_options(tmp_path, capsys):
    resnet = tmp_path / "resnet.yaml"
    resnet.write_text("model:\n  init_args:\n    backbone:\n      class_path: manynets.networks.VGG\n")
    with pytest.raises(SystemExit):
        cli(["fit", "--config", DIGITS, "--config", resnet, "--print_config"])
    out = capsys.readouterr().out
    model = out[out.index("\nmodel:"):out.index("\ndata:")]
    assert "VGG" in model and "depth: 10" not in model


# -- a table of bad inputs at the command line: each message names the problem -------------------------------

BAD_INPUTS = [
    ("unknown key", ["--model.init_args.backbone.init_args.widht=2"], ["widht", "not accepted"]),
    ("abbreviated key", ["--trainer.max_epoch=2"], ["max_epoch"]),
    ("wrong type", ["--data.init_args.batch_size=abc"], ["batch_size", "abc"]),
    ("unknown model class", ["--model=manynets.lightning_modules.NoSuchModule"], ["NoSuchModule"]),
    ("unknown trainer option", ["--trainer.max_epochz=1"], ["max_epochz"]),
    ("negative batch size", ["--data.init_args.batch_size=0"], ["batch_size", "0"]),
    ("missing checkpoint", ["--ckpt_path=/nonexistent/x.ckpt"], ["/nonexistent/x.ckpt", "not a file"]),
    ("nothing to resume", ["--ckpt_path=last"], ["--ckpt_path last", "no run to resume"]),
    ("unwritable run directory", ["--trainer.default_root_dir=/proc/manynets"], ["trainer.default_root_dir", "/proc"]),
    ("unwritable checkpoint directory", ["--checkpoint.dirpath=/proc/manynets"], ["checkpoint.dirpath", "/proc"]),
]


@pytest.mark.parametrize("name,args,needles", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_command_line_input(name, args, needles, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli(["fit", "--config", DIGITS, *TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
             "--trainer.max_epochs=0", *args])  # fmt: skip
    assert exc.value.code == 2
    err = capsys.readouterr().err
    message = "\n".join(line for line in err.splitlines() if not line.startswith("manynets: note:"))
    assert message.startswith("manynets: error:") and "Traceback" not in err and "usage:" not in err
    for needle in needles:
        assert needle in err, (needle, err)


BAD_CONFIG_FILES = [
    ("empty", "", ["empty.yaml", "is empty"]),
    ("only a comment", "# nothing\n", ["is empty"]),
    ("not yaml", "model: [\n", ["not valid YAML", "line"]),
    ("a list", "- 1\n- 2\n", ["a YAML list, not a mapping"]),
    ("misspelt group", "trainr:\n  max_epochs: 1\n", ["trainr"]),
    ("misspelt trainer key", "trainer:\n  max_epoch: 1\n", ["max_epoch"]),
]


@pytest.mark.parametrize("name,text,needles", BAD_CONFIG_FILES, ids=[row[0] for row in BAD_CONFIG_FILES])
def test_bad_config_file(name, text, needles, tmp_path, capsys):
    bad = tmp_path / "empty.yaml"
    bad.write_text(text)
    with pytest.raises(SystemExit) as exc:
        cli(["fit", "--config", DIGITS, "--config", bad, f"--trainer.default_root_dir={tmp_path}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, (needle, err)


def test_missing_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli(["fit", "--config", tmp_path / "nope.yaml"])
    assert exc.value.code == 2 and "nope.yaml': no such file" in capsys.readouterr().err


BAD_CHECKPOINTS = ["truncated", "not a checkpoint", "another model class", "another backbone"]


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
def test_bad_checkpoint(kind, finished_run, tmp_path, capsys):
    good = finished_run / "checkpoints" / "last.ckpt"
    bad = tmp_path / "bad.ckpt"
    if kind == "truncated":
        bad.write_bytes(good.read_bytes()[:1000])
    elif kind == "not a checkpoint":
        bad.write_text("hello")
    else:
        ckpt = load(good)
        if kind == "another model class":
            ckpt["hyper_parameters"]["_class_path"] = "manynets.lightning_modules.MixMoModule"
        else:  # weights only: the config's (wider) backbone is built and the shapes differ
            del ckpt["hyper_parameters"]
        torch.save(ckpt, bad)
    with pytest.raises(SystemExit) as exc:
        cli(["test", "--config", DIGITS, f"--ckpt_path={bad}", "--trainer.logger=false",
             "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"])  # fmt: skip
    assert exc.value.code == 2
    err = capsys.readouterr().err
    expected = {"truncated": "truncated", "not a checkpoint": "cannot be read", "another model class": "MixMoModule",
                "another backbone": "does not fit"}[kind]  # fmt: skip
    assert expected in err, err


def test_print_config_checks_arguments_too(capsys):
    with pytest.raises(SystemExit) as exc:
        cli(["fit", "--config", MIXMO, "--model.init_args.alpha=-1", "--print_config"])
    assert exc.value.code == 2
    assert "model.init_args.alpha = -1.0" in capsys.readouterr().err


def test_sync_batchnorm_without_cuda_is_a_clear_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: SyncBatchNorm works")
    with pytest.raises(SystemExit) as exc:
        cli(["fit", "--config", DIGITS, "--trainer.sync_batchnorm=true", f"--trainer.default_root_dir={tmp_path}"])
    assert exc.value.code == 2 and "sync_batchnorm" in capsys.readouterr().err
