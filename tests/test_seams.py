"""Every method on every backbone (ARCHITECTURE.md, "The one idea"; timm's test_models pattern).

Each (method, backbone) pair runs one training step and one validation batch on the bundled digits with
the :class:`~manynets.callbacks.Saturation` callback attached, all with one shared Trainer configuration
(``fast_dev_run=1``). The backbones are the :class:`~manynets.networks.Backbone` subclasses listed in
``manynets.networks.__all__``, so a new backbone is tested without editing this file: :data:`TINY` gives
known classes small options (an unknown class is built with its defaults on 32 px images). The π-net
module runs on :class:`~manynets.networks.PiMLP` of infinite (``width: 0``) and finite width.

A pair that does not apply is listed in :data:`NOT_APPLICABLE` with its reason (pytest reports it as a
skip with that reason); nothing is skipped silently.
"""

from __future__ import annotations

import functools
import inspect
import math

import lightning.pytorch as pl
import pytest
import torch

from manynets import networks
from manynets.callbacks import Saturation
from manynets.datamodules.digits import DigitsDataModule
from manynets.layers.pi_optim import PiSGD
from manynets.lightning_modules import (
    CheckpointEnsembleModule,
    ClassifierModule,
    MixMoModule,
    PiNetModule,
    SubspaceModule,
    SuperpositionModule,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TRAINER = dict(fast_dev_run=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
               enable_model_summary=False)  # fmt: skip
"""One training step and one validation batch (``fast_dev_run``), for every pair."""

BATCH = 8

TINY: dict[str, tuple[dict, int]] = {
    "CifarResNet": ({"depth": 8, "width": 4}, 8),
    "MLP": ({"depth": 2, "width": 8}, 8),
    "PiMLP": ({"r": 4, "depth": 2, "width": 8, "seed": 0}, 8),
    "PreActResNet": ({"depth": 18, "width": 1}, 8),  # 64 channels at least: the smallest there is
    "ResNet": ({"depth": 18, "stem": "cifar", "width_divisor": 16}, 8),
    "VGG": ({"depth": 11, "width_divisor": 16, "head": "linear"}, 32),  # five 2x2 pools need 32 px
    "WideResNet": ({"depth": 10, "width": 1}, 8),
}
"""Backbone class name -> (tiny options, image side in pixels)."""
DEFAULT: tuple[dict, int] = ({}, 32)

INFINITE_PIMLP = "PiMLP(width=0)"
"""The infinite-width π-net, an extra backbone case beside the classes (finite ``PiMLP`` options in TINY)."""


def backbone_classes() -> dict[str, type]:
    """The Backbone subclasses exported by ``manynets.networks``."""
    found = {}
    for name in networks.__all__:
        obj = getattr(networks, name)
        if inspect.isclass(obj) and issubclass(obj, networks.Backbone) and obj is not networks.Backbone:
            found[name] = obj
    return found


def backbone_cases() -> dict[str, tuple[functools.partial, int]]:
    """Case name -> (backbone factory, image side)."""
    cases = {}
    for name, cls in backbone_classes().items():
        options, side = TINY.get(name, DEFAULT)
        cases[name] = (functools.partial(cls, **options), side)
    if "PiMLP" in cases:
        options, side = TINY["PiMLP"]
        cases[INFINITE_PIMLP] = (functools.partial(networks.PiMLP, **{**options, "width": 0}), side)
    return cases


METHODS = {
    "classifier": lambda backbone, shape, ckpts: ClassifierModule(backbone, 10, shape),
    "superposition": lambda backbone, shape, ckpts: SuperpositionModule(backbone, 10, shape, capacity=2),
    "mixmo": lambda backbone, shape, ckpts: MixMoModule(backbone, 10, shape, num_members=2, batch_repetitions=2),
    "subspaces": lambda backbone, shape, ckpts: SubspaceModule(backbone, 10, shape, kind="line"),
    "ensemble": lambda backbone, shape, ckpts: CheckpointEnsembleModule(backbone, 10, shape, checkpoints=ckpts()),
}
"""Method -> builder(backbone, image shape, checkpoints()) of its module at tiny settings."""

_PI = "the infinite-width π-net trains only with π-SGD (PiNetModule, which appends rows to its layers)"
NOT_APPLICABLE = {
    ("classifier", INFINITE_PIMLP): _PI,
    ("superposition", INFINITE_PIMLP): _PI,
    ("mixmo", INFINITE_PIMLP): _PI + "; MixMo also copies and re-draws stems and heads made of Linear layers",
    ("subspaces", INFINITE_PIMLP): _PI + "; subspaces turn Conv/Linear/BN layers into subspace layers and "
                                         "an infinite π-layer is none of them",
    ("ensemble", INFINITE_PIMLP): "its members are ClassifierModule checkpoints, and " + _PI,
}
"""(method, backbone case) -> why the pair does not apply."""

TRAINS = {"classifier", "superposition", "mixmo", "subspaces"}
"""Methods with a training step; the checkpoint ensemble only evaluates trained members."""


def pairs() -> list:
    out = []
    for backbone in backbone_cases():
        for method in METHODS:
            reason = NOT_APPLICABLE.get((method, backbone))
            marks = [pytest.mark.skip(reason=f"not applicable: {reason}")] if reason else []
            out.append(pytest.param(method, backbone, marks=marks, id=f"{method}-{backbone}"))
    return out


@pytest.fixture(scope="module")
def digits():
    cache: dict[int, DigitsDataModule] = {}

    def get(side: int) -> DigitsDataModule:
        if side not in cache:
            cache[side] = DigitsDataModule(size=side, channels=3, batch_size=BATCH, eval_batch_size=BATCH,
                                           augment=False)  # fmt: skip
        return cache[side]

    return get


@pytest.fixture(scope="module")
def ensemble_checkpoints(tmp_path_factory, digits):
    """Backbone case -> paths of two ClassifierModule checkpoints, each trained one step (built on first use)."""
    cache: dict[str, list[str]] = {}

    def get(case: str) -> list[str]:
        if case not in cache:
            backbone, side = backbone_cases()[case]
            directory = tmp_path_factory.mktemp(f"members-{case}")
            cache[case] = []
            for seed in range(2):
                torch.manual_seed(seed)
                member = ClassifierModule(backbone, 10, (3, side, side))
                pl.Trainer(**TRAINER, default_root_dir=directory).fit(member, datamodule=digits(side))
                cache[case].append(str(directory / f"member{seed}.ckpt"))
                torch.save({"state_dict": member.state_dict()}, cache[case][-1])  # the weights of a fit's checkpoint
        return cache[case]

    return get


def _saturation(tmp_path) -> Saturation:
    return Saturation(dirpath=str(tmp_path), plot=False)


def _tracked(callback: Saturation, mode: str) -> dict[str, float]:
    """Saturation per layer of the last finished epoch (its CSV row)."""
    return {k: v for k, v in (getattr(callback, "last", None) or {}).items() if k.startswith(f"saturation/{mode}/")}


@pytest.mark.parametrize("method, backbone", pairs())
def test_method_runs_on_backbone(method, backbone, digits, ensemble_checkpoints, tmp_path):
    factory, side = backbone_cases()[backbone]
    module = METHODS[method](factory, (3, side, side), lambda: ensemble_checkpoints(backbone))
    saturation_callback = _saturation(tmp_path)
    trainer = pl.Trainer(**TRAINER, default_root_dir=tmp_path, callbacks=[saturation_callback])
    if method in TRAINS:
        trainer.fit(module, datamodule=digits(side))
        metrics = trainer.callback_metrics
        assert math.isfinite(metrics["train/loss"].item())
        saturation = _tracked(saturation_callback, "train")
        assert saturation, f"Saturation tracked no layer of {method} on {backbone}"
        assert all(0.0 <= v <= 1.0 for v in saturation.values()), saturation
    else:
        trainer.validate(module, datamodule=digits(side), verbose=False)
        metrics = trainer.callback_metrics
    assert 0.0 <= metrics["val/acc"].item() <= 1.0
    assert math.isfinite(metrics["val/nll"].item())


@pytest.mark.parametrize("width", [0, 8])
def test_pinet_module_on_pimlp(width, digits, tmp_path):
    if not hasattr(networks, "PiMLP"):
        pytest.skip("manynets.networks.PiMLP does not exist yet")
    options, side = TINY["PiMLP"]
    backbone = functools.partial(networks.PiMLP, **{**options, "width": width})
    module = PiNetModule(backbone, 10, (3, side, side), optimizer=functools.partial(PiSGD, lr=0.1))
    saturation_callback = _saturation(tmp_path)
    trainer = pl.Trainer(**TRAINER, default_root_dir=tmp_path, callbacks=[saturation_callback])
    trainer.fit(module, datamodule=digits(side))
    metrics = trainer.callback_metrics
    assert math.isfinite(metrics["train/loss"].item()) and 0.0 <= metrics["val/acc"].item() <= 1.0
    saturation = _tracked(saturation_callback, "train")
    assert saturation and all(0.0 <= v <= 1.0 for v in saturation.values()), saturation


def test_every_backbone_class_is_a_case():
    """The cases follow the package: each exported Backbone subclass is tested, the infinite π-net besides."""
    cases = backbone_cases()
    assert set(backbone_classes()) <= set(cases)
    assert {"WideResNet", "MLP"} <= set(cases)
    assert all(backbone in cases and method in METHODS for method, backbone in NOT_APPLICABLE)
