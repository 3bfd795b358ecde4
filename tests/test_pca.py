"""PCA projection layers and the delta sweep (spec §2.7-2.8, §2.11.5)."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from manynets.analysis import SWEEP_DELTAS, delta_sweep, insert_pca_layers, read_csv
from manynets.layers.covariance import intrinsic_dimension
from manynets.layers.pca import PCAProjection
from manynets.networks import Backbone


def fitted(x: torch.Tensor, delta: float, centering: bool = True) -> PCAProjection:
    layer = PCAProjection(x.shape[1], delta, centering)
    layer(x)
    layer.finalize()
    return layer


def test_delta_above_one_is_exact_noop():
    x = torch.randn(200, 12) * torch.linspace(0.1, 2, 12)
    layer = fitted(x, 3.0)
    assert layer.k == 12
    y = torch.randn(7, 12)
    assert torch.equal(layer(y), y)
    conv = PCAProjection(4, 1.5)
    maps = torch.randn(3, 4, 5, 5)
    conv(maps)
    conv.finalize()
    assert torch.equal(conv(maps), maps)


def test_output_in_span_of_top_k_eigenvectors():
    torch.manual_seed(0)
    x = torch.randn(400, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)
    layer = fitted(x.float(), 0.9, centering=False)
    second = (x.T @ x / len(x)).numpy()
    vals, vecs = np.linalg.eigh(second)
    k = layer.k
    top = vecs[:, np.argsort(vals)[::-1][:k]]
    out = layer(x.float()).double().numpy()
    residual = out - out @ top @ top.T  # nothing outside span(V_k)
    assert np.abs(residual).max() < 1e-4 * np.abs(out).max()
    # the PCA layer's own count: delve's count, >= 1, +1 when delta - p_k > 0.02 (may differ by one from ID)
    delve = intrinsic_dimension(torch.from_numpy(second), 0.9)
    p = np.cumsum(np.sort(vals)[::-1]) / vals.sum()
    own = max(delve, 1)
    own += 1 if 0.9 - p[own - 1] > 0.02 else 0
    assert k == own


def test_centered_conv_projection_matches_matrix_form():
    x = torch.randn(4, 6, 3, 3) + 2.0
    layer = PCAProjection(6, 0.8, centering=True)
    layer(x)
    layer.finalize()
    rows = x.permute(0, 2, 3, 1).reshape(-1, 6).double()
    mu = rows.mean(0)
    expected = ((rows - mu) @ layer.projection + mu).float()
    got = layer(x).permute(0, 2, 3, 1).reshape(-1, 6)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_random_basis_has_same_dimension_and_is_a_projector():
    layer = fitted(torch.randn(300, 10) * torch.linspace(0.1, 3, 10), 0.95)
    layer.use_random_basis(torch.Generator().manual_seed(1))
    p = layer.projection
    torch.testing.assert_close(p @ p, p, atol=1e-10, rtol=0)
    assert int(torch.linalg.matrix_rank(p)) == layer.k


def test_hooks_and_delta_sweep(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                        nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, 3))  # fmt: skip
    data = TensorDataset(torch.randn(64, 1, 6, 6), torch.randint(0, 3, (64,)))
    loader = DataLoader(data, batch_size=16)
    hooks = insert_pca_layers(net, delta=3.0)
    assert list(hooks.layers) == ["0", "4"]  # the logits layer is left alone
    hooks.remove()
    with torch.no_grad():
        reference = (net(data.tensors[0]).argmax(-1) == data.tensors[1]).float().mean().item()
    rows = delta_sweep(net, loader, loader, tmp_path / "sweep.csv", deltas=[0.5, 0.99, 3.0], random_control=True)
    assert [r["delta"] for r in rows] == [0.5, 0.99, 3.0]
    assert rows[-1]["accuracy"] == pytest.approx(reference)  # delta > 1: unchanged network
    assert rows[-1]["sum_id"] == rows[-1]["sum_width"] == 18 and rows[-1]["mean_saturation"] == 1.0
    assert rows[0]["sum_id"] <= rows[1]["sum_id"] <= 18
    table = read_csv(tmp_path / "sweep.csv")
    assert len(table) == 3 and float(table[2]["mean_saturation"]) == 1.0
    header = (tmp_path / "sweep.csv").read_text().splitlines()[0]
    assert header.startswith("delta (fraction),accuracy (fraction),loss (nats),sum_id (dimensions)")
    assert len(net._forward_hooks) == 0 and all(len(m._forward_hooks) == 0 for m in net)
    assert net.training  # the extra passes restore the mode
    assert SWEEP_DELTAS[0] == 0.9 and SWEEP_DELTAS[-1] == 3.0 and 0.9995 in SWEEP_DELTAS and len(SWEEP_DELTAS) == 25


@pytest.mark.parametrize("method", ["classifier", "mixmo"])
def test_pca_sweep_callback_after_test(tmp_path, method):
    """The sweep evaluates the module's default prediction (MixMo: the mean of the member logits, its
    member stems and heads projected too): at delta > 1 it reproduces test/acc."""
    import lightning.pytorch as pl

    from manynets.callbacks.pca_sweep import PCADeltaSweep
    from manynets.datamodules.digits import DigitsDataModule
    from manynets.lightning_modules import ClassifierModule, MixMoModule

    class Net(Backbone):
        def __init__(self, num_classes, image_shape):
            super().__init__()
            self.stem = nn.Conv2d(image_shape[0], 6, 3, padding=1)
            self.body = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 12), nn.ReLU())
            self.pool = nn.Identity()
            self.head = nn.Linear(12, num_classes)
            self.stem_channels, self.feature_dim = 6, 12

    if method == "mixmo":
        module = MixMoModule(Net, 10, (1, 8, 8), temperature_scaling="none")
    else:
        module = ClassifierModule(Net, 10, (1, 8, 8))
    dm = DigitsDataModule(size=8, channels=1, augment=False, batch_size=256, eval_batch_size=512)
    sweep = PCADeltaSweep(deltas=[0.9, 3.0], dirpath=str(tmp_path))
    trainer = pl.Trainer(logger=False, callbacks=[sweep], enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)  # fmt: skip
    metrics = trainer.test(module, dm, verbose=False)[0]
    assert [r["delta"] for r in sweep.rows] == [0.9, 3.0]
    assert sweep.rows[1]["accuracy"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    width = 18 if method == "classifier" else 12 + 6 + 6 + 10  # mixmo: body, stems-0, stems-1, heads-0
    assert sweep.rows[0]["sum_id"] < sweep.rows[1]["sum_id"] == sweep.rows[1]["sum_width"] == width
    assert "random_accuracy" in sweep.rows[0]
    assert (tmp_path / "pca_sweep.csv").read_text().startswith("delta (fraction),accuracy (fraction),loss (nats)")
