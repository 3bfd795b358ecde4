"""Saturation callback: whole-epoch covariance, logging/CSV/plot, DDP all-reduce (spec §2.1-2.3, §2.11)."""

import csv
import os
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from manynets.callbacks.saturation import Saturation, select_layers
from manynets.lightning_modules.classifier import ClassifierModule


class Net(nn.Module):
    def __init__(self, num_classes=3, image_shape=(2, 6, 6)):
        super().__init__()
        self.stem = nn.Conv2d(image_shape[0], 5, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(5, 6, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(6, num_classes)
        self.feature_dim, self.stem_channels = 6, 5

    def forward(self, x):
        return self.head(self.pool(self.body(self.stem(x))))


def reference_ids(net: nn.Module, images: torch.Tensor, delta: float) -> dict[str, int]:
    """ID per layer from numpy: covariance of all outputs (channel-wise), direct count of p_k < delta."""
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: outputs.setdefault(n, []).append(o.detach()))
             for n, m in select_layers(net).items()]  # fmt: skip
    with torch.no_grad():
        net(images)
    for h in hooks:
        h.remove()
    ids = {}
    for name, (out,) in outputs.items():
        x = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1]) if out.dim() == 4 else out
        cov = np.cov(x.double().numpy(), rowvar=False, bias=True)
        lam = np.clip(np.sort(np.linalg.eigvalsh(cov))[::-1], 0, None)
        ids[name] = int(sum(np.cumsum(lam) / lam.sum() < delta))
    return ids


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
        rows = list(csv.DictReader(f))
    assert [int(float(r["epoch"])) for r in rows] == [0, 1]
    assert float(rows[1]["idim/eval/head"]) == expected["head"]
    assert (tmp_path / "saturation_epoch001.png").stat().st_size > 1000
    # every_n_batches: only batches 0, 2, 4 are recorded
    every = Saturation(every_n_batches=2, modes=["train"], plot=False, dirpath=str(tmp_path / "k"))
    trainer = pl.Trainer(max_epochs=1, callbacks=[every], default_root_dir=tmp_path, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, logger=False)  # fmt: skip
    seen = []
    orig = every.compute
    every.compute = lambda mode: (seen.append(every.covariances[mode]["head"].n), orig(mode))[1]
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
    callback = Saturation(delta=0.95)
    callback.setup(None, net, "fit")
    callback._mode = "train"
    with torch.no_grad():
        for chunk in images.chunk(world)[rank].split(5):
            net(chunk)
            callback.flush()  # what the batch-end hook does
    torch.save(callback.compute("train"), f"{out}.{rank}")
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
    single = Saturation(delta=0.95)
    single.setup(None, net, "fit")
    single._mode = "train"
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
