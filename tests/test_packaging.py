"""The package as a user installs it: the wheel carries every shipped config, and configs are found by name.

The slow test builds the wheel from a copy of the sources (offline, no build isolation), unpacks it into a
temporary folder first on ``PYTHONPATH`` and runs ``python -m manynets`` from a folder without ``configs/``,
as after ``pip install manynets`` with no clone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from manynets.errors import ConfigError
from manynets.shipped_configs import (
    config_metadata,
    config_name,
    config_root,
    find_config,
    resolve_config_names,
    shipped_configs,
)

REPO = Path(__file__).resolve().parents[1]


# -- shipped configs by name (fast) --------------------------------------------------------------
def test_shipped_configs_are_the_package_folder():
    names = [config_name(p) for p in shipped_configs()]
    assert "quickstart/digits" in names and len(names) == len(set(names))
    assert config_root() == REPO / "manynets" / "configs"


def test_names_resolve_to_shipped_configs_and_files_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    digits = config_root() / "quickstart" / "digits.yaml"
    for name in ("quickstart/digits", "quickstart/digits.yaml", "configs/quickstart/digits.yaml"):
        assert find_config(name) == digits
    assert find_config("quickstart/nothing") is None
    args = ["fit", "--config", "quickstart/digits", "--config=quickstart/mixmo_digits", "--config", "{a: 1}",
            "--config", "missing.yaml"]
    out = resolve_config_names(args)
    assert out[2] == str(digits)
    assert out[3] == f"--config={config_root() / 'quickstart' / 'mixmo_digits.yaml'}"
    assert out[4:] == ["--config", "{a: 1}", "--config", "missing.yaml"]  # inline YAML, unknown: untouched
    (tmp_path / "quickstart").mkdir()
    (tmp_path / "quickstart" / "digits.yaml").write_text("seed_everything: 1\n")
    assert resolve_config_names(["--config", "quickstart/digits.yaml"])[1] == "quickstart/digits.yaml"


def test_config_metadata_reads_the_header(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(
        "# A one-line description.\n# more text\n"
        '# published: {metric: test/acc, value: 0.5, source: "Paper, Table 1"}\n'
        "# published: {metric: test/nll, value: 1.25}\nmodel: {}\n# published: {metric: ignored, value: 1}\n"
    )
    meta = config_metadata(path)
    assert meta["description"] == "A one-line description."
    assert meta["published"] == [{"metric": "test/acc", "value": 0.5, "source": "Paper, Table 1"},
                                 {"metric": "test/nll", "value": 1.25, "source": ""}]
    path.write_text("# d\n# published: {metric: test/acc}\n")
    with pytest.raises(ConfigError, match="published-number record"):
        config_metadata(path)


def test_every_shipped_config_has_a_description_and_valid_metadata():
    for path in shipped_configs():
        meta = config_metadata(path)  # raises on a malformed published line
        assert meta["description"], f"{path}: the first header comment line describes the config"


def test_a_grid_file_is_found_by_name(tmp_path, monkeypatch, capsys):
    from manynets.grid import main as grid_main

    monkeypatch.chdir(tmp_path)
    assert grid_main(["--config", "probe/grid_vgg"]) == 0
    assert capsys.readouterr().out.count("manynets fit --config") == 4


# -- the built wheel (slow) ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (pyproject.toml, README.md, manynets/)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "manynets", source / "manynets",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(root / "dist")], check=True, capture_output=True, text=True)
    (built,) = (root / "dist").glob("manynets-*.whl")
    return built


@pytest.mark.slow
def test_wheel_carries_every_shipped_config_and_no_tests(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in shipped_configs():
        assert f"manynets/configs/{config_name(path)}.yaml" in names, config_name(path)
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "docs/")) or "/tests/" in n]
    assert "manynets/cli.py" in names and "manynets/catalog.py" in names


@pytest.mark.slow
def test_installed_wheel_runs_a_shipped_config_by_name(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "work"  # no configs/ here: the names must come from the package
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "MPLBACKEND": "Agg"}

    def manynets(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "manynets", *args], cwd=work, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    where = subprocess.run([sys.executable, "-c", "import manynets; print(manynets.__file__)"], cwd=work,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where  # the unpacked wheel, not the working tree
    config = manynets("fit", "--config", "quickstart/digits", "--print_config")
    assert "DigitsDataModule" in config and "ClassifierModule" in config
    listing = manynets("list", "configs")
    assert "quickstart/digits" in listing and "superposition/cifar10_mimonet28-10_hrr_n4" in listing
