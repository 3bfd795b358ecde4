"""Saturation callback: whole-epoch covariance, logging/CSV/plot, DDP all-reduce (spec §2.1-2.3, §2.11)."""

import csv
import os
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from manynets.analysis import SaturationTracker, read_csv, select_layers, write_csv
from manynets.callbacks import Saturation
from manynets.layers.pi import InfPiLayer, PiInputLayer
from manynets.lightning_modules import ClassifierModule, MixMoModule, PiNetModule, SubspaceModule, SuperpositionModule
from manynets.networks import MLP, Backbone, PiMLP


class Net(Backbone):
    def __init__(self, num_classes=3, image_shape=(2, 6, 6)):
        super().__init__()
        self.stem = nn.Conv2d(image_shape[0], 5, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(5, 6, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(6, num_classes)
        self.feature_dim, self.stem_channels = 6, 5


def numpy_id(outputs: list[torch.Tensor], delta: float) -> int:
    """ID from numpy: covariance of all outputs (conv maps channel-wise), direct count of p_k < delta."""
    x = torch.cat([o.permute(0, 2, 3, 1).reshape(-1, o.shape[1]) if o.dim() == 4 else o for o in outputs])
    cov = np.cov(x.double().numpy(), rowvar=False, bias=True)
    lam = np.clip(np.sort(np.linalg.eigvalsh(cov))[::-1], 0, None)
    return int(sum(np.cumsum(lam) / lam.sum() < delta))


def reference_ids(net: nn.Module, images: torch.Tensor, delta: float) -> dict[str, int]:
    """ID per layer of one forward pass of ``images``, hooked by hand (not through the analysis tap)."""
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: outputs.setdefault(n, []).append(o.detach()))
             for n, m in select_layers(net).items()]  # fmt: skip
    with torch.no_grad():
        net(images)
    for h in hooks:
        h.remove()
    return {name: numpy_id(outs, delta) for name, outs in outputs.items()}


def test_whole_epoch_not_last_batch(tmp_path):
    import lightning.pytorch as pl

    torch.manual_seed(0)
    images, labels = torch.randn(33, 2, 6, 6), torch.randint(0, 3, (33,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)  # last batch: a single sample
    module = ClassifierModule(Net, 3, (2, 6, 6), optimizer=partial(torch.optim.SGD, lr=0.0))
    callback = Saturation(delta=0.95, dirpath=str(tmp_path))
    trainer = pl.Trainer(max_epochs=2, callbacks=[callback], default_root_dir=tmp_path, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=1)  # fmt: skip
    trainer.fit(module, loader, loader)
    expected = reference_ids(module.network, images, 0.95)
    assert expected["head"] > 0  # a single-sample last batch would give 0
    for name, idim in expected.items():
        for mode in ("train", "eval"):
            assert trainer.callback_metrics[f"idim/{mode}/{name}"].item() == idim, (mode, name)
            width = {"stem": 5, "body-1": 6, "head": 3}[name]
            assert trainer.callback_metrics[f"saturation/{mode}/{name}"].item() == pytest.approx(idim / width)
    with open(tmp_path / "saturation.csv") as f:
        rows = list(csv.DictReader(f))  # comma-separated, units in the header, saturation a fraction
    assert [int(float(r["epoch"])) for r in rows] == [0, 1]
    assert float(rows[1]["idim/eval/head (dimensions)"]) == expected["head"]
    assert float(rows[1]["saturation/eval/head (fraction)"]) == pytest.approx(expected["head"] / 3)
    assert (tmp_path / "saturation_epoch001.png").stat().st_size > 1000
    # every_n_batches: only batches 0, 2, 4 are recorded
    every = Saturation(every_n_batches=2, modes=["train"], plot=False, dirpath=str(tmp_path / "k"))
    trainer = pl.Trainer(max_epochs=1, callbacks=[every], default_root_dir=tmp_path, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, logger=False)  # fmt: skip
    seen = []
    orig = every.compute
    every.compute = lambda mode: (seen.append(every.tracker.covariances[mode]["head"].n), orig(mode))[1]
    trainer.fit(module, loader)
    assert seen == [8 + 8 + 1]


def test_layer_filter_and_errors():
    net = Net()
    assert list(select_layers(net, "body|head")) == ["body-1", "head"]
    assert list(select_layers(net, types=["Linear"])) == ["head"]
    with pytest.raises(ValueError, match="matches no layer.*candidates: stem, body-1, head"):
        select_layers(net, "nothing")
    with pytest.raises(ValueError, match="delta"):
        Saturation(delta=0)
    with pytest.raises(ValueError, match="modes"):
        Saturation(modes=["training"])


def _ddp_worker(rank: int, world: int, port: int, images: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = Net()
    tracker = SaturationTracker(select_layers(net), delta=0.95)
    with torch.no_grad():
        for chunk in images.chunk(world)[rank].split(5):
            tracker.start("train")  # what the callback's batch hooks do
            net(chunk)
            tracker.flush()
    torch.save(tracker.compute("train"), f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_all_reduce_equals_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    torch.manual_seed(1)
    images = torch.randn(40, 2, 6, 6)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, images, str(tmp_path / "r")), nprocs=2, join=True)
    torch.manual_seed(0)
    net = Net()
    single = SaturationTracker(select_layers(net), delta=0.95)
    single.start("train")
    with torch.no_grad():
        net(images)
    single.flush()
    expected = single.compute("train")
    assert expected == reference_ids_as_results(net, images)
    for rank in range(2):
        assert torch.load(tmp_path / f"r.{rank}") == expected


def reference_ids_as_results(net, images):
    widths = {"stem": 5, "body-1": 6, "head": 3}
    return {n: (i, i / widths[n]) for n, i in reference_ids(net, images, 0.95).items()}


def test_resume_keeps_the_finished_epochs(tmp_path):
    """Spec §2.11.7: a run resumed at epoch 2 keeps the CSV rows of epochs 0 and 1 only (read back by the
    same module that writes them, units stripped from the header)."""
    from manynets.callbacks.saturation import UNITS

    path = write_csv(tmp_path / "saturation.csv", [{"epoch": e, "saturation/train/head": e / 4} for e in range(3)], UNITS)
    assert path.read_text().splitlines()[0] == "epoch,saturation/train/head (fraction)"
    assert read_csv(path)[2] == {"epoch": "2", "saturation/train/head": "0.5"}
    callback = Saturation(dirpath=str(tmp_path))
    callback.on_fit_start(SimpleNamespace(current_epoch=2), Net())
    assert callback.rows == [{"epoch": 0.0, "saturation/train/head": 0.0}, {"epoch": 1.0, "saturation/train/head": 0.25}]


def test_parts_of_a_method_and_pi_layers():
    """Layers of the backbone keep their names; a method's own parts are named from the module; the
    π-net's input and infinite layers count as Linear (their output: the r coefficients g)."""
    mixmo = MixMoModule(Net, 3, (2, 6, 6))
    assert list(select_layers(mixmo)) == ["body-1", "stems-0", "stems-1", "heads-0", "heads-1"]
    sup = SuperpositionModule(Net, 3, (2, 6, 6), capacity=2)
    assert list(select_layers(sup, "unbinding|head")) == ["head", "unbinding-linear"]
    inf = PiMLP(3, (1, 2, 2), r=4, depth=2)
    chosen = select_layers(inf)
    assert list(chosen) == ["stem-1", "body-0", "head"]
    assert [type(m) for m in chosen.values()] == [PiInputLayer, InfPiLayer, InfPiLayer]
    finite = select_layers(PiMLP(3, (1, 2, 2), r=4, depth=2, width=6))  # the finite twin: nn.Linear layers
    assert [n.split("-")[0] for n in finite] == ["stem", "body", "head"]
    assert all(isinstance(m, nn.Linear) for m in finite.values())


def _one_step(module, tmp_path, shape, batch=8) -> dict[str, float]:
    """One training step and one validation batch with the default Saturation callback; its last row."""
    import lightning.pytorch as pl

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(2 * batch, *shape), torch.randint(0, 3, (2 * batch,)))
    callback = Saturation(dirpath=str(tmp_path), plot=False)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0,
                         callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=batch), DataLoader(data, batch_size=batch))
    return callback.last


MLP_TINY = partial(MLP, depth=2, width=6)
METHODS = {  # name: (module, image shape, layers of the method's own parts that must be tracked)
    "classifier-vectors": (lambda: ClassifierModule(MLP_TINY, 3, (1, 3, 3)), (1, 3, 3), []),
    "mixmo-maps": (lambda: MixMoModule(Net, 3, (2, 6, 6)), (2, 6, 6), ["stems-0", "stems-1", "heads-0", "heads-1"]),
    "mixmo-vectors": (lambda: MixMoModule(MLP_TINY, 3, (1, 3, 3)), (1, 3, 3), ["stems-1-1", "heads-0"]),
    "superposition-maps": (lambda: SuperpositionModule(Net, 3, (2, 6, 6), capacity=2), (2, 6, 6),
                           ["unbinding-linear"]),
    "superposition-mbat-vectors": (lambda: SuperpositionModule(MLP_TINY, 3, (1, 3, 3), capacity=2, binding="mbat"),
                                   (1, 3, 3), ["unbinding-linear"]),
    "subspaces-maps": (lambda: SubspaceModule(Net, 3, (2, 6, 6)), (2, 6, 6), []),
    "pinet-infinite": (lambda: PiNetModule(partial(PiMLP, r=4, depth=2), 3, (1, 2, 2)), (1, 2, 2), []),
    "pinet-finite": (lambda: PiNetModule(partial(PiMLP, r=4, depth=2, width=6), 3, (1, 2, 2)), (1, 2, 2), []),
}  # fmt: skip


@pytest.mark.parametrize("name", list(METHODS))
def test_default_saturation_on_every_method(name, tmp_path):
    """Conv maps and vectors, member stems/heads, binding, subspace and π-layers: the default callback
    attaches, records a training step and a validation batch of every tracked layer (backbone and the
    method's own parts), and every value is a fraction."""
    make, shape, parts = METHODS[name]
    module = make()
    layers = list(select_layers(module))
    assert set(parts) <= set(layers) and any(n.startswith("head") for n in layers)
    row = _one_step(module, tmp_path, shape)
    for layer in layers:
        for mode in ("train", "eval"):
            assert 0.0 <= row[f"saturation/{mode}/{layer}"] <= 1.0, (mode, layer)
            assert row[f"idim/{mode}/{layer}"] == int(row[f"idim/{mode}/{layer}"])
    assert read_csv(tmp_path / "saturation.csv")[0]["epoch"] == "0"


def test_vector_outputs_match_numpy(tmp_path):
    """Vectors (B, D): the whole-epoch ID of an MLP (lr 0, no BN/dropout: train = eval outputs) equals numpy's."""
    module = ClassifierModule(MLP_TINY, 3, (1, 3, 3), optimizer=partial(torch.optim.SGD, lr=0.0))
    row = _one_step(module, tmp_path, (1, 3, 3), batch=16)
    torch.manual_seed(0)
    images = torch.randn(32, 1, 3, 3)[:16]
    for layer, idim in reference_ids(module.network, images, 0.99).items():
        assert row[f"idim/train/{layer}"] == idim and row[f"idim/eval/{layer}"] == idim, layer


def test_default_float32_products_agree_with_float64():
    """The default tracker (batch-centred float32 products) gives the float64 tracker's intrinsic dimensions,
    and eigenvalues within 1e-5 of the largest, on conv maps with a large mean and on vectors."""
    from manynets.layers.covariance import eigen_descending

    torch.manual_seed(0)
    net = Net()
    default = SaturationTracker(select_layers(net), delta=0.99)
    exact = SaturationTracker(select_layers(net), delta=0.99, matmul_dtype=torch.float64)
    assert default.matmul_dtype == torch.float32
    with torch.no_grad():
        for _ in range(3):
            for tracker in (default, exact):
                tracker.start("train")
            net(torch.randn(16, 2, 6, 6) * 3 + 20)
            default.flush()
            exact.flush()
    for name in default.names:
        lam32 = eigen_descending(default.covariances["train"][name].covariance())[0]
        lam64 = eigen_descending(exact.covariances["train"][name].covariance())[0]
        assert (lam32 - lam64).abs().max() <= 1e-5 * lam64[0], name
    assert default.compute("train") == exact.compute("train")
