"""MixMoModule: seams, MIMO reproduction, targets, L2 term, vector features, shipped configs and CLI runs."""

import copy
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from manynets.lightning_modules import MixMoModule
from manynets.networks import MLP, PreActResNet, WideResNet

REPO = Path(__file__).resolve().parents[1]
MIXMO_CONFIGS = sorted((REPO / "configs" / "mixmo").glob("*.yaml"))
QUICKSTART = REPO / "configs" / "quickstart" / "mixmo_digits.yaml"


def tiny_wrn():
    return partial(WideResNet, depth=10, width=1, stride_on="conv2", strided_conv_padding="tf", init="mixmo")


def make(**kwargs) -> MixMoModule:
    kwargs.setdefault("backbone", tiny_wrn())
    return MixMoModule(num_classes=5, image_shape=(3, 16, 16), **kwargs)


def test_members_have_own_reinitialised_stems_and_heads():
    model = make(num_members=3)
    assert len(model.stems) == len(model.heads) == 3
    w = [s[0].weight for s in model.stems]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    # same init recipe: truncated at ±2σ with the He std (spec §2.1)
    std = (2 / w[0][0].numel()) ** 0.5 / 0.8796
    for weight in w + [h.weight for h in model.heads]:
        bound = 2 * (2 / weight[0].numel()) ** 0.5 / 0.8796
        assert weight.abs().max() <= bound + 1e-6
    assert abs(w[1].std().item() - std * 0.8796) < 0.35 * std
    assert model.mask_shape == (16, 16)
    # PreActResNet heads in the mixmo recipe are N(0, 0.01), biases 0 (the backbone's init_weights)
    pre = make(backbone=partial(PreActResNet, depth=18, init="mixmo"), num_members=2)
    head = pre.heads[1]
    assert not torch.equal(head.weight, pre.heads[0].weight)
    assert abs(head.weight.std().item() - 0.01) < 0.001 and head.bias.abs().max() == 0


def test_inference_sums_stems_and_returns_member_logits():
    model = make(num_members=2).eval()
    x = torch.randn(4, 3, 16, 16)
    net = model.network
    z = net.pool(net.body(model.stems[0](x) + model.stems[1](x)))
    ref = torch.stack([model.heads[0](z), model.heads[1](z)])
    torch.testing.assert_close(model.predict_logits(x), ref)
    torch.testing.assert_close(model(x), ref.mean(0))


def test_mimo_loss_matches_direct_computation():
    """alpha 0, mixup only, r = 1, b = 2: h = f0 + f1 and L = sum_k CE(z_k, y_k) (spec §2.2)."""
    model = make(num_members=2, alpha=0.0, cutmix_prob=0.0, weight_root=1.0, batch_repetitions=2)
    images, labels = torch.randn(6, 3, 16, 16), torch.randint(0, 5, (6,))
    torch.manual_seed(5)
    loss, logits0, labels0 = model.training_loss(images, labels)
    torch.manual_seed(5)
    _, _, _, own = model.mixmo_inputs(images, labels)
    assert torch.equal(labels0, labels[own[0]])  # train accuracy: member 0 against its own labels
    for row in own:
        assert torch.equal(torch.bincount(row, minlength=6), torch.full((6,), 2))
    net = model.network
    z = net.pool(net.body(model.stems[0](images[own[0]]) + model.stems[1](images[own[1]])))
    ref = sum(F.cross_entropy(model.heads[k](z), labels[own[k]]) for k in range(2))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(logits0, model.heads[0](z))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("msda", [None, "cutmix", "mixup"])
def test_targets_sum_to_member_weights(msda):
    model = make(num_members=2, msda=msda, msda_prob=0.5, batch_repetitions=2)
    images, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    inputs, targets, masks, own = model.mixmo_inputs(images, labels)
    assert inputs.shape == (2, 16, 3, 16, 16) and targets.shape == (2, 16, 5)
    torch.testing.assert_close(targets.sum(-1).sum(0), torch.full((16,), 2.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(masks.expand(16, 2, 16, 16).sum(1), torch.ones(16, 16, 16), atol=1e-6, rtol=0)


def test_l2_term_is_added_explicitly():
    images, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    model = make(batch_repetitions=1, l2_reg=0.0)
    torch.manual_seed(2)
    plain = model.training_loss(images, labels)[0]
    model.hparams.l2_reg = 3e-4
    torch.manual_seed(2)
    regularised = model.training_loss(images, labels)[0]
    total = sum((p.detach().double() ** 2).sum() for p in model.parameters())
    assert (regularised - plain).item() == pytest.approx(3e-4 * total.item(), rel=1e-4)


def test_single_network_is_plain_backbone_without_msda():
    model = make(num_members=1, batch_repetitions=1, msda=None)
    images, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    torch.manual_seed(0)
    loss = model.training_loss(images, labels)[0]
    torch.manual_seed(0)
    own = model.mixmo_inputs(images, labels)[3][0]
    torch.testing.assert_close(loss, F.cross_entropy(model.heads[0](model._core(model.stems[0](images[own]))), labels[own]))
    assert model.predict_logits(images).shape == (4, 5)


def test_test_halves_cross_fit_lowers_nll_of_overconfident_logits():
    model = make(temperature_scaling="test_halves")
    true_logits = torch.randn(600, 5) * 1.5
    labels = torch.distributions.Categorical(logits=true_logits).sample()
    values = model.cross_fit_metrics(4 * true_logits, labels)
    assert values["ts/nll"] < F.cross_entropy(4 * true_logits, labels) - 0.1
    assert 3.0 < values["temperature"].item() < 5.0
    assert values["ts/acc"].item() == pytest.approx(((4 * true_logits).argmax(1) == labels).float().mean().item())


def test_evaluation_variants_add_temperature_scaling_at_test_time():
    from types import SimpleNamespace

    model = make(num_members=2).eval()
    x = torch.randn(3, 3, 16, 16)
    assert list(model.evaluation_logits(x)) == [""]  # no trainer: validation-like
    model.temperature = 2.5
    model._trainer = SimpleNamespace(testing=True)
    variants = model.evaluation_logits(x)
    members = model.predict_logits(x)
    assert variants[""].shape == (2, 3, 5)
    torch.testing.assert_close(variants["ts"], members.mean(0) / 2.5)
    model._trainer = None


def test_float64_model_keeps_float64_loss():
    model = make(num_members=2, alpha=0.0, cutmix_prob=0.0, weight_root=1.0, batch_repetitions=1).double()
    images, labels = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.randint(0, 5, (4,))
    torch.manual_seed(3)
    loss = model.training_loss(images, labels)[0]
    torch.manual_seed(3)
    inputs, targets, _, own = model.mixmo_inputs(images, labels)
    assert loss.dtype == targets.dtype == torch.float64
    z = model._core(model.stems[0](inputs[0]) + model.stems[1](inputs[1]))
    ref = sum(F.cross_entropy(model.heads[k](z), labels[own[k]]) for k in range(2))
    assert abs(loss.item() - ref.item()) <= 1e-12 * ref.item()


def _mlp():
    return partial(MLP, depth=2, width=24)


def test_vector_cutmix_trains_on_feature_blocks():
    """MLP stems give (B, C) features: CutMix masks are (B, M, C), one contiguous block of features
    (or its complement) per member; the loss equals a direct float64 computation."""
    model = make(backbone=_mlp(), num_members=2, cutmix_prob=1.0, batch_repetitions=2)
    assert model.mask_shape == (24,)
    images, labels = torch.randn(6, 3, 16, 16), torch.randint(0, 5, (6,))
    torch.manual_seed(4)
    loss, logits0, labels0 = model.training_loss(images, labels)
    torch.manual_seed(4)
    inputs, targets, masks, own = model.mixmo_inputs(images, labels)
    assert masks.shape == (12, 2, 24) and torch.equal(labels0, labels[own[0]])
    torch.testing.assert_close(masks.sum(1), torch.ones(12, 24))
    for row in masks.transpose(0, 1).reshape(-1, 24):  # the block or its complement: a block at a border
        on = torch.nonzero(row)[:, 0]
        off = torch.nonzero(1 - row)[:, 0]
        assert any(len(i) == 0 or int(i.max() - i.min()) + 1 == len(i) for i in (on, off))
    ref_model = copy.deepcopy(model).double()
    f = [ref_model.stems[k](inputs[k].double()) for k in range(2)]
    z = ref_model._core(2 * (masks[:, 0].double() * f[0] + masks[:, 1].double() * f[1]))
    logp = [torch.log_softmax(ref_model.heads[k](z), -1) for k in range(2)]
    ref = sum(-(targets[k].double() * logp[k]).sum(-1).mean() for k in range(2))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert logits0.shape == (12, 5)


def test_vector_linear_mixing_and_inference():
    model = make(backbone=_mlp(), num_members=2, alpha=0.0, cutmix_prob=0.0, weight_root=1.0, batch_repetitions=1)
    images, labels = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    torch.manual_seed(1)
    loss = model.training_loss(images, labels)[0]
    torch.manual_seed(1)
    inputs, _, masks, own = model.mixmo_inputs(images, labels)
    assert masks.shape == (4, 2, 1)
    z = model._core(model.stems[0](inputs[0]) + model.stems[1](inputs[1]))  # MIMO: h = f0 + f1
    torch.testing.assert_close(loss, sum(F.cross_entropy(model.heads[k](z), labels[own[k]]) for k in range(2)))
    model.eval()
    z = model._core(model.stems[0](images) + model.stems[1](images))
    torch.testing.assert_close(model.predict_logits(images), torch.stack([h(z) for h in model.heads]))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"num_members": 0}, "num_members"), ({"cutmix_prob": 1.5}, "cutmix_prob"),
     ({"batch_repetitions": 0}, "batch_repetitions"), ({"label_smoothing": 0.1}, "label_smoothing"),
     ({"weight_root": 0.0}, "weight_root"), ({"msda_beta": 0.0}, "msda_beta")],
)  # fmt: skip
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def _expected_recipe(name: str) -> dict:
    """Spec §2.5 keys from the config's file name (independent of the YAML's numbers)."""
    tiny = name.startswith("tinyimagenet")
    mixmo = "mixmo" in name or "mimo" in name
    b = 4 if mixmo else 1
    return {"b": b, "lr": (0.2 / b) if tiny else 0.1 / (2 * b), "warmup": (1000 if tiny else 782) * b,
            "members": 2 if mixmo else 1, "l2": 0.0 if tiny else 3e-4, "wd": 1e-4 if tiny else 0.0,
            "milestones": [600, 900] if tiny else [100, 200, 225], "epochs": 1200 if tiny else 300}  # fmt: skip


def test_every_readme_row_has_a_config():
    names = {p.stem for p in MIXMO_CONFIGS}
    for data in ("cifar10", "cifar100"):
        for variant in ("vanilla", "mixup", "cutmix", "mimo", "linearmixmo", "cutmixmo", "linearmixmo_cutmix",
                        "cutmixmo_cutmix"):  # fmt: skip
            assert f"{data}_wrn28-10_{variant}" in names
    for width in (1, 2, 3):
        for variant in ("vanilla", "linearmixmo", "cutmixmo"):
            assert f"tinyimagenet_preactresnet18-{width}_{variant}" in names


@pytest.mark.parametrize("path", MIXMO_CONFIGS, ids=[p.stem for p in MIXMO_CONFIGS])
def test_mixmo_config_follows_official_recipe(path):
    """Spec §2.5 numbers; backbone options bind to the backbone's signature (no build: see below)."""
    import inspect

    text = path.read_text()
    cfg = yaml.safe_load(text)
    assert text.startswith("#") and "published top-1" in text.split("seed_everything")[0]
    want = _expected_recipe(path.stem)
    model = cfg["model"]["init_args"]
    assert cfg["model"]["class_path"].endswith("MixMoModule")
    assert model["batch_repetitions"] == want["b"] and model["num_members"] == want["members"]
    assert model["warmup_steps"] == want["warmup"] and model["l2_reg"] == want["l2"]
    opt = model["optimizer"]["init_args"]
    assert opt["lr"] == pytest.approx(want["lr"]) and opt["weight_decay"] == want["wd"]
    assert model["lr_scheduler"]["init_args"]["milestones"] == want["milestones"]
    assert cfg["trainer"]["max_epochs"] == want["epochs"]
    tiny = path.stem.startswith("tiny")
    assert cfg["data"]["init_args"]["batch_size"] * want["b"] == (100 if tiny else 64)  # per-step B = n * b
    variant = path.stem.split("_", 2)[2]
    assert model["msda"] == ("cutmix" if variant.endswith("cutmix") and variant != "cutmix" or variant == "cutmix"
                             else "mixup" if variant == "mixup" else None)  # fmt: skip
    if want["members"] == 2:
        assert model["cutmix_prob"] == (0.5 if variant.startswith("cutmixmo") else 0.0)
        assert (model["alpha"], model["weight_root"]) == ((0.0, 1.0) if variant == "mimo" else (2.0, 3.0))
    backbone = {"WideResNet": WideResNet, "PreActResNet": PreActResNet}[model["backbone"]["class_path"].rsplit(".", 1)[-1]]
    inspect.signature(backbone).bind(10, (3, 32, 32), **model["backbone"]["init_args"])


@pytest.mark.parametrize("name", ["cifar100_wrn28-10_cutmixmo_cutmix", "tinyimagenet_preactresnet18-2_cutmixmo"])
def test_mixmo_config_instantiates_with_small_backbone(name, tmp_path):
    """Two representative configs through the CLI on digits with a small backbone; the full-size
    instantiation of every config is in tests/test_configs.py."""
    from manynets.cli import ManynetsCLI

    size = 64 if name.startswith("tiny") else 32
    args = ["--config", str(REPO / "configs" / "mixmo" / f"{name}.yaml"), "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}", "--data=manynets.datamodules.digits.DigitsDataModule",
            f"--data.init_args.size={size}", "--model.init_args.backbone=manynets.networks.WideResNet",
            "--model.init_args.backbone.init_args.depth=10", "--model.init_args.backbone.init_args.width=1"]  # fmt: skip
    cli = ManynetsCLI(args=args, run=False)
    assert isinstance(cli.model, MixMoModule) and cli.model.num_members == 2
    assert cli.model.hparams.batch_repetitions == 4


@pytest.mark.slow
def test_cli_fit_then_test(tmp_path):
    common = ["--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
              "--data.init_args.val_split=64", "--data.init_args.eval_batch_size=64"]  # fmt: skip
    fit = [sys.executable, "-m", "manynets", "fit", "--config", str(QUICKSTART), "--trainer.max_epochs=1",
           "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
           "--trainer.num_sanity_val_steps=0", f"--checkpoint.dirpath={tmp_path}/ckpt",
           "--model.init_args.backbone.init_args.width=1", *common]  # fmt: skip
    subprocess.run(fit, check=True, capture_output=True, cwd=tmp_path)
    test = [sys.executable, "-m", "manynets", "test", "--config", str(QUICKSTART), "--trainer.limit_test_batches=1",
            "--model.init_args.backbone.init_args.width=1", f"--ckpt_path={tmp_path}/ckpt/last.ckpt", *common]  # fmt: skip
    out = subprocess.run(test, check=True, capture_output=True, text=True, cwd=tmp_path).stdout
    for name in ("test/acc", "test/member1/acc", "test/ratio_errors", "test/ts/nll", "test/temperature"):
        assert name in out


@pytest.mark.slow
def test_named_test_sets_log_prefixed_and_mean_metrics(tmp_path):
    """Corruption-style named test sets: test/{set}/..., test/mean/... incl. ts/ and ratio_errors."""
    import lightning.pytorch as pl

    from manynets.datamodules.digits import DigitsDataModule

    class TwoSets(DigitsDataModule):
        def test_sets(self, transform):
            clean = super().test_sets(transform)["test"]
            return {"clean": clean, "shifted_s1": clean}

    data = TwoSets(size=16, batch_size=16, eval_batch_size=64, val_split=64, test_size=64)
    model = MixMoModule(tiny_wrn(), num_classes=10, image_shape=(3, 16, 16), batch_repetitions=2)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1,
                         num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(model, datamodule=data)
    results = trainer.test(model, datamodule=data, verbose=False)
    logged = {k: v for r in results for k, v in r.items()}
    for name in ("clean/acc", "shifted_s1/ts/nll", "mean/ts/nll", "mean/ratio_errors", "clean/temperature"):
        assert f"test/{name}" in logged
    assert logged["test/mean/ts/nll"] == pytest.approx(logged["test/shifted_s1/ts/nll"])
