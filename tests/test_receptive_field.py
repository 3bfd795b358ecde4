"""Receptive-field recurrence (spec §2.7, §2.11.6) against closed forms."""

import math

import pytest
from torch import nn

from manynets.callbacks.saturation import select_layers
from manynets.layers.receptive_field import receptive_fields, write_receptive_fields
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
    lines = path.read_text().splitlines()
    assert lines[0] == "layer;map_size;start;jump;receptive_field" and len(lines) == 1 + 8
