"""The analysis plumbing (manynets.analysis): tap, extra data passes, CSV tables, figures, model parts."""

import csv
from functools import partial
from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest
import torch
from torch import nn

from manynets.analysis import LayerTap, each_batch, evaluate, model_parts, read_csv, save_figure, write_csv
from manynets.lightning_modules import CheckpointEnsembleModule, ClassifierModule
from manynets.networks import MLP


def test_tap_captures_replaces_and_removes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    with LayerTap({"first": net[0]}) as tap:
        out = net(x)
        torch.testing.assert_close(tap.outputs["first"], x @ net[0].weight.T + net[0].bias)
        assert not tap.outputs["first"].requires_grad  # stored detached
    assert not net[0]._forward_hooks and not tap.outputs
    seen = []
    tap = LayerTap({"relu": net[1]}, lambda name, y: seen.append(name) or torch.zeros_like(y))
    torch.testing.assert_close(net(x), net[2].bias.expand(5, 2))  # the hidden layer's output was replaced
    tap.remove()
    torch.testing.assert_close(net(x), out)
    assert seen == ["relu"] and not net[1]._forward_hooks
    lstm = nn.LSTM(3, 2, batch_first=True)  # a tuple output is not a tensor: skipped
    with LayerTap({"lstm": lstm}) as tap:
        lstm(torch.randn(1, 4, 3))
        assert tap.outputs == {}


def test_each_batch_restores_every_mode_and_limits_batches():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Linear(2, 3))
    net.train()
    net[1].eval()  # a frozen part inside a training module
    loader = [(torch.randn(4, 2), torch.arange(4)) for _ in range(5)]
    states = []

    def fn(images, labels):
        states.append((torch.is_grad_enabled(), net.training, net[0].training, labels.dtype))

    assert each_batch(net, loader, fn, max_batches=2) == 2
    assert states == [(False, False, False, torch.int64)] * 2
    assert [m.training for m in net] == [True, False, True] and net.training


def test_evaluate_matches_a_direct_computation():
    torch.manual_seed(0)
    net = nn.Linear(3, 4)
    loader = [(torch.randn(6, 3), torch.randint(0, 4, (6,))) for _ in range(3)]
    acc, loss = evaluate(net, loader)
    x, y = torch.cat([b[0] for b in loader]).double(), torch.cat([b[1] for b in loader])
    logits = x @ net.weight.double().T + net.bias.double()
    assert acc == pytest.approx((logits.argmax(1) == y).double().mean().item())
    assert loss == pytest.approx((torch.logsumexp(logits, 1) - logits[torch.arange(18), y]).mean().item(), rel=1e-6)


def test_csv_units_columns_and_round_trip(tmp_path):
    rows = [{"epoch": 0, "saturation/train/a": 0.5, "note": "x"}, {"epoch": 1, "idim/train/a": 3}]
    path = write_csv(tmp_path / "sub" / "t.csv", rows, {"saturation": "fraction", "idim": "dimensions"},
                     columns=["epoch", "idim/train/a"])  # fmt: skip
    with open(path, newline="") as f:
        table = list(csv.reader(f))  # comma-separated
    assert table == [["epoch", "idim/train/a (dimensions)", "saturation/train/a (fraction)", "note"],
                     ["0", "", "0.5", "x"], ["1", "3", "", ""]]  # fmt: skip
    assert read_csv(path) == [{"epoch": "0", "idim/train/a": "", "saturation/train/a": "0.5", "note": "x"},
                              {"epoch": "1", "idim/train/a": "3", "saturation/train/a": "", "note": ""}]  # fmt: skip


def test_save_figure_sends_to_every_logger_that_takes_figures(tmp_path):
    calls = []

    class Board:  # TensorBoard's SummaryWriter
        def add_figure(self, tag, fig, global_step=None, close=True):
            calls.append(("board", tag, global_step, close))

    class Images:  # a W&B-style logger
        experiment = None

        def log_image(self, key, images, step=None):
            calls.append(("images", key, step, len(images)))

    class Other:  # a log_image with another signature: skipped, the PNG is the record
        experiment = None

        def log_image(self, name):
            raise AssertionError("not called with these arguments")

    trainer = SimpleNamespace(global_step=7, loggers=[SimpleNamespace(experiment=Board()), Images(), Other(),
                                                      SimpleNamespace(experiment=object())])  # fmt: skip
    fig = plt.figure()
    path = save_figure(trainer, fig, tmp_path, "probes", tag="analysis/probes")
    assert path == tmp_path / "probes.png" and path.stat().st_size > 0
    assert calls == [("board", "analysis/probes", 7, False), ("images", "analysis/probes", 7, 1)]
    assert not plt.fignum_exists(fig.number)


def test_model_parts():
    plain = ClassifierModule(partial(MLP, depth=1, width=4), 3, (1, 2, 2))
    assert list(model_parts(plain)) == [""]  # metric collections are not parts
    ensemble = CheckpointEnsembleModule(partial(MLP, depth=1, width=4), 3, (1, 2, 2), checkpoints=["a.ckpt"])
    assert model_parts(ensemble) == {"": ensemble}  # no backbone of its own: the module, members-k-...
    net = nn.Linear(2, 2)
    assert model_parts(net) == {"": net}
