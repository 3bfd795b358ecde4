"""SubspaceModule, the evaluation sweep, the checkpoint ensemble and the shipped configs."""

import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, TensorDataset

import manynets.lightning_modules.subspaces as subspaces_module
from manynets.analysis.bn_recompute import recompute_bn
from manynets.analysis.outputs import read_csv, save_figure
from manynets.analysis.subspace_plots import sweep_figures
from manynets.analysis.subspace_sweep import run_sweep, sweep_points
from manynets.layers.subspace import set_point, subspace_coefficients, subspace_layers
from manynets.lightning_modules import CheckpointEnsembleModule, SubspaceModule
from manynets.networks import MLP, CifarResNet

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart" / "subspaces_digits.yaml"
CONFIGS = sorted((REPO / "configs" / "subspaces").glob("*.yaml"))
SMALL = partial(CifarResNet, depth=8, width=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def make(kind="line", **kw):
    return SubspaceModule(SMALL, 10, (3, 8, 8), **{"num_vertices": 3 if kind == "simplex" else None, **kw}, kind=kind)


def test_num_samples_splits_the_batch_and_averages():
    model = make(beta=0.0, num_samples=2)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    torch.manual_seed(5)
    loss, logits, labels = model.training_loss(x, y)
    assert torch.equal(labels, y)
    torch.manual_seed(5)
    alphas = [torch.rand(1).item(), torch.rand(1).item()]  # the two draws of sample_point
    expected = []
    for a, xs, ys in zip(alphas, x.split(3), y.split(3)):
        set_point(model.network, torch.tensor([1 - a, a]))
        expected.append(F.cross_entropy(model.network(xs), ys))
    assert loss.item() == pytest.approx(np.mean([e.item() for e in expected]), rel=1e-5)
    assert logits.shape == (6, 10)
    with pytest.raises(ValueError, match="num_samples=7 exceeds the batch size 6"):
        make(num_samples=7).training_loss(x, y)


def test_layerwise_draws_one_point_per_layer():
    model = make(kind="simplex", layerwise=True)
    model.sample_point()
    rows = torch.cat([layer.coefficients for layer in subspace_layers(model.network)])
    assert rows.shape == (len(subspace_layers(model.network)), 3) and len(torch.unique(rows[:, 0])) == rows.shape[0]
    torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[0]))
    shared = make(kind="line")
    shared.sample_point()
    rows = torch.cat([layer.coefficients for layer in subspace_layers(shared.network)])
    assert len(torch.unique(rows[:, 1])) == 1


def test_cos2_term_uses_random_pairs_including_the_curve_control_point(monkeypatch):
    pairs = []
    real = subspaces_module.cosine_similarity_squared

    def record(net, i, j):
        pairs.append(tuple(sorted((i, j))))
        return real(net, i, j)

    monkeypatch.setattr(subspaces_module, "cosine_similarity_squared", record)
    model = make(kind="curve", beta=2.0)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    for _ in range(20):
        model.training_loss(x, y)
    assert set(pairs) == {(0, 1), (0, 2), (1, 2)}
    model, x = model.double(), x.double()  # float64: the small cos^2 term survives the difference of losses
    torch.manual_seed(9)
    with_reg = model.training_loss(x, y)[0]
    i, j = pairs[-1]
    torch.manual_seed(9)
    model.hparams.beta = 0.0
    without = model.training_loss(x, y)[0]
    assert with_reg.item() - without.item() == pytest.approx(2.0 * real(model.network, i, j).item(), rel=1e-4)


def test_init_from_backbone_gives_independent_sets_and_bad_args_raise():
    model = make(kind="simplex")
    conv = model.network.body[0].conv1
    assert not torch.equal(conv.weight, conv.weight1) and not torch.equal(conv.weight1, conv.weight2)
    assert conv.weight1.std().item() == pytest.approx((2 / 36) ** 0.5, rel=0.3)  # the backbone's kaiming fan_in
    with pytest.raises(ValueError, match="num_vertices = 3.*only for kind: simplex"):
        SubspaceModule(SMALL, 10, (3, 8, 8), kind="line", num_vertices=3)
    with pytest.raises(ValueError, match="num_vertices = None"):
        SubspaceModule(SMALL, 10, (3, 8, 8), kind="simplex")


def test_float64_model_samples_and_evaluates_in_float64():
    """Points in the parameters' dtype: the midpoint logits of a float64 curve equal a plain float64 network
    whose weights are 1/4 theta0 + 1/2 theta2 + 1/4 theta1 computed in NumPy."""
    model = make(kind="curve").double().eval()
    model.sample_point(torch.Generator().manual_seed(1))
    first = torch.cat([layer.coefficients for layer in subspace_layers(model.network)])
    model.sample_point(torch.Generator().manual_seed(1))
    again = torch.cat([layer.coefficients for layer in subspace_layers(model.network)])
    assert first.dtype == torch.float64 and torch.equal(first, again)
    a = first[0, 1].sqrt().item()  # c = ((1 - a)^2, a^2, 2a(1 - a))
    np.testing.assert_allclose(first[0].numpy(), [(1 - a) ** 2, a**2, 2 * a * (1 - a)], rtol=0, atol=1e-15)
    plain = SMALL(10, (3, 8, 8)).double().eval()
    state = {}
    for name, value in model.network.state_dict().items():
        if name.endswith(("weight1", "weight2", "bias1", "bias2")):
            continue
        if name.endswith(("weight", "bias")):
            sets = [value.numpy()] + [model.network.state_dict()[name + s].numpy() for s in ("1", "2")]
            value = torch.from_numpy(sets[0] / 4 + sets[1] / 4 + sets[2] / 2)
        state[name] = value
    plain.load_state_dict(state)
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    logits = model.predict_logits(x)
    assert logits.dtype == torch.float64
    torch.testing.assert_close(logits, plain(x), rtol=1e-12, atol=1e-12)


def test_subspace_of_an_mlp_trains_and_evaluates_at_the_midpoint():
    model = SubspaceModule(partial(MLP, depth=2, width=16), 10, (3, 8, 8), kind="line")
    layers = subspace_layers(model.network)
    assert len(layers) == 3 and all(type(layer).__name__ == "SubspaceLinear" for layer in layers)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    loss, logits, labels = model.training_loss(x, y)
    loss.backward()
    assert logits.shape == (6, 10) and torch.equal(labels, y)
    assert all(layer.weight1.grad is not None and layer.weight1.grad.abs().sum() > 0 for layer in layers)
    plain = MLP(10, (3, 8, 8), depth=2, width=16)
    state = {k: v for k, v in model.network.state_dict().items() if not k.endswith(("weight1", "bias1"))}
    for k in list(state):
        state[k] = (state[k] + model.network.state_dict()[k + "1"]) / 2
    plain.load_state_dict(state)
    torch.testing.assert_close(model.predict_logits(x), plain(x))


def _loaders(n_train=24, n_test=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    train = TensorDataset(torch.randn(n_train, 3, 8, 8, generator=g), torch.randint(0, 10, (n_train,), generator=g))
    test = TensorDataset(torch.randn(n_test, 3, 8, 8, generator=g) + 0.5, torch.randint(0, 10, (n_test,), generator=g))
    return DataLoader(train, batch_size=8), DataLoader(test, batch_size=8)


def test_line_sweep_against_one_point_at_a_time():
    """Each point with BN recomputed officially (one pass per point), then pairs by hand:
    pair ensemble = argmax of SUMMED logits; TV of softmax; cos^2 of pooled features."""
    model = make(kind="curve")
    net = model.network
    train, test = _loaders()
    rows = run_sweep(net, "curve", None, 10, train, test, num_alphas=5, points_per_pass=2)
    x, y = next(iter(DataLoader(test.dataset, batch_size=100)))
    logits, feats = [], []
    for a in np.linspace(0, 1, 5):
        recompute_bn(net, train, subspace_coefficients("curve", float(a)))
        net.eval()
        logits.append(net(x).detach().numpy())
        feats.append(net.features(x).detach().numpy())
        net.train()
    yy = y.numpy()
    for i, row in enumerate(rows):
        j = 4 - i
        assert row["alpha"] == pytest.approx(i / 4)
        assert row["acc"] == pytest.approx((logits[i].argmax(1) == yy).mean(), abs=1e-6)
        assert row["pair_acc"] == pytest.approx(((logits[i] + logits[j]).argmax(1) == yy).mean(), abs=1e-6)
        p, q = [np.exp(v - v.max(1, keepdims=True)) for v in (logits[i], logits[j])]
        p, q = p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)
        assert row["pair_tv"] == pytest.approx(0.5 * np.abs(p - q).sum(1).mean(), abs=1e-4)
        fi, fj = feats[i], feats[j]
        cos2 = ((fi * fj).sum(1) / np.linalg.norm(fi, axis=1) / np.linalg.norm(fj, axis=1)) ** 2
        assert row["pair_feature_cos2"] == pytest.approx(cos2.mean(), abs=1e-4)
        nll = -np.log(p[np.arange(len(yy)), yy]).mean()
        assert row["nll"] == pytest.approx(nll, rel=1e-3)


def test_simplex_sweep_points_and_ensembles(tmp_path):
    names, points = sweep_points("simplex", 3, num_random_points=4)
    assert names[:4] == ["vertex0", "vertex1", "vertex2", "centroid"] and points.shape == (8, 3)
    assert (points >= 0).all() and torch.allclose(points.sum(-1), torch.ones(8))
    model = make(kind="simplex")
    train, test = _loaders()
    rows = run_sweep(model.network, "simplex", 3, 10, train, test, num_random_points=4)
    by_name = {r["point"]: r for r in rows}
    assert {"centroid", "ensemble_vertices", "ensemble_random2", "ensemble_random4"} <= set(by_name)
    net, (x, y) = model.network, next(iter(DataLoader(test.dataset, batch_size=100)))
    summed = 0
    for v in range(3):
        recompute_bn(net, train, torch.eye(3)[v])
        net.eval()
        summed = summed + net(x)
        net.train()
    assert by_name["ensemble_vertices"]["acc"] == pytest.approx((summed.argmax(1) == y).float().mean().item(), abs=1e-6)
    figures = sweep_figures(rows, "simplex")
    assert list(figures) == ["subspace_simplex"]
    assert save_figure(None, figures["subspace_simplex"], tmp_path, "subspace_simplex").stat().st_size > 10_000


def test_checkpoint_ensemble_mean_logits(tmp_path):
    members = [SMALL(10, (3, 8, 8)) for _ in range(2)]
    paths = []
    for k, net in enumerate(members):
        path = tmp_path / f"m{k}.ckpt"
        torch.save({"state_dict": {f"network.{n}": v for n, v in net.state_dict().items()}}, path)
        paths.append(str(path))
    ens = CheckpointEnsembleModule(SMALL, 10, (3, 8, 8), checkpoints=paths)
    ens.setup("test")
    x = torch.randn(3, 3, 8, 8)
    for net in members:
        net.eval()
    ens.eval()
    logits = ens.predict_logits(x)
    assert logits.shape == (2, 3, 10)
    torch.testing.assert_close(logits[1], members[1](x))
    torch.testing.assert_close(ens(x), (members[0](x) + members[1](x)) / 2)
    missing = CheckpointEnsembleModule(SMALL, 10, (3, 8, 8), checkpoints=[str(tmp_path / "nope.ckpt")])
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        missing.setup("test")
    wrong = CheckpointEnsembleModule(partial(CifarResNet, depth=8, width=8), 10, (3, 8, 8), checkpoints=paths[:1])
    with pytest.raises(ValueError, match="does not fit the backbone"):
        wrong.setup("test")


@pytest.mark.parametrize("path", CONFIGS + [QUICKSTART], ids=lambda p: p.stem)
def test_config_instantiates_on_digits(path, tmp_path):
    from manynets.cli import ManynetsCLI

    args = ["--config", str(path), "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
            "--data=manynets.datamodules.digits.DigitsDataModule", "--data.init_args.size=16",
            "--model.init_args.backbone.init_args.width=4" if "cresnet" in path.stem or path == QUICKSTART
            else "--model.init_args.backbone.init_args.width_divisor=8"]  # fmt: skip
    if "ensemble" in path.stem:
        net = SMALL(10, (3, 16, 16)) if "cresnet" in path.stem else None
        if net is None:
            from manynets.networks import ResNet

            net = ResNet(10, (3, 16, 16), depth=18, stem="cifar", head_bias=False, width_divisor=8)
        ckpt = tmp_path / "member.ckpt"
        torch.save({"state_dict": {f"network.{n}": v for n, v in net.state_dict().items()}}, ckpt)
        args += [f"--model.init_args.checkpoints=[{ckpt},{ckpt}]"]
        if "cresnet" in path.stem:
            args += ["--model.init_args.backbone.init_args.depth=8"]
    cli = ManynetsCLI(args=args, run=False)
    model, cfg = cli.model, cli.config
    if "ensemble" in path.stem:
        model.setup("test")
        assert model.predict_logits(torch.randn(2, 3, 16, 16)).shape == (2, 2, 10)
        return
    optimizer = cfg.model.init_args.optimizer.init_args
    assert (optimizer.lr, optimizer.momentum) == (0.1, 0.9) and optimizer.weight_decay in (1e-4, 5e-4)
    assert cfg.trainer.max_epochs == cfg.model.init_args.lr_scheduler.init_args.T_max
    if isinstance(model, SubspaceModule):
        kind = path.stem.rsplit("_", 1)[-1]
        expected = {"line": "line", "curve": "curve", "layerwise": "line", "noise20": "line", "digits": "line"}.get(kind, "simplex")
        assert model.kind == expected
        if expected == "simplex":
            assert model.num_vertices == int(kind[-1])
        assert model.hparams.layerwise == ("layerwise" in path.stem)
        assert any(type(c).__name__ == "SubspaceSweep" for c in cli.trainer.callbacks)
        model.training_loss(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))
    if "swa" in path.stem:
        swa = next(c for c in cli.trainer.callbacks if type(c).__name__ == "StochasticWeightAveraging")
        assert swa._swa_epoch_start == 0.75 and swa._swa_lrs == 0.05
    if "noise" in path.stem:  # the data override drops it; check the shipped file
        assert yaml.safe_load(path.read_text())["data"]["init_args"]["label_noise"] == 0.2


@pytest.mark.slow
def test_cli_fit_then_test_with_sweep(tmp_path):
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    common = ["--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
              "--data.init_args.size=16", "--data.init_args.val_split=32", "--data.init_args.test_size=64",
              "--model.init_args.backbone.init_args.depth=8", "--model.init_args.backbone.init_args.width=4",
              f"--trainer.callbacks.init_args.dirpath={tmp_path}/sweep", "--model.init_args.bn_batches=2",
              "--trainer.callbacks.init_args.bn_batches=2", "--trainer.callbacks.init_args.num_alphas=5"]  # fmt: skip
    fit = [sys.executable, "-m", "manynets", "fit", "--config", str(QUICKSTART), "--trainer.max_epochs=1",
           "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
           "--trainer.callbacks.init_args.at_fit_end=false", "--model.init_args.recompute_bn_every_n_epochs=1",
           f"--checkpoint.dirpath={tmp_path}/ckpt", *common]  # fmt: skip
    subprocess.run(fit, check=True, capture_output=True, cwd=tmp_path, env=env)
    test = [sys.executable, "-m", "manynets", "test", "--config", str(QUICKSTART),
            f"--ckpt_path={tmp_path}/ckpt/last.ckpt", *common]  # fmt: skip
    out = subprocess.run(test, check=True, capture_output=True, text=True, cwd=tmp_path, env=env).stdout
    assert "test/acc" in out
    rows = read_csv(tmp_path / "sweep" / "subspace_sweep.csv")  # column names without their units
    assert [float(r["alpha"]) for r in rows] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert all(0 <= float(r["pair_acc"]) <= 1 and 0 <= float(r["pair_tv"]) <= 1 for r in rows)
    assert rows[2]["pair_acc"] == rows[2]["acc"]  # the midpoint paired with itself
    assert (tmp_path / "sweep" / "subspace_sweep.png").stat().st_size > 10_000
    assert (tmp_path / "sweep" / "subspace_diversity.png").is_file()
