"""PiNetModule: groups, clip schedule, checkpoints through Lightning, shipped configs and the CLI."""

import functools
import inspect
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from manynets.callbacks.feature_kernel import FeatureKernelTransfer
from manynets.cli import ManynetsCLI
from manynets.datamodules.digits import DigitsDataModule
from manynets.layers.pi_optim import PiSGD
from manynets.lightning_modules.pinet import (
    MOVED_OPTIONS,
    PiNetModule,
    upgrade_hyperparameters,
    upgrade_state_dict,
)
from manynets.networks import MLP, PiMLP

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "pinet").glob("*.yaml")) + [ROOT / "configs" / "quickstart" / "pinet_digits.yaml"]


def tiny_module(width=0, **kw):
    defaults = dict(num_classes=10, image_shape=(1, 8, 8), gclip=0.4, gclip_per_param=True,
                    backbone=functools.partial(PiMLP, r=6, depth=2, width=width, seed=0),
                    optimizer=functools.partial(PiSGD, lr=0.5, weight_decay=1e-3))  # fmt: skip
    defaults.update(kw)
    return PiNetModule(**defaults)


def tiny_trainer(tmp_path, epochs=2, **kw):
    return pl.Trainer(max_epochs=epochs, limit_train_batches=3, limit_val_batches=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      accelerator="cpu", **kw)  # fmt: skip


def test_parameter_groups_multipliers():
    m = tiny_module(first_layer_lr_mult=0.1, last_layer_lr_mult=4.0, bias_lr_mult=0.5, apply_lr_mult_to_wd=False)
    groups = m.parameter_groups()
    net = m.network
    assert groups[0]["params"] == [net.stem[1].A1] and groups[0]["lr_mult"] == 0.1
    assert groups[0]["wd_mult"] == pytest.approx(10.0)  # decay factor 1 - lr wd for every group
    assert len(groups[1]["params"]) == 3 and groups[1]["lr_mult"] == 0.5
    assert groups[2]["params"] == [net.body[0].Amult] and groups[2]["lr_mult"] == 1.0
    assert groups[3]["params"] == [net.head.Amult] and groups[3]["wd_mult"] == pytest.approx(0.25)
    fin = tiny_module(width=32)
    groups = fin.parameter_groups()
    assert not fin.network.infinite and len(groups) == 4
    assert groups[0]["params"] == [fin.network.stem[1].linear.weight]
    assert groups[3]["params"] == [fin.network.head[1].linear.weight]


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="model.init_args.backbone.*PiMLP"):
        tiny_module(backbone=functools.partial(MLP, depth=1, width=8))
    with pytest.raises(ValueError, match="model.init_args.backbone"):
        tiny_module(backbone=lambda n, s: torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="model.init_args.backbone.init_args.width"):
        tiny_module(width=-1)
    with pytest.raises(ValueError, match="PiSGD"):
        tiny_module(optimizer=torch.optim.SGD)
    with pytest.raises(TypeError, match="'r'"):
        tiny_module(r=6)  # moved to the backbone (MOVED_OPTIONS)


def test_moved_options_name_existing_backbone_arguments():
    params = inspect.signature(PiMLP.__init__).parameters
    module_params = inspect.signature(PiNetModule.__init__).parameters
    assert len(MOVED_OPTIONS) == 14
    for old, new in MOVED_OPTIONS.items():
        assert old.startswith("model.init_args.") and new.startswith("model.init_args.backbone.init_args.")
        assert old.rsplit(".", 1)[1] not in module_params and new.rsplit(".", 1)[1] in params
    old = {"backbone": None, "num_classes": 10, "r": 100, "depth": 2, "init_seed": 3, "gclip": 0.4}
    assert upgrade_hyperparameters(old) == {
        "num_classes": 10, "gclip": 0.4,
        "backbone": {"class_path": "manynets.networks.PiMLP", "init_args": {"r": 100, "depth": 2, "seed": 3}},
    }  # fmt: skip


# Keys of the state dicts written before the PiMLP backbone (InfMLP, FinPiMLP), by hand:
# old key -> (index in PiMLP.layers(), key in that layer's state dict) for depth 2.
_STATE = ("A", "B", "Amult", "bias")
OLD_KEYS = {
    0: {"input.A1": (0, "A1"), "input.bias": (0, "bias"), **{f"hidden.0.{k}": (1, k) for k in _STATE},
        **{f"output.{k}": (2, k) for k in _STATE}},
    16: {"omega0": (0, "omega"), "gcovinv0": (0, "gcovinv"), "omega1": (1, "omega"), "gcovinv1": (1, "gcovinv"),
         **{f"linears.{l}.weight": (l, "linear.weight") for l in range(3)},
         **{f"linears.{l}.bias": (l, "bias") for l in range(3)}},
}  # fmt: skip


@pytest.mark.parametrize("width", [0, 16], ids=["infinite", "finite"])
def test_old_state_dicts_load(width):
    """A state dict with the pre-backbone key names loads into the PiMLP module and gives the same outputs."""
    trained = tiny_module(width=width)
    with torch.no_grad():  # every tensor distinct, so a wrong mapping cannot go unnoticed
        for p in trained.network.parameters():
            p.add_(torch.randn_like(p.float()).to(p.dtype))
    layers = trained.network.layers()
    state = {f"network.{old}": layers[i].state_dict()[key].clone() for old, (i, key) in OLD_KEYS[width].items()}
    new_keys = sorted(k for k in trained.state_dict() if k.startswith("network."))
    assert sorted(upgrade_state_dict(dict(state))) == new_keys
    fresh = tiny_module(width=width, backbone=functools.partial(PiMLP, r=6, depth=2, width=width, seed=1))
    fresh.load_state_dict(state, strict=False)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), trained.eval()(x))


def test_fit_grows_state_clip_drops_and_checkpoint_roundtrip(tmp_path):
    data = DigitsDataModule(size=8, channels=1, batch_size=8, augment=False)
    sched = functools.partial(torch.optim.lr_scheduler.MultiStepLR, milestones=[1], gamma=0.15)
    backbone = functools.partial(PiMLP, r=6, depth=2, seed=0, block_size=16)  # the state spans blocks
    model = tiny_module(lr_scheduler=sched, scheduler_interval="epoch", backbone=backbone)
    kernel_data = DigitsDataModule(size=8, channels=1, batch_size=100, augment=False)
    transfer = FeatureKernelTransfer(kernel_data, regs=[1e-3], every_n_epochs=2, max_train=500)
    trainer = tiny_trainer(tmp_path, callbacks=[transfer])
    trainer.fit(model, data)
    assert trainer.callback_metrics["transfer/acc"].item() > 0.3  # ridge on r=6 features of digits (chance 0.1)
    assert model.network.head.num_rows == 6 + 8 * 3 * 2 == model.network.body[0].num_rows
    assert model.current_gclip() == pytest.approx(0.4 * 0.15)  # clip follows the lr drop (paper)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        out = model.eval()(x)
    fresh = PiNetModule.load_from_checkpoint(ckpt, weights_only=False)  # hparams hold callables outside the CLI
    assert fresh.network.head.num_rows == 54 and len(fresh.network.head.state_blocks("A")) == 4
    for name in ("A", "B", "Amult"):
        assert torch.equal(fresh.network.head.state_tensor(name), model.network.head.state_tensor(name))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), out)


def test_finite_fit_projects_and_learns(tmp_path):
    data = DigitsDataModule(size=8, channels=1, batch_size=16, augment=False)
    model = tiny_module(width=48, gclip=0.0)
    w0 = model.network.layers()[1].linear.weight.detach().clone()
    tiny_trainer(tmp_path, epochs=1).fit(model, data)
    delta = model.network.layers()[1].linear.weight.detach() - w0
    omega = model.network.layers()[1].omega
    assert delta.abs().max() > 0
    assert torch.allclose(omega @ torch.linalg.pinv(omega) @ delta, delta, atol=1e-5)  # updates stay in span(Omega)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_instantiate(config, tmp_path):
    args = ["--config", str(config), "--data=manynets.datamodules.digits.DigitsDataModule",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"]  # fmt: skip
    cli = ManynetsCLI(args=args, run=False)
    model = cli.model
    assert isinstance(model, PiNetModule)
    assert isinstance(model.network, PiMLP)
    model.trainer = cli.trainer
    opt = model.configure_optimizers()
    assert isinstance(opt["optimizer"] if isinstance(opt, dict) else opt, PiSGD)


@pytest.mark.slow
def test_cli_fit_then_test(tmp_path):
    config = ROOT / "configs" / "quickstart" / "pinet_digits.yaml"
    common = ["--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"]
    fit = [sys.executable, "-m", "manynets", "fit", "--config", str(config), *common, "--trainer.max_epochs=1",
           "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2", f"--checkpoint.dirpath={tmp_path}/ckpt"]  # fmt: skip
    done = subprocess.run(fit, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "π-net: after 3 steps of batch 32" in done.stdout + done.stderr
    test = [sys.executable, "-m", "manynets", "test", "--config", str(config), *common,
            "--trainer.limit_test_batches=1", "--ckpt_path", f"{tmp_path}/ckpt/last.ckpt"]  # fmt: skip
    done = subprocess.run(test, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test/acc" in done.stdout
