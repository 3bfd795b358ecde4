"""Every constructor checks its arguments' ranges: a bad config fails at instantiation, with a message
that names the argument as a config writes it (``model.init_args.alpha``,
``trainer.callbacks[Saturation].init_args.delta``, ``data.init_args.batch_size``), the bad value, what
was expected and the fix (ARCHITECTURE.md, "Contracts -> Errors")."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from manynets.callbacks import FeatureKernelTransfer, PCADeltaSweep, Saturation, SubspaceSweep
from manynets.datamodules import (
    CIFAR10DataModule,
    CIFARCorruptionsDataModule,
    DigitsDataModule,
    ImageNet32DataModule,
    TinyImageNetDataModule,
)
from manynets.errors import ConfigError
from manynets.lightning_modules import (
    CheckpointEnsembleModule,
    ClassifierModule,
    MixMoModule,
    PiNetModule,
    ProbeModule,
    SubspaceModule,
    SuperpositionModule,
)
from manynets.networks import MLP, VGG, CifarResNet, PiMLP, PreActResNet, ResNet, WideResNet

REPO = Path(__file__).resolve().parents[1]
TINY = partial(MLP, depth=1, width=8)
SHAPE = (1, 4, 4)
M, D, B = "model.init_args.", "data.init_args.", "model.init_args.backbone.init_args."


def module(cls, **kwargs):
    return cls(backbone=TINY, num_classes=3, image_shape=SHAPE, **kwargs)


def pinet(**kwargs):
    return PiNetModule(num_classes=3, image_shape=SHAPE, **{"backbone": partial(PiMLP, r=2, depth=1), **kwargs})


def scheduler_without_length(**kwargs):
    """OneCycleLR with no total_steps under ``trainer.max_epochs: -1`` (estimated steps: inf)."""
    model = module(ClassifierModule, lr_scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1), **kwargs)
    model._trainer = SimpleNamespace(max_epochs=-1, estimated_stepping_batches=float("inf"))
    return model.configure_optimizers()


def callback(name: str) -> str:
    return f"trainer.callbacks[{name}].init_args."


CASES = [
    # -- LightningModules --------------------------------------------------------------------
    (partial(module, MixMoModule), {"alpha": -1.0}, [M + "alpha", "-1.0", ">= 0"]),
    (partial(module, MixMoModule), {"num_members": 0}, [M + "num_members", "0"]),
    (partial(module, MixMoModule), {"cutmix_prob": 1.5}, [M + "cutmix_prob", "1.5", "[0, 1]"]),
    (partial(module, MixMoModule), {"msda_prob": 50.0}, [M + "msda_prob", "50.0", "0.5, not 50"]),
    (partial(module, MixMoModule), {"batch_repetitions": 0}, [M + "batch_repetitions", "0"]),
    (partial(module, MixMoModule), {"proba_input_repetition": -0.1}, [M + "proba_input_repetition", "-0.1"]),
    (partial(module, MixMoModule), {"l2_reg": -1e-4}, [M + "l2_reg", "-0.0001"]),
    (partial(module, MixMoModule), {"label_smoothing": 0.1}, [M + "label_smoothing", "0.1", "soft"]),
    (partial(module, SuperpositionModule), {"capacity": 0}, [M + "capacity", "0"]),
    (partial(module, SuperpositionModule), {"capacity": 4, "sup_low": 3}, [M + "sup_low", "3", "capacity = 4"]),
    (partial(module, SuperpositionModule), {"capacity": 4, "eval_n": [3]}, [M + "eval_n", "[3]", "[1, 2, 4]"]),
    (partial(module, SuperpositionModule), {"sup_frequency": 1.5}, [M + "sup_frequency", "1.5"]),
    (partial(module, SuperpositionModule), {"mixup_alpha": -1.0}, [M + "mixup_alpha", "-1.0"]),
    (partial(module, SuperpositionModule), {"bind_weight": -0.1}, [M + "bind_weight", "-0.1"]),
    (partial(module, SubspaceModule), {"kind": "simplex", "num_vertices": 10}, [M + "num_vertices", "10", "2..9"]),
    (partial(module, SubspaceModule), {"kind": "line", "num_vertices": 3}, [M + "num_vertices", "3", "simplex"]),
    (partial(module, SubspaceModule), {"num_samples": 0}, [M + "num_samples", "0"]),
    (partial(module, SubspaceModule), {"beta": -1.0}, [M + "beta", "-1.0"]),
    (partial(module, SubspaceModule), {"bn_batches": 0}, [M + "bn_batches", "0"]),
    (pinet, {"backbone": TINY}, [M + "backbone", "'MLP'", "PiMLP"]),
    (pinet, {"gclip": -1.0}, [M + "gclip", "-1.0"]),
    (pinet, {"bias_lr_mult": -0.5}, [M + "bias_lr_mult", "-0.5"]),
    (pinet, {"optimizer": torch.optim.SGD}, [M + "optimizer", "'SGD'", "PiSGD"]),
    (partial(module, ProbeModule), {"layers": "body["}, [M + "layers", "'body['", "regular expression"]),
    (partial(module, ProbeModule), {"types": ["Conv2D"]}, [M + "types", "'Conv2D'", "Conv2d"]),
    (partial(module, ProbeModule), {"C": 0.0}, [M + "C", "0.0", "> 0"]),
    (partial(module, ProbeModule), {"reference_solver": "newton"}, [M + "reference_solver", "'newton'", "saga"]),
    (partial(module, ProbeModule), {"pool_size": 0}, [M + "pool_size", "0"]),
    (partial(module, ClassifierModule), {"label_smoothing": 1.0}, [M + "label_smoothing", "1.0", "[0, 1)"]),
    (partial(module, ClassifierModule), {"warmup_steps": -1}, [M + "warmup_steps", "-1"]),
    (partial(module, ClassifierModule), {"warmup_epochs": -2}, [M + "warmup_epochs", "-2"]),
    (partial(module, ClassifierModule), {"warmup_steps": 10, "warmup_epochs": 2}, [M + "warmup_epochs", "not both"]),
    (partial(module, ClassifierModule), {"scheduler_interval": "steps"}, [M + "scheduler_interval", "'steps'"]),
    (partial(ClassifierModule, num_classes=3, image_shape=SHAPE), {"backbone": lambda n, shape: torch.nn.Linear(2, n)},
     [M + "backbone = torch.nn.modules.linear.Linear", "expected a manynets.networks.Backbone", "subclass"]),
    (partial(module, CheckpointEnsembleModule), {"checkpoints": []}, [M + "checkpoints", "[]"]),
    (scheduler_without_length, {}, ["trainer.max_epochs = -1", "OneCycleLR", "lr_scheduler.init_args.total_steps"]),
    # -- callbacks -------------------------------------------------------------------------
    (Saturation, {"delta": 99.0}, [callback("Saturation") + "delta", "99.0", "0.99, not 99"]),
    (Saturation, {"delta": 0.0}, [callback("Saturation") + "delta", "0.0", "(0, 1]"]),
    (Saturation, {"layers": "("}, [callback("Saturation") + "layers", "'('", "regular expression"]),
    (Saturation, {"types": ["Conv"]}, [callback("Saturation") + "types", "'Conv'"]),
    (Saturation, {"every_n_batches": 0}, [callback("Saturation") + "every_n_batches", "0"]),
    (Saturation, {"modes": ["val"]}, [callback("Saturation") + "modes", "'val'", "'eval'"]),
    (Saturation, {"downsampling": 0}, [callback("Saturation") + "downsampling", "0"]),
    (PCADeltaSweep, {"deltas": [0.9, -1.0]}, [callback("PCADeltaSweep") + "deltas", "-1.0"]),
    (PCADeltaSweep, {"layers": "*"}, [callback("PCADeltaSweep") + "layers", "'*'"]),
    (SubspaceSweep, {"num_alphas": 1}, [callback("SubspaceSweep") + "num_alphas", "1", ">= 2"]),
    (SubspaceSweep, {"num_random_points": 1}, [callback("SubspaceSweep") + "num_random_points", "1"]),
    (SubspaceSweep, {"points_per_pass": 0}, [callback("SubspaceSweep") + "points_per_pass", "0"]),
    (partial(FeatureKernelTransfer, DigitsDataModule()), {"every_n_epochs": 0},
     [callback("FeatureKernelTransfer") + "every_n_epochs", "0"]),
    (partial(FeatureKernelTransfer, DigitsDataModule()), {"regs": [-1.0]},
     [callback("FeatureKernelTransfer") + "regs", "-1.0"]),
    # -- data modules ----------------------------------------------------------------------
    (DigitsDataModule, {"batch_size": 0}, [D + "batch_size", "0", ">= 1"]),
    (DigitsDataModule, {"eval_batch_size": 0}, [D + "eval_batch_size", "0"]),
    (DigitsDataModule, {"val_split": 1.5}, [D + "val_split", "1.5", "[0, 1)"]),
    (DigitsDataModule, {"val_split": -1}, [D + "val_split", "-1"]),
    (DigitsDataModule, {"num_workers": -1}, [D + "num_workers", "-1"]),
    (DigitsDataModule, {"channels": 2}, [D + "channels", "2"]),
    (DigitsDataModule, {"test_size": 0}, [D + "test_size", "0"]),
    (DigitsDataModule, {"mean": (0.1, 0.2)}, [D + "mean", "(0.1, 0.2)", "3 (one per channel)"]),
    (CIFAR10DataModule, {"label_noise": 20.0}, [D + "label_noise", "20.0", "0.2, not 20"]),
    (CIFAR10DataModule, {"std": (0.2, 0.0, 0.2)}, [D + "std", "(0.2, 0.0, 0.2)"]),
    (CIFAR10DataModule, {"resolution": 0}, [D + "resolution", "0"]),
    (CIFARCorruptionsDataModule, {"severities": [6]}, [D + "severities", "[6]", "1..5"]),
    (CIFARCorruptionsDataModule, {"corruptions": ["fogg"]}, [D + "corruptions", "'fogg'"]),
    (ImageNet32DataModule, {"num_classes_subset": 0}, [D + "num_classes_subset", "0", "1..1000"]),
    (TinyImageNetDataModule, {"std": (0.0, 0.0, 0.0)}, [D + "std", "(0.0, 0.0, 0.0)"]),
    # -- backbones -------------------------------------------------------------------------
    (partial(WideResNet, 10), {"depth": 27}, [B + "depth", "27", "6n+4"]),
    (partial(WideResNet, 10), {"depth": 10, "width": 0}, [B + "width", "0"]),
    (partial(WideResNet, 10), {"depth": 10, "width": 1, "dropout": 1.0}, [B + "dropout", "1.0"]),
    (partial(WideResNet, 10), {"depth": 10, "width": 1, "stem_stride": 0}, [B + "stem_stride", "0"]),
    (partial(PreActResNet, 10), {"depth": 50}, [B + "depth", "50", "[18, 34]"]),
    (partial(ResNet, 10), {"width_divisor": 3}, [B + "width_divisor", "3", "divisor of 64"]),
    (partial(ResNet, 10), {"blocks": (1, 0)}, [B + "blocks", "(1, 0)"]),
    (partial(CifarResNet, 10), {"depth": 21}, [B + "depth", "21", "6n+2"]),
    (partial(CifarResNet, 10), {"width": 0}, [B + "width", "0"]),
    (partial(VGG, 10), {"depth": 12}, [B + "depth", "12"]),
    (partial(VGG, 10), {"dropout": -0.1}, [B + "dropout", "-0.1"]),
    (partial(MLP, 10), {"depth": 0}, [B + "depth", "0"]),
    (partial(PiMLP, 10), {"width": -1}, [B + "width", "-1"]),
    (partial(PiMLP, 10), {"r": 0}, [B + "r = 0"]),
    (partial(PiMLP, 10), {"state_dtype": "float64"}, [B + "state_dtype", "'float64'"]),
]


def _id(case) -> str:
    factory, kwargs, _ = case
    while isinstance(factory, partial):
        factory = factory.args[0] if factory.func is module else factory.func
    return f"{getattr(factory, '__name__', 'factory')}-{'-'.join(kwargs) or 'default'}"


@pytest.mark.parametrize("factory, kwargs, expected", CASES, ids=[_id(c) for c in CASES])
def test_bad_argument_fails_in_constructor_naming_it(factory, kwargs, expected):
    with pytest.raises(ConfigError) as err:
        factory(**kwargs)
    message = str(err.value)
    for part in expected:
        assert part in message, f"{part!r} not in: {message}"


def test_config_errors_stay_value_errors():
    """``pytest.raises(ValueError)`` and ``except ValueError`` keep working for callers."""
    with pytest.raises(ValueError, match="alpha"):
        module(MixMoModule, alpha=-1.0)


def test_bad_value_fails_through_the_cli_before_training(tmp_path, capsys):
    from manynets.cli import main

    args = ["fit", "--config", str(REPO / "configs" / "quickstart" / "mixmo_digits.yaml"),
            "--model.init_args.alpha=-1", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"]  # fmt: skip
    with pytest.raises((SystemExit, ValueError)) as err:  # ConfigError, possibly wrapped by jsonargparse
        main(args)
    if isinstance(err.value, SystemExit):
        assert err.value.code not in (0, None)
        assert "alpha" in capsys.readouterr().err
    else:
        assert "model.init_args.alpha = -1" in str(err.value)
    assert not list(tmp_path.rglob("*.ckpt"))  # failed before training
