"""PiNetModule: groups, clip schedule, checkpoints through Lightning, shipped configs and the CLI."""

import functools
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from manynets.callbacks.feature_kernel import FeatureKernelTransfer
from manynets.cli import ManynetsCLI
from manynets.datamodules.digits import DigitsDataModule
from manynets.layers.pi_finite import FinPiMLP
from manynets.layers.pi_mlp import InfMLP
from manynets.layers.pi_optim import PiSGD
from manynets.lightning_modules.pinet import PiNetModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "pinet").glob("*.yaml")) + [ROOT / "configs" / "quickstart" / "pinet_digits.yaml"]


def tiny_module(**kw):
    defaults = dict(num_classes=10, image_shape=(1, 8, 8), r=6, depth=2, gclip=0.4, gclip_per_param=True,
                    optimizer=functools.partial(PiSGD, lr=0.5, weight_decay=1e-3), init_seed=0)  # fmt: skip
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
    assert groups[0]["params"] == [net.input.A1] and groups[0]["lr_mult"] == 0.1
    assert groups[0]["wd_mult"] == pytest.approx(10.0)  # decay factor 1 - lr wd for every group
    assert len(groups[1]["params"]) == 3 and groups[1]["lr_mult"] == 0.5
    assert groups[2]["params"] == [net.hidden[0].Amult] and groups[2]["lr_mult"] == 1.0
    assert groups[3]["params"] == [net.output.Amult] and groups[3]["wd_mult"] == pytest.approx(0.25)
    fin = tiny_module(width=32)
    assert isinstance(fin.network, FinPiMLP) and len(fin.parameter_groups()) == 4


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="remove model.init_args.backbone"):
        tiny_module(backbone=lambda n, s: torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="width"):
        tiny_module(width=-1)
    with pytest.raises(ValueError, match="PiSGD"):
        tiny_module(optimizer=torch.optim.SGD)


def test_fit_grows_state_clip_drops_and_checkpoint_roundtrip(tmp_path):
    data = DigitsDataModule(size=8, channels=1, batch_size=8, augment=False)
    sched = functools.partial(torch.optim.lr_scheduler.MultiStepLR, milestones=[1], gamma=0.15)
    model = tiny_module(lr_scheduler=sched, scheduler_interval="epoch")
    kernel_data = DigitsDataModule(size=8, channels=1, batch_size=100, augment=False)
    transfer = FeatureKernelTransfer(kernel_data, regs=[1e-3], every_n_epochs=2, max_train=500)
    trainer = tiny_trainer(tmp_path, callbacks=[transfer])
    trainer.fit(model, data)
    assert trainer.callback_metrics["transfer/acc"].item() > 0.3  # ridge on r=6 features of digits (chance 0.1)
    assert model.network.output.num_rows == 6 + 8 * 3 * 2 == model.network.hidden[0].num_rows
    assert model.current_gclip() == pytest.approx(0.4 * 0.15)  # clip follows the lr drop (paper)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        out = model.eval()(x)
    fresh = PiNetModule.load_from_checkpoint(ckpt, weights_only=False)  # hparams hold callables outside the CLI
    assert fresh.network.output.num_rows == 54
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), out)


def test_finite_fit_projects_and_learns(tmp_path):
    data = DigitsDataModule(size=8, channels=1, batch_size=16, augment=False)
    model = tiny_module(width=48, gclip=0.0)
    w0 = model.network.linears[1].weight.detach().clone()
    tiny_trainer(tmp_path, epochs=1).fit(model, data)
    delta = model.network.linears[1].weight.detach() - w0
    omega = model.network.omega1
    assert delta.abs().max() > 0
    assert torch.allclose(omega @ torch.linalg.pinv(omega) @ delta, delta, atol=1e-5)  # updates stay in span(Omega)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_instantiate(config, tmp_path):
    args = ["--config", str(config), "--data=manynets.datamodules.digits.DigitsDataModule",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"]  # fmt: skip
    cli = ManynetsCLI(args=args, run=False)
    model = cli.model
    assert isinstance(model, PiNetModule)
    assert isinstance(model.network, (InfMLP, FinPiMLP))
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
