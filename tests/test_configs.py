"""Every shipped LightningCLI config parses and instantiates (run=False: no data is read)."""

from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(
    p for p in (REPO / "configs").rglob("*.yaml") if "model" in (yaml.safe_load(p.read_text()) or {})
)


def test_configs_are_found():
    assert any(p.parent.name == "quickstart" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_config_instantiates(path, tmp_path):
    from manynets.cli import ManynetsCLI
    from manynets.datamodules.base import ImageDataModule
    from manynets.lightning_modules import ClassifierModule

    with torch.device("meta"):  # real classes and shapes, no memory or init cost for 36M-parameter nets
        cli = ManynetsCLI(
            args=["--config", str(path), f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"],
            run=False,
        )
    assert isinstance(cli.model, ClassifierModule)
    assert isinstance(cli.datamodule, ImageDataModule)
    assert cli.model.num_classes == cli.datamodule.num_classes
    assert tuple(cli.model.image_shape) == tuple(cli.datamodule.image_shape)
    header = path.read_text().lstrip().splitlines()[0]
    assert header.startswith("#"), "each config opens with a comment citing its paper row / purpose"
