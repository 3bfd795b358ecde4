"""Every shipped LightningCLI config parses and instantiates (run=False: no data is read), and names its
classes in one style."""

import importlib
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
ALL_YAML = sorted((REPO / "configs").rglob("*.yaml"))
CONFIGS = [p for p in ALL_YAML if "model" in (yaml.safe_load(p.read_text()) or {})]


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


def class_paths(node):
    """Every ``class_path`` value in a parsed YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "class_path":
                yield value
            yield from class_paths(value)
    elif isinstance(node, list):
        for value in node:
            yield from class_paths(value)


@pytest.mark.parametrize("path", ALL_YAML, ids=[str(p.relative_to(REPO / "configs")) for p in ALL_YAML])
def test_class_paths_are_the_public_import_paths(path):
    """One style: the shortest public path that exports the class (``manynets.<package>.<Name>``,
    ``torch.optim.SGD``), never the private module that defines it (``manynets.networks.wide_resnet.WideResNet``,
    ``torch.optim.sgd.SGD``)."""
    for class_path in class_paths(yaml.safe_load(path.read_text())):
        module_name, _, name = class_path.rpartition(".")
        assert not any(part.startswith("_") for part in class_path.split(".")), f"{path.name}: {class_path} is private"
        obj = getattr(importlib.import_module(module_name), name)
        parts = module_name.split(".")
        for k in range(1, len(parts)):
            parent = ".".join(parts[:k])
            assert getattr(importlib.import_module(parent), name, None) is not obj, (
                f"{path.name}: write {parent}.{name}, not {class_path}"
            )
        if parts[0] == "manynets":
            assert len(parts) == 2, f"{path.name}: {class_path}: manynets classes are named manynets.<package>.{name}"
