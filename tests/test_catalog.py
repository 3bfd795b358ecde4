"""``manynets list``: every exported class and shipped config, one line each, within 100 columns."""

from __future__ import annotations

import contextlib
import io

import lightning.pytorch as pl
import pytest

import manynets.callbacks
import manynets.datamodules
import manynets.lightning_modules
import manynets.networks
import manynets.shipped_configs
from manynets.catalog import SECTIONS, WIDTH, exported_classes, main, summary
from manynets.shipped_configs import config_name, shipped_configs


@pytest.fixture(scope="module")
def listing():
    """The exit status and output of ``manynets list`` (all sections), run once for the module."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([])
    return code, out.getvalue()


def _section(text: str, title_start: str) -> str:
    return next(block for block in text.split("\n\n") if block.startswith(title_start))


def test_all_sections_within_100_columns(listing):
    code, text = listing
    assert code == 0
    for title in ("methods", "backbones", "data modules", "callbacks", "shipped configs"):
        assert any(line.startswith(title) for line in text.splitlines()), title
    assert max(len(line) for line in text.splitlines()) <= WIDTH


def test_every_exported_class_is_listed_with_its_description(listing):
    text = listing[1]
    kinds = {
        "methods": exported_classes(manynets.lightning_modules, manynets.lightning_modules.ClassifierModule),
        "backbones": exported_classes(manynets.networks, manynets.networks.Backbone),
        "data modules": exported_classes(manynets.datamodules, manynets.datamodules.ImageDataModule),
        "callbacks": exported_classes(manynets.callbacks, pl.Callback),
    }
    for title, classes in kinds.items():
        block = _section(text, title)
        names = [line.split()[0] for line in block.splitlines()[1:] if line.startswith("  ") and line[2] != " "]
        bases = {manynets.networks.Backbone, manynets.datamodules.ImageDataModule}
        assert set(names) == {c.__name__ for c in classes if c not in bases}, title
        for cls in classes:
            if cls not in bases:
                assert summary(cls).split()[0] in block
    assert "Saturation" in _section(text, "callbacks")


def test_methods_show_their_paper(listing):
    block = _section(listing[1], "methods")
    assert "paper: Menet et al., NeurIPS 2023" in block
    for cls in exported_classes(manynets.lightning_modules, manynets.lightning_modules.ClassifierModule):
        assert cls is manynets.lightning_modules.ClassifierModule or cls.PAPER, f"{cls.__name__} has no PAPER"


def test_every_shipped_config_is_listed_under_its_method(listing):
    block = _section(listing[1], "shipped configs")
    lines = block.splitlines()
    for path in shipped_configs():
        assert any(line.startswith(f"    {config_name(path)}  ") for line in lines), config_name(path)
    digits = next(i for i, line in enumerate(lines) if line.startswith("    quickstart/digits  "))
    group = next(line for line in reversed(lines[:digits]) if line.startswith("  ") and line[2] != " ")
    assert group.strip() == "ClassifierModule"


def test_published_numbers_reach_configs_and_methods(tmp_path, monkeypatch, capsys):
    (tmp_path / "sup").mkdir()
    (tmp_path / "sup" / "a.yaml").write_text(
        "# Superposition on something, N = 2.\n"
        '# published: {metric: test/acc, value: 0.9123, source: "Some et al., Table 9"}\n'
        "model:\n  class_path: manynets.lightning_modules.SuperpositionModule\n"
    )
    (tmp_path / "sup" / "b.yaml").write_text("# No number here.\nmodel:\n  class_path: MixMoModule\n")
    (tmp_path / "sup" / "grid_x.yaml").write_text("# A grid.\nconfigs: [sup/a]\ngrid:\n  seed_everything: [1, 2]\n")
    monkeypatch.setattr(manynets.shipped_configs, "config_root", lambda: tmp_path)
    assert main(["methods", "configs"]) == 0
    text = capsys.readouterr().out
    assert "published: test/acc = 0.9123 (Some et al., Table 9)" in text
    methods = _section(text, "methods")
    superposition = methods[methods.index("  SuperpositionModule"):].splitlines()
    assert superposition[2].strip() == "published: test/acc 0.9123 in 1 config"
    mixmo = methods[methods.index("  MixMoModule"):].splitlines()
    assert mixmo[2].strip() == "published: none"
    configs = _section(text, "shipped configs").splitlines()
    assert configs.index("  MixMoModule") < configs.index("    sup/b  No number here.")
    assert any(line.startswith("  grid files") for line in configs)


def test_one_section_and_a_wrong_section(capsys):
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("backbones") and "WideResNet" in out and "methods" not in out
    assert main(["models"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("manynets: error:") and "'models'" in err
    assert all(name in err for name in SECTIONS)
