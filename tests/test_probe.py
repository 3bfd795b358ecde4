"""ProbeModule against scikit-learn, shipped probe configs, the grid expansion and one CLI run."""

import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from manynets.grid import commands, expand, run_name
from manynets.layers.probes import LinearProbe, probe_features
from manynets.networks import Backbone

REPO = Path(__file__).resolve().parents[1]


class Tiny(Backbone):
    def __init__(self, num_classes=10, image_shape=(1, 8, 8)):
        super().__init__()
        self.stem = nn.Conv2d(image_shape[0], 8, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, num_classes)
        self.feature_dim = self.stem_channels = 8


def test_features_and_probe_shapes():
    x = torch.randn(3, 5, 6, 6)
    assert probe_features(x, 4).shape == (3, 1, 80)
    pix = probe_features(x, pixelwise=True)
    assert pix.shape == (3, 36, 5) and torch.equal(pix[1, 7], x[1, :, 1, 1])
    probe = LinearProbe(36, 5, 4)
    logits = probe(pix)
    assert logits.shape == (3, 36, 4)
    labels = torch.tensor([0, 1, 2])
    # loss = sum over positions of the mean CE + l2/2 ||W||^2, checked by a direct loop
    with torch.no_grad():
        probe.weight.normal_()
    logits = probe(pix)
    direct = sum(nn.functional.cross_entropy(logits[:, p], labels) for p in range(36)) + 0.05 * probe.weight.square().sum()
    torch.testing.assert_close(probe.loss(logits, labels, 0.1), direct)


def test_probe_matmul_gradients():
    from manynets.layers.probes import _ProbeMatmul

    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 7, 4, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(_ProbeMatmul.apply(x, w), torch.einsum("pbf,pfk->pbk", x, w))
    assert torch.autograd.gradcheck(_ProbeMatmul.apply, (x, w))


def test_lbfgs_fit_reaches_the_sklearn_optimum():
    """Full-batch L-BFGS on standardised features = scikit-learn's LogisticRegression(C, lbfgs)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from manynets.layers.probes import fit_probe_lbfgs

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 2, 6, generator=g, dtype=torch.float64) * torch.arange(1, 7) + 3  # 2 probes, 6 features
    labels = (x[:, 0, :3].sum(1) + 0.5 * torch.randn(300, generator=g, dtype=torch.float64) > 6).long()
    labels = labels + (x[:, 1, 5] > 8).long()  # 3 classes
    probe = LinearProbe(2, 6, 3)
    fit_probe_lbfgs(probe, x, labels, C=0.5, max_iter=1000)
    with torch.no_grad():
        ours = probe.eval()(x.float()).softmax(-1)
    for p in range(2):
        feats = StandardScaler().fit_transform(x[:, p].numpy())
        ref = LogisticRegression(C=0.5, max_iter=5000, tol=1e-10).fit(feats, labels.numpy())
        torch.testing.assert_close(ours[:, p].double(), torch.from_numpy(ref.predict_proba(feats)), atol=2e-4, rtol=0)


def test_probes_agree_with_sklearn_on_digits(tmp_path):
    import lightning.pytorch as pl

    from manynets.datamodules.digits import DigitsDataModule
    from manynets.lightning_modules.probe import ProbeModule

    dm = DigitsDataModule(size=8, channels=1, augment=False, batch_size=256, eval_batch_size=512)
    module = ProbeModule(
        backbone=Tiny, num_classes=10, image_shape=(1, 8, 8), layers="stem|body", C=0.05, sklearn_reference=True,
        optimizer=partial(torch.optim.Adam, lr=0.05), lr_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR,
        dirpath=str(tmp_path),
    )  # fmt: skip
    frozen = {k: v.clone() for k, v in module.network.state_dict().items()}
    trainer = pl.Trainer(max_epochs=25, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, dm)
    trainer.test(module, dm, verbose=False)
    assert all(torch.equal(v, module.network.state_dict()[k]) for k, v in frozen.items())  # backbone frozen
    assert set(module.results) == {"stem", "body-1"}
    for name, row in module.results.items():
        assert row["test_acc"] > 0.9
        assert abs(row["test_acc"] - row["ref_test_acc"]) <= 0.01, (name, row)
    lines = (tmp_path / "probes.csv").read_text().splitlines()
    assert lines[0].startswith("layer,") and "ref_test_acc (fraction)" in lines[0] and len(lines) == 3
    assert (tmp_path / "probes.png").is_file()


def test_lbfgs_probes_in_one_epoch_match_sklearn(tmp_path):
    """solver=lbfgs: one backbone pass, probes fitted before the epoch's validation, = sklearn's optimum."""
    import lightning.pytorch as pl

    from manynets.datamodules.digits import DigitsDataModule
    from manynets.lightning_modules.probe import ProbeModule

    # 1257 training images = 3 x 419: the (drop_last) training loader and the reference see the same images
    dm = DigitsDataModule(size=8, channels=1, augment=False, batch_size=419, eval_batch_size=512)
    module = ProbeModule(backbone=Tiny, num_classes=10, image_shape=(1, 8, 8), layers="stem|body", C=0.05,
                         sklearn_reference=True, solver="lbfgs", dirpath=str(tmp_path))  # fmt: skip
    trainer = pl.Trainer(max_epochs=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, dm)
    trainer.test(module, dm, verbose=False)
    for name, row in module.results.items():
        assert row["val_acc"] > 0.9, (name, row)  # fitted before validation ran
        assert abs(row["test_acc"] - row["ref_test_acc"]) <= 0.005, (name, row)
        assert abs(row["train_acc"] - row["ref_train_acc"]) <= 0.005, (name, row)
    with pytest.raises(ValueError, match="solver"):
        ProbeModule(backbone=Tiny, image_shape=(1, 8, 8), solver="newton")


def test_probe_errors(tmp_path):
    from manynets.analysis import load_network
    from manynets.errors import CheckpointMismatchError, ConfigError
    from manynets.lightning_modules.probe import ProbeModule

    with pytest.raises(ConfigError, match="exactly one of checkpoint"):
        ProbeModule()
    with pytest.raises(CheckpointMismatchError, match="model.init_args.checkpoint = .*nope.ckpt' is not a file"):
        ProbeModule(checkpoint=str(tmp_path / "nope.ckpt")).configure_model()
    with pytest.raises(ConfigError, match="does not accept images of shape"):
        ProbeModule(backbone=lambda n, s: Tiny(n, (1, 8, 8)), image_shape=(3, 8, 8))
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="cannot be read as a checkpoint"):
        load_network(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {"network.stem.weight": torch.zeros(1)}, "hyper_parameters": {}}, tmp_path / "raw.ckpt")
    with pytest.raises(CheckpointMismatchError, match="no '_class_path'"):
        load_network(tmp_path / "raw.ckpt")
    with pytest.raises(CheckpointMismatchError, match="does not fit the backbone Tiny"):
        load_network(tmp_path / "raw.ckpt", Tiny(), key="model.init_args.checkpoints[0]")


def test_load_network_round_trip(tmp_path):
    """The backbone of a checkpoint written by a ClassifierModule comes back equal, rebuilt from the
    checkpoint's hyper-parameters (as the CLI writes them) or loaded into a given backbone."""
    from manynets.analysis import load_network
    from manynets.lightning_modules import ClassifierModule
    from manynets.networks import MLP

    torch.manual_seed(0)
    module = ClassifierModule(partial(MLP, depth=1, width=5), 3, (1, 2, 2))
    hparams = {"_class_path": "manynets.lightning_modules.ClassifierModule", "num_classes": 3, "image_shape": (1, 2, 2),
               "backbone": {"class_path": "manynets.networks.MLP", "init_args": {"depth": 1, "width": 5}}}  # fmt: skip
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams}, tmp_path / "m.ckpt")
    rebuilt = load_network(tmp_path / "m.ckpt")
    given = load_network(tmp_path / "m.ckpt", MLP(3, (1, 2, 2), depth=1, width=5))
    for net in (rebuilt, given):
        assert type(net) is MLP
        for key, value in module.network.state_dict().items():
            assert torch.equal(net.state_dict()[key], value), key


def test_grid_expansion(tmp_path):
    grid = {"model.init_args.backbone.init_args.depth": [11, 13], "data.init_args.batch_size": 512,
            "model.init_args.backbone.init_args.blocks": [[1, 1, 1, 5], [5, 1, 1, 1]]}  # fmt: skip
    combos = expand(grid)
    assert len(combos) == 4 and combos[1]["model.init_args.backbone.init_args.blocks"] == [5, 1, 1, 1]
    assert run_name(combos[1], grid) == "depth=11-blocks=_5,1,1,1_"
    (tmp_path / "r" / "depth=13" / "checkpoints").mkdir(parents=True)
    (tmp_path / "r" / "depth=13" / "checkpoints" / "last.ckpt").write_text("x")
    runs = commands({"configs": ["a.yaml"], "root": str(tmp_path / "r"), "grid": {"x.depth": [11, 13]}, "args": ["--seed_everything=1"]})
    assert runs[0][1][:3] == ["fit", "--config", "a.yaml"] and "--x.depth=11" in runs[0][1]
    assert "--seed_everything=1" in runs[0][1] and not any(a.startswith("--ckpt_path") for a in runs[0][1])
    assert runs[1][1][-1].startswith("--ckpt_path=") and runs[1][1][-1].endswith("last.ckpt")  # resumed
    with pytest.raises(ValueError, match="empty list"):
        expand({"a": []})


def test_shipped_grids_point_to_shipped_configs():
    import yaml

    grids = sorted((REPO / "configs" / "probe").glob("grid_*.yaml"))
    assert grids
    for path in grids:
        spec = yaml.safe_load(path.read_text())
        runs = commands(spec)
        assert len(runs) >= 2
        for config in spec["configs"]:
            assert (REPO / config).is_file(), config


@pytest.mark.slow
def test_cli_fit_saturation_then_probes(tmp_path):
    """End to end: train with Saturation + ReceptiveField, then probes from that checkpoint, then test."""
    common = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
              "--trainer.enable_progress_bar=false", "--data.init_args.batch_size=32"]  # fmt: skip
    run = tmp_path / "train"
    fit = [sys.executable, "-m", "manynets", "fit", "--config", str(REPO / "configs/quickstart/probe_digits.yaml"),
           *common, f"--trainer.default_root_dir={run}", f"--checkpoint.dirpath={run}/ckpt"]  # fmt: skip
    out = subprocess.run(fit, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    outputs = run / "lightning_logs" / "version_0"  # the callbacks write into the run directory's log dir
    sat = (outputs / "saturation.csv").read_text().splitlines()
    assert len(sat) == 2 and "saturation/eval/stem-0" in sat[0]
    assert (outputs / "saturation_epoch000.png").is_file()
    assert (outputs / "receptive_field.csv").read_text().startswith("layer,map_size (positions)")
    probes = tmp_path / "probes"
    probe = [sys.executable, "-m", "manynets", "fit", "--config", str(REPO / "configs/quickstart/probe_digits_probes.yaml"),
             *common, f"--trainer.default_root_dir={probes}", f"--checkpoint.dirpath={probes}/ckpt",
             f"--model.init_args.checkpoint={run}/ckpt/last.ckpt", f"--model.init_args.dirpath={probes}",
             "--model.init_args.sklearn_reference=false", "--model.init_args.layers=head"]  # fmt: skip
    out = subprocess.run(probe, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    test = [sys.executable, "-m", "manynets", "test", "--config", str(REPO / "configs/quickstart/probe_digits_probes.yaml"),
            "--trainer.enable_progress_bar=false", "--trainer.limit_test_batches=1", f"--trainer.default_root_dir={probes}",
            f"--model.init_args.checkpoint={run}/ckpt/last.ckpt", f"--model.init_args.dirpath={probes}",
            "--model.init_args.layers=head", f"--ckpt_path={probes}/ckpt/last.ckpt"]  # fmt: skip
    out = subprocess.run(test, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    csv_text = (probes / "probes.csv").read_text().splitlines()
    assert csv_text[0] == "layer,test_acc (fraction)"
    assert csv_text[1].startswith("head-2,") and csv_text[2].startswith("head-6,")


def test_cifar_resolution_option():
    from manynets.datamodules.cifar import CIFAR10DataModule

    x = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    dm = CIFAR10DataModule(resolution=64)
    assert dm.image_shape == (3, 64, 64)
    assert dm.train_transform()(x).shape == dm.eval_transform()(x).shape == (3, 64, 64)
    native = CIFAR10DataModule()
    assert native.image_shape == (3, 32, 32) and native.eval_transform()(x).shape == (3, 32, 32)
    # resizing commutes with the per-channel normalisation: upscaled eval image = resized normalised image
    from torchvision.transforms import v2

    expected = v2.Resize((64, 64), antialias=True)(native.eval_transform()(x))
    torch.testing.assert_close(dm.eval_transform()(x), expected, atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="resolution"):
        CIFAR10DataModule(resolution=0)
