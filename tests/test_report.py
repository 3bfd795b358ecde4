"""`manynets report` (issue 13, item 8): one row per run from results.json and the callbacks' CSVs, the
published number of the config and the difference, Markdown on stdout, report.csv and figures in --out.

The slow test trains and tests two tiny digits runs through the CLI (a plain classifier with the
Saturation callback, and MixMo with two members); the fast ones use results.json files in the CLI's schema.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from manynets.report import find_runs, main, markdown, run_row
from manynets.shipped_configs import config_root, config_metadata, shipped_configs

REPO = Path(__file__).resolve().parents[1]
MIXMO_CIFAR100 = config_root() / "mixmo" / "cifar100_wrn28-10_cutmixmo.yaml"


def results(run: Path, config: Path, metrics: dict[str, float], model: str = "ClassifierModule") -> Path:
    """A results.json in the schema `manynets test` writes."""
    run.mkdir(parents=True, exist_ok=True)
    data = {"config": [str(config)], "ckpt_path": str(run / "checkpoints" / "last.ckpt"),
            "model": f"manynets.lightning_modules.{model}", "backbone": "manynets.networks.WideResNet",
            "data": "manynets.datamodules.DigitsDataModule", "epochs": 3, "global_step": 30, "metrics": metrics,
            "finished": "2026-01-01T00:00:00+00:00"}  # fmt: skip
    (run / "results.json").write_text(json.dumps(data))
    return run


def read_report(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_published_numbers_are_machine_readable():
    """Every shipped config's header parses; the MixMo and pi-net configs carry their papers' numbers."""
    published = {}
    for path in shipped_configs():
        entries = config_metadata(path)["published"]
        for entry in entries:
            assert 0 < entry["value"] < 1 and entry["metric"] in ("test/acc", "transfer/acc") and entry["source"]
        published[path.relative_to(config_root()).as_posix()] = entries
    assert published["mixmo/cifar100_wrn28-10_cutmixmo.yaml"][0]["value"] == 0.8552  # README: 85.52-85.59 %
    assert published["pinet/cifar10_mlp_inf_pi.yaml"][0]["value"] == 0.615
    assert sum(1 for name, e in published.items() if e and name.startswith("mixmo/")) == 25
    assert not any(e for name, e in published.items() if name.startswith(("subspaces/", "quickstart/")))


def test_row_published_difference_variants_and_sweep(tmp_path):
    run = results(tmp_path / "cutmixmo", MIXMO_CIFAR100, {
        "test/acc": 0.85, "test/nll": 0.6, "test/ece": 0.02, "test/brier": 0.2, "test/member0/acc": 0.82,
        "test/member1/acc": 0.83, "test/ts/acc": 0.85, "test/ts/nll": 0.55, "val/acc": 0.9}, "MixMoModule")  # fmt: skip
    sweep = run / "lightning_logs" / "version_1" / "subspace_sweep.csv"
    sweep.parent.mkdir(parents=True)
    sweep.write_text("point,alpha,acc (fraction),nll (nats)\n0,0.0,0.8,0.7\n0.5,0.5,0.9,0.4\n")
    row = run_row(run, json.loads((run / "results.json").read_text()))
    assert row["config"] == "mixmo/cifar100_wrn28-10_cutmixmo" and row["method"] == "MixMoModule"
    assert row["published"] == 0.8552 and row["difference"] == pytest.approx(0.85 - 0.8552)
    assert "val/acc" not in row and row["sweep/alpha0.5/acc"] == 0.9
    text = markdown([row])
    assert "| cutmixmo | mixmo/cifar100_wrn28-10_cutmixmo | MixMoModule |" in text and "-0.0052" in text
    assert "| cutmixmo | member1 | 0.8300 |" in text and "| cutmixmo | ts | 0.8500 | 0.5500 |" in text
    assert "| cutmixmo | α=0.5 | 0.9000 | 0.4000 |" in text


def test_bad_input_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.startswith("manynets: error: ")
    assert main([str(tmp_path / "nothing*")]) == 2
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{")
    assert main([str(tmp_path / "broken")]) == 2
    assert "cannot be read as JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


def test_unwritable_out_directory_exits_2(tmp_path, capsys):
    run = results(tmp_path / "run", config_root() / "quickstart" / "digits.yaml", {"test/acc": 0.9})
    (tmp_path / "file").write_text("")
    assert main([str(run), "--out", str(tmp_path / "file" / "report")]) == 2
    assert "--out" in capsys.readouterr().err


def test_globs_and_parent_directories(tmp_path):
    config = REPO / "configs" / "quickstart" / "digits.yaml"
    for name in ("a", "b"):
        results(tmp_path / "runs" / name, config, {"test/acc": 0.9})
    (tmp_path / "runs" / "unfinished").mkdir()
    assert [p.name for p in find_runs([str(tmp_path / "runs" / "*")])] == ["a", "b"]
    assert [p.name for p in find_runs([str(tmp_path / "runs")])] == ["a", "b"]


@pytest.mark.slow
def test_report_of_two_tiny_digits_runs(tmp_path, capsys):
    """fit + test through the CLI (1 epoch, a few batches), then `manynets report` on both run directories."""
    from manynets.cli import main as cli

    tiny = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
            "--trainer.limit_test_batches=2", "--trainer.enable_progress_bar=false", "--test_after_fit=true",
            "--trainer.enable_model_summary=false", "--model.init_args.backbone.init_args.width=1"]  # fmt: skip
    cli(["fit", "--config", "quickstart/digits", f"--trainer.default_root_dir={tmp_path / 'plain'}",
         "--trainer.callbacks+=manynets.callbacks.Saturation", *tiny])  # fmt: skip
    cli(["fit", "--config", "quickstart/mixmo_digits", f"--trainer.default_root_dir={tmp_path / 'mixmo'}", *tiny])
    for run in ("plain", "mixmo"):  # written by the CLI, in its schema
        saved = json.loads((tmp_path / run / "results.json").read_text())
        assert {"config", "ckpt_path", "model", "backbone", "data", "epochs", "global_step", "metrics", "finished"} <= set(saved)
    capsys.readouterr()
    out = tmp_path / "report"
    assert main([str(tmp_path / "plain"), str(tmp_path / "mix*"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| plain | quickstart/digits | ClassifierModule | WideResNet | DigitsDataModule | 1 |" in text
    assert "| mixmo | quickstart/mixmo_digits | MixMoModule |" in text and "| mixmo | member1 |" in text
    rows = read_report(out / "report.csv")
    assert [r["run"] for r in rows] == ["plain", "mixmo"]
    metrics = json.loads((tmp_path / "plain" / "results.json").read_text())["metrics"]
    assert float(rows[0]["test/acc (fraction)"]) == pytest.approx(metrics["test/acc"])
    assert rows[1]["test/member0/acc (fraction)"] and rows[1]["test/ts/acc (fraction)"]
    figures = {p.name for p in out.glob("*.png")}
    assert {"ensemble_vs_members.png", "plain_saturation_heatmap.png", "plain_reliability.png",
            "mixmo_reliability.png"} <= figures, figures  # fmt: skip
    # the reliability table of the run reproduces the logged ECE (same 15 bins)
    from manynets.analysis.outputs import read_csv
    from manynets.analysis.reliability import expected_calibration_error

    table = read_csv(next((tmp_path / "plain").rglob("reliability.csv")))
    assert expected_calibration_error(table) == pytest.approx(metrics["test/ece"], abs=1e-5)
