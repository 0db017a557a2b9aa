"""Coupled groups (fastsparse.pruning.graph): what the traced dependency graph ties together on
LeNet-5 (a flatten), a ResNet (residual additions) and a MobileNet (depthwise convs)."""

import torch
from torch import nn

from fastsparse.pruning import coupled_groups, prune
from tests.helpers import arch_model


def members(groups, root):
    cg = next(g for g in groups if g.root == root)
    return {(m.name, m.dim): m for m in cg.members}


def test_lenet_flatten_maps_a_channel_to_columns():
    model, x = arch_model("lenet5")
    groups = coupled_groups(model, x)
    assert [(g.root, g.num_groups) for g in groups] == [
        ("features.0", 20),
        ("features.3", 50),
        ("classifier.0", 500),
    ]
    conv2 = members(groups, "features.3")
    assert set(conv2) == {
        ("features.3.weight", 0),
        ("features.3.bias", 0),
        ("classifier.0.weight", 1),
    }
    columns = conv2[("classifier.0.weight", 1)]
    assert columns.index.tolist() == list(range(800))
    assert columns.group.tolist() == [c // 16 for c in range(800)]  # 50 channels x 4x4
    assert groups[1].group_sizes().tolist() == [20 * 25 + 1 + 16 * 500] * 50
    assert all(g.root != "classifier.2" for g in groups)  # outputs are not prunable
    assert all(m.param is model.get_parameter(m.name) for g in groups for m in g.members)


def test_resnet_residual_adds_tie_blocks():
    model, x = arch_model("resnet18")
    groups = coupled_groups(model, x)
    stem = members(groups, "stem.0")
    expected = {
        ("stem.0.weight", 0),
        ("stem.1.weight", 0),
        ("stem.1.bias", 0),
        ("stages.0.0.conv1.weight", 1),
        ("stages.0.0.conv2.weight", 0),
        ("stages.0.0.bn2.weight", 0),
        ("stages.0.0.bn2.bias", 0),
        ("stages.0.1.conv1.weight", 1),
        ("stages.0.1.conv2.weight", 0),
        ("stages.0.1.bn2.weight", 0),
        ("stages.0.1.bn2.bias", 0),
        ("stages.1.0.conv1.weight", 1),
        ("stages.1.0.shortcut.0.weight", 1),
    }
    assert set(stem) == expected
    last = next(g for g in groups if "stages.3.1.conv2.weight" in [m.name for m in g.members])
    assert ("fc.weight", 1) in {(m.name, m.dim) for m in last.members}
    # every conv's out-channels are in exactly one coupled group
    out_rows = [m.name for g in groups for m in g.members if m.dim == 0 and "conv" in m.name]
    assert len(out_rows) == len(set(out_rows))


def test_mobilenet_depthwise_filters_follow_their_channel():
    model, x = arch_model("mobilenet")
    groups = coupled_groups(model, x)
    stem = members(groups, "features.0")
    assert ("features.3.weight", 0) in stem  # the depthwise conv after the stem
    assert ("features.6.weight", 1) in stem  # the pointwise conv's in-slice
    assert model.features[3].groups == 4


def test_depthwise_on_the_input_is_not_prunable():
    model = nn.Sequential(
        nn.Conv2d(3, 3, 3, groups=3), nn.Conv2d(3, 4, 1), nn.Flatten(), nn.LazyLinear(2)
    )
    x = torch.randn(1, 3, 6, 6)
    model(x)
    groups = coupled_groups(model, x)
    assert [g.root for g in groups] == ["1"]
    with torch.no_grad():
        model[0].weight[1] = 0
    assert prune(model, x)[0].in_channels == 3
