"""Receptive-field recurrence (spec §2.7, §2.11.6) against closed forms."""

import math

import pytest
from torch import nn

from manynets.analysis import read_csv, receptive_fields, select_layers, write_receptive_fields
from manynets.layers.receptive_field import field_rows, on_skip_path
from manynets.networks import ResNet, VGG


@pytest.mark.parametrize("n", [1, 2, 5])
def test_stacked_3x3_convs(n):
    net = nn.Sequential(*[nn.Conv2d(2, 2, 3, 1, 1) for _ in range(n)])
    rows = receptive_fields(net, (2, 16, 16))
    assert [r.receptive_field for r in rows] == [1 + 2 * (i + 1) for i in range(n)]
    assert all(r.jump == 1 and r.map_size == 16 for r in rows)


def test_torchvision_resnet18_stem_and_skips():
    net = ResNet(10, (3, 32, 32), depth=18)
    rows = receptive_fields(net, (3, 32, 32))
    conv, pool, first = rows[0], rows[1], rows[2]
    assert (conv.kind, conv.receptive_field, conv.jump) == ("Conv2d", 7, 2)
    assert (pool.kind, pool.receptive_field, pool.jump) == ("MaxPool2d", 11, 4)
    assert first.receptive_field == 11 + 2 * 4
    # skips removed: the 1x1 shortcut convs are not part of the chain
    assert not any("shortcut" in r.layer for r in rows)
    convs = [r for r in rows if r.kind == "Conv2d"]
    assert len(convs) == 17 and len(select_layers(net, types=["Conv2d"])) == 20
    # closed form: every 3x3 conv adds 2 * (jump before it); the first conv of stages 2-4 doubles the jump
    r, j = 11, 4
    for stage in range(4):
        for i in range(4):
            r += 2 * j
            if i == 0 and stage > 0:
                j *= 2
    assert convs[-1].receptive_field == r


def test_dilation_padding_and_avgpool(tmp_path):
    net = nn.Sequential(nn.Conv2d(1, 1, 3, 1, 0, dilation=2), nn.AvgPool2d(2), nn.Conv2d(1, 1, 3))
    rows = receptive_fields(net, (1, 20, 20))
    assert rows[0].receptive_field == 5 and rows[0].start == 0.5 + 2
    assert math.isnan(rows[1].receptive_field) and math.isnan(rows[2].receptive_field)
    pooled = receptive_fields(net, (1, 20, 20), avgpool="pool")
    assert pooled[1].receptive_field == 6 and pooled[2].receptive_field == 6 + 2 * 2
    path = write_receptive_fields(receptive_fields(VGG(10, depth=11, width_divisor=16)), tmp_path / "rf.csv")
    lines = path.read_text().splitlines()  # comma-separated, units in the header
    assert lines[0] == "layer,map_size (positions),start (px),jump (px),receptive_field (px)" and len(lines) == 1 + 8
    assert read_csv(path)[0] == {"layer": "stem-0", "map_size": "32", "start": "0.5", "jump": "1.0",
                                 "receptive_field": "3.0"}  # fmt: skip


def test_recurrence_on_a_given_chain_and_skip_names(tmp_path):
    """The arithmetic alone (layers/): a 5x5/2 conv then a 3x3/1 pool: r = 5, then 5 + 2 * 2 = 9, j = 2."""
    chain = [("a", nn.Conv2d(1, 1, 5, stride=2, padding=2), 8), ("b", nn.MaxPool2d(3, 1, 1), 8)]
    rows = field_rows(chain)
    assert [(r.receptive_field, r.jump, r.start) for r in rows] == [(5, 2, 0.5), (9, 2, 0.5)]
    assert on_skip_path("body-1-shortcut-0") and on_skip_path("layer1.0.downsample.0") and not on_skip_path("body-1")
    mlp = receptive_fields(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), (1, 2, 2))
    assert mlp == []  # vectors: no conv layer, a table with its header only
    assert write_receptive_fields(mlp, tmp_path / "rf.csv").read_text().startswith("layer,map_size (positions),")
