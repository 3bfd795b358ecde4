"""SuperpositionModule: seams, truncation, the official forward, training loss, dynamic mode, configs, CLI."""

from __future__ import annotations

import csv
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from manynets.cuda_ops.binding import grouped_conv1d_bind, key_to_conv1d_weight
from manynets.errors import ConfigError
from manynets.layers.isometry import conv_isometry_penalty
from manynets.lightning_modules import ClassifierModule, SuperpositionModule
from manynets.lightning_modules.superposition import STEM_CHUNK_IMAGES, mixup
from manynets.networks import MLP, WideResNet

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart" / "superposition_digits.yaml"
PAPER_CONFIGS = sorted((REPO / "configs" / "superposition").glob("*.yaml"))
SHAPE = (3, 8, 8)
TINY = partial(WideResNet, depth=10, width=1, initial_width=1, activation="prelu", stem_norm_act=True,
               shortcut_norm=True, final_norm_act=False)  # fmt: skip


def make(**kwargs) -> SuperpositionModule:
    kwargs.setdefault("backbone", TINY)
    return SuperpositionModule(num_classes=5, image_shape=SHAPE, **kwargs)


def test_n1_without_binding_is_the_plain_backbone():
    torch.manual_seed(0)
    module = make(capacity=1, binding="none").eval()
    plain = ClassifierModule(TINY, num_classes=5, image_shape=SHAPE).eval()
    plain.network.load_state_dict(module.network.state_dict())
    assert not [n for n, _ in module.named_parameters() if not n.startswith("network.")]  # no key, no unbinding
    x = torch.randn(6, *SHAPE)
    assert torch.allclose(module.predict_logits(x), plain.predict_logits(x), atol=1e-6)


@pytest.mark.parametrize("batch", [7, 8, 9])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_output_rows_are_batch_truncated_to_a_multiple_of_n(batch, n):
    module = make(capacity=4).eval()
    assert module.forward_superposed(torch.randn(batch, *SHAPE), n).shape == (batch - batch % n, 5)


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="sup_low = 3: expected a divisor of model.init_args.capacity = 4"):
        make(capacity=4, sup_low=3)
    with pytest.raises(ValueError, match="binding = 'xor'"):
        make(binding="xor")
    with pytest.raises(ValueError, match=r"eval_n = \[3\]: expected divisors of model.init_args.capacity = 4"):
        make(capacity=4, eval_n=[3])
    with pytest.raises(ValueError, match="does not divide the capacity N=4"):
        make(capacity=4).forward_superposed(torch.randn(6, *SHAPE), 3)
    with pytest.raises(ValueError, match="no full superposition of n=4"):
        make(capacity=4).forward_superposed(torch.randn(3, *SHAPE), 4)

    class NoSeams(nn.Module):
        def __init__(self, num_classes, image_shape):
            super().__init__()
            self.head = nn.Linear(3, num_classes)

    with pytest.raises(ConfigError, match=r"model.init_args.backbone = .*NoSeams: expected a manynets.networks.Backb"):
        make(backbone=NoSeams)


@pytest.mark.parametrize("binding", ["hrr", "mbat", "none"])
def test_forward_matches_the_official_formulation(binding):
    """Official steps (spec §1.1): stem, repeat r x, per-slot bind (Conv1d / grouped 1x1 conv), sum,
    body, pool, 1x1 unbind conv + ReLU, mean over r, fc."""
    torch.manual_seed(0)
    capacity, n = 4, 2
    module = make(capacity=capacity, binding=binding).double().eval()
    net = module.network
    x = torch.randn(6, *SHAPE, dtype=torch.float64)
    s = net.stem(x)
    c = s.shape[1]
    slots = s.view(3, n, c, 8, 8).repeat(1, capacity // n, 1, 1, 1)  # slot j holds image j mod n
    if binding == "hrr":
        bound = grouped_conv1d_bind(slots, key_to_conv1d_weight(module.binding.keys.detach())[:, None])
    elif binding == "mbat":
        conv = nn.Conv2d(capacity * c, capacity * c, 1, groups=capacity, bias=False).double()
        conv.weight.data = module.binding.weight.detach().reshape(capacity * c, c, 1, 1)
        bound = conv(slots.reshape(3, capacity * c, 8, 8)).view(3, capacity, c, 8, 8)
    else:
        bound = slots
    features = net.pool(net.body(bound.sum(1)))
    unbind = nn.Conv2d(net.feature_dim, capacity * net.feature_dim, 1).double()
    unbind.weight.data = module.unbinding.linear.weight.detach()[..., None, None]
    unbind.bias.data = module.unbinding.linear.bias.detach()
    unbound = torch.relu(unbind(features[..., None, None])).view(3, capacity // n, n, -1).mean(1).reshape(6, -1)
    assert torch.allclose(module.forward_superposed(x, n), net.head(unbound), atol=1e-10)
    with torch.inference_mode():  # evaluation: the stem as one GEMM, bound in chunks
        assert module._eval_stem_gemm(x) is not None
        assert torch.allclose(module.forward_superposed(x, n), net.head(unbound), atol=1e-10)


@pytest.mark.parametrize("binding", ["hrr", "mbat", "none"])
def test_evaluation_stem_gemm_in_chunks_equals_the_module_path(binding):
    """Evaluation without gradients on a CPU folds the stem BN into one GEMM and binds STEM_CHUNK_IMAGES
    images at a time with one thread (here several chunks, a partial last one and a padded group), the
    whole batch with two, in either memory format: equal to the stem module on the whole batch followed
    by the binding (grad mode)."""
    torch.manual_seed(0)
    module = make(capacity=4, binding=binding)
    bn = module.network.stem[1]
    bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0), bn.weight.data.normal_(), bn.bias.data.normal_()
    module.eval()
    x = torch.randn(2 * STEM_CHUNK_IMAGES + 7, *SHAPE)
    threads = torch.get_num_threads()
    for images, count in ((x, 1), (x.contiguous(memory_format=torch.channels_last), 1), (x, 2)):
        torch.set_num_threads(count)
        for n in (1, 2, 4):
            ref = module.forward_superposed(images, n, pad=True)  # grad enabled: the stem module
            with torch.no_grad():
                assert module._eval_stem_gemm(images) is not None
                out = module.forward_superposed(images, n, pad=True)
            assert out.shape == (x.shape[0], 5)
            assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    torch.set_num_threads(threads)
    with torch.no_grad():
        assert module.train()._eval_stem_gemm(x) is None  # training: BN batch statistics, the module path


@pytest.mark.parametrize("binding", ["hrr", "mbat", "none"])
def test_vector_features_of_an_mlp_are_bound_on_the_feature_axis(binding):
    """MLP stem -> vectors (B, C): slot j bound with its key by a direct circular convolution (HRR) or
    its matrix (MBAT), summed, then body, pool, unbinding and head (spec §1.1 on vectors)."""
    torch.manual_seed(0)
    capacity, n = 4, 2
    module = make(backbone=partial(MLP, depth=2, width=6), capacity=capacity, binding=binding).double().eval()
    net = module.network
    x = torch.randn(6, *SHAPE, dtype=torch.float64)
    s = net.stem(x)
    assert s.shape == (6, 6)
    slots = s.view(3, n, 6).repeat(1, capacity // n, 1)  # slot j holds image j mod n
    if binding == "hrr":
        keys = module.binding.keys.detach()
        idx = (torch.arange(6)[:, None] - torch.arange(6)[None, :]) % 6  # out[m] = sum_t a[t] k[(m - t) mod C]
        bound = torch.stack([slots[:, j] @ keys[j][idx].T for j in range(capacity)], 1)
    elif binding == "mbat":
        bound = torch.stack([slots[:, j] @ module.binding.weight.detach()[j].T for j in range(capacity)], 1)
    else:
        bound = slots
    features = net.pool(net.body(bound.sum(1)))
    w, b = module.unbinding.linear.weight.detach(), module.unbinding.linear.bias.detach()
    unbound = torch.relu(features @ w.T + b).view(3, capacity // n, n, 6).mean(1).reshape(6, 6)
    assert torch.allclose(module.forward_superposed(x, n), net.head(unbound), atol=1e-10)
    variants = module.evaluation_logits(x[:5])  # a partial last group is padded
    assert set(variants) == {"", "n1", "n2", "n4"} and variants[""] is variants["n4"]
    assert all(v.shape == (5, 5) for v in variants.values())


def test_groups_do_not_interact_but_partners_do():
    torch.manual_seed(0)
    module = make(capacity=2).eval()
    x = torch.randn(4, *SHAPE)
    y = x.clone()
    y[3] = torch.randn(*SHAPE)  # change the partner in the second group
    a, b = module.forward_superposed(x, 2), module.forward_superposed(y, 2)
    assert torch.allclose(a[:2], b[:2]) and not torch.allclose(a[2], b[2])


def test_mixup_is_a_convex_pair_combination():
    x, labels = torch.randn(16, *SHAPE), torch.arange(16)
    mixed, y_a, y_b, lam = mixup(x, labels, 1.0)
    assert 0.0 <= lam <= 1.0 and torch.equal(y_a, labels) and sorted(y_b.tolist()) == list(range(16))
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[y_b], atol=1e-6)
    assert mixup(x, labels, 0.0)[3] == 1.0


def test_training_loss_without_mixup_adds_both_regularizers():
    torch.manual_seed(0)
    module = make(capacity=2, mixup_alpha=0.0, bind_weight=0.1, isometry_weight=1e-3)
    module.log_dict = lambda *a, **k: None
    x, y = torch.randn(5, *SHAPE), torch.randint(0, 5, (5,))
    loss, logits, targets = module.training_loss(x, y)
    keys = module.binding.keys.detach()
    norms = keys.norm(dim=1)
    cos = (keys[0] @ keys[1]) / (norms[0] * norms[1])
    r_bind = cos**2 + ((norms - 1) ** 2).mean()
    convs = [m for m in module.network.body.modules() if isinstance(m, nn.Conv2d)]
    r_iso = sum(conv_isometry_penalty(m.weight.detach(), m.stride) for m in convs)
    expected = F.cross_entropy(module.forward_superposed(x, 2), y[:4]) + 0.1 * r_bind + 1e-3 * r_iso
    assert logits.shape == (4, 5) and torch.equal(targets, y[:4])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_dynamic_mode_superposes_sup_low_on_the_other_batches():
    torch.manual_seed(0)
    module = make(capacity=4, sup_low=1, sup_frequency=0.8)
    draws = [module.sample_n() for _ in range(3000)]
    assert set(draws) == {1, 4}
    assert draws.count(1) / len(draws) == pytest.approx(0.2, abs=0.03)
    static = make(capacity=4)
    assert {static.sample_n() for _ in range(50)} == {4}


def test_activation_parameters_get_no_weight_decay():
    module = make(capacity=2, no_weight_decay=["PReLU", "SReLU"])
    decay, no_decay = module.parameter_groups()
    names = {id(p): n for n, p in module.named_parameters()}
    excluded = {names[id(p)] for p in no_decay["params"]}
    assert excluded and all(".act" in n for n in excluded)
    assert "binding.keys" in {names[id(p)] for p in decay["params"]}


def test_onecycle_recipe_of_the_paper_configs():
    """LR 0.008 -> 0.2 at 30 % -> ~8e-7; momentum cycles 0.95 -> 0.85 -> 0.95 (spec §1.4, 1.9.6)."""
    from manynets.cli import ManynetsCLI

    cli = ManynetsCLI(args=["--config", str(PAPER_CONFIGS[0]), "--trainer.logger=false",
                            "--model.init_args.backbone.init_args.depth=10",
                            "--model.init_args.backbone.init_args.width=1"], run=False)  # fmt: skip
    optimizer = cli.model.optimizer_factory(cli.model.parameter_groups())
    scheduler = cli.model.scheduler_factory(optimizer, total_steps=1000)
    lrs, moms = [], []
    for _ in range(1000):
        lrs.append(optimizer.param_groups[0]["lr"])
        moms.append(optimizer.param_groups[0]["momentum"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.008) and max(lrs) == pytest.approx(0.2) and lrs.index(max(lrs)) in (299, 300)
    assert lrs[-1] < 1e-5 and lrs[-1] == pytest.approx(8e-7, rel=0.5)
    assert moms[0] == pytest.approx(0.95) and min(moms) == pytest.approx(0.85) and max(moms) <= 0.95 + 1e-9


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_configs_state_paper_epochs_and_batches(path):
    """Table 1 settings; tests/test_configs.py instantiates every shipped YAML."""
    cfg = yaml.safe_load(path.read_text())
    model, trainer, data = cfg["model"]["init_args"], cfg["trainer"], cfg["data"]["init_args"]
    n = model["capacity"]
    (gf,) = [c["init_args"] for c in trainer["callbacks"] if c["class_path"].endswith("GradientFilter")]
    paper_epochs = 200 if "wrn28" in path.stem else 1200
    assert trainer["max_epochs"] == paper_epochs * n and data["batch_size"] == 128 * n
    assert gf == {"ratio": 10.0, "max_norm": 1000.0, "window_epochs": n} and trainer["check_val_every_n_epoch"] == n
    assert model["eval_n"] == [d for d in (1, 2, 4) if n % d == 0]
    assert cfg["data"]["class_path"].endswith("CIFAR100DataModule" if "cifar100" in path.stem else "CIFAR10DataModule")
    assert model["isometry_weight"] == (0.0 if "wrn28" in path.stem else 1e-4)
    assert model["binding"] == ("none" if "_n1" in path.stem and "mimonet" not in path.stem else "hrr")
    assert (model.get("sup_low"), model.get("sup_frequency")) == ((1, 0.8) if "dynamic" in path.stem else (None, None))
    backbone = model["backbone"]["init_args"]
    assert (backbone["initial_width"], backbone["activation"]) == ((4, "prelu") if "mimonet" in path.stem else (1, "relu"))


@pytest.mark.parametrize("path", [PAPER_CONFIGS[0], QUICKSTART], ids=lambda p: p.stem)
def test_configs_instantiate_with_the_filter_window(path, tmp_path):
    from manynets.callbacks import GradientFilter
    from manynets.cli import ManynetsCLI

    cli = ManynetsCLI(args=["--config", str(path), "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
                            "--model.init_args.backbone.init_args.depth=10",
                            "--model.init_args.backbone.init_args.width=1"], run=False)  # fmt: skip
    model, trainer = cli.model, cli.trainer
    (gf,) = [c for c in trainer.callbacks if isinstance(c, GradientFilter)]
    assert isinstance(model, SuperpositionModule)
    assert gf.window_epochs == model.capacity == trainer.check_val_every_n_epoch
    assert model.eval_n == [d for d in (1, 2, 4) if model.capacity % d == 0]


def _metrics(csv_path: Path) -> dict[str, float]:
    values: dict[str, float] = {}
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


@pytest.mark.slow
def test_cli_fit_then_dynamic_test(tmp_path):
    def run(*args):
        cmd = [sys.executable, "-m", "manynets", args[0], "--config", str(QUICKSTART), *args[1:],  # config first
               "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
               "--model.init_args.backbone.init_args.width=1", "--data.init_args.size=8",
               "--data.init_args.eval_batch_size=32", "--trainer.limit_test_batches=2",
               "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.init_args.save_dir={tmp_path}",
               f"--trainer.logger.init_args.name={args[0]}"]  # fmt: skip
        out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
        assert out.returncode == 0, out.stderr[-3000:]
        return _metrics(tmp_path / args[0] / "version_0" / "metrics.csv")

    fit = run("fit", "--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1", "--trainer.limit_train_batches=3",
              "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
              f"--checkpoint.dirpath={tmp_path}/ckpt")  # fmt: skip
    assert {"val/acc", "val/n1/acc", "val/n2/acc", "train/skipped_steps"} <= set(fit)
    test = run("test", f"--ckpt_path={tmp_path}/ckpt/last.ckpt")
    for n in (1, 2):
        for key in ("acc", "nll", "ece", "brier", "images_per_s"):
            assert f"test/n{n}/{key}" in test
    assert test["test/acc"] == pytest.approx(test["test/n2/acc"])
