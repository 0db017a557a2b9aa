"""Coupled groups, sparsity report and lossless physical pruning on LeNet-5, VGG-11-BN, a
ResNet-18-style residual net and a MobileNet-style depthwise-separable net (small widths), plus a
concat model the feature was not designed around, save/load and bad input."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import fastsparse.reference as ref
from fastsparse.functional.prox import prox_
from fastsparse.pruning import (
    PruningError,
    count_macs,
    coupled_groups,
    load_pruned,
    prune,
    sparsity_report,
)
from fastsparse.workflow.models import VGG, LeNet5, MobileNetCIFAR, ResNetCIFAR


class ConcatNet(nn.Module):
    """Two branches concatenated, then a conv: a model the pruning code was not written for."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5), nn.ReLU())
        self.c = nn.Conv2d(11, 7, 3)
        self.fc = nn.Linear(7, 4)

    def forward(self, x):
        y = self.c(torch.cat([self.a(x), self.b(x)], dim=1))
        return self.fc(y.mean(dim=(2, 3)))


ARCHS = {
    "lenet5": (lambda: LeNet5(), (2, 1, 28, 28)),
    "vgg11_bn": (lambda: VGG(((8,), (16,), (16, 16), (32, 32), (32, 32))), (2, 3, 32, 32)),
    "resnet18": (lambda: ResNetCIFAR((2, 2, 2, 2), (8, 16, 32, 64)), (2, 3, 32, 32)),
    "mobilenet": (lambda: MobileNetCIFAR(width=0.125), (2, 3, 32, 32)),
    "concat": (ConcatNet, (2, 3, 12, 12)),
}


def make(arch: str, seed: int = 0):
    """A model with non-trivial BatchNorm statistics (so BN is not the identity) and an input."""
    builder, shape = ARCHS[arch]
    torch.manual_seed(seed)
    model = builder()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model, torch.randn(shape)


def eval_out(model, x):
    training = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(training)
    return out


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before, training=True):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), k
    assert all(m.training == training for m in model.modules())


def pick_dead(groups, fraction=0.5, seed=1):
    """Per coupled group, a random set of channel ids to kill."""
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randperm(cg.num_groups, generator=gen)[: int(cg.num_groups * fraction)]
        for cg in groups
    ]


def shrink(groups, dead, factor=1e-4):
    """Scale the dead channels' coupled slices down (as sparse training would)."""
    with torch.no_grad():
        for cg, d in zip(groups, dead):
            for m in cg.members:
                sel = m.index[torch.isin(m.group, d)]
                m.param.index_copy_(m.dim, sel, m.param.index_select(m.dim, sel) * factor)


def removed_elements(groups, dead):
    """Expected removal: per parameter name, the union of the dead groups' slices."""
    masks = {}
    for cg, d in zip(groups, dead):
        for m in cg.members:
            mask = masks.setdefault(m.name, torch.zeros(m.param.shape, dtype=torch.bool))
            mask.index_fill_(m.dim, m.index[torch.isin(m.group, d)], True)
    return masks


# ---------------------------------------------------------------------------- structure


def members(groups, root):
    cg = next(g for g in groups if g.root == root)
    return {(m.name, m.dim): m for m in cg.members}


def test_lenet_flatten_maps_a_channel_to_columns():
    model, x = make("lenet5")
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
    model, x = make("resnet18")
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
    model, x = make("mobilenet")
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


# ---------------------------------------------------------------------------- prox then prune


@pytest.mark.parametrize("kind", ["group_l0", "group_lasso", "l0_group_lasso"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_prox_then_prune_is_lossless_and_smaller(arch, kind):
    model, x = make(arch)
    groups = coupled_groups(model, x)
    dead = pick_dead(groups)
    shrink(groups, dead)
    norms = ref.coupled_group_norms(groups)
    dead_norm = max(float(n[d].max()) for n, d in zip(norms, dead) if d.numel())
    alive_norm = min(
        float(n[torch.isin(torch.arange(n.numel()), d, invert=True)].min())
        for n, d in zip(norms, dead)
    )
    assert dead_norm < alive_norm
    threshold = (0.01, dead_norm * 1.01) if kind == "l0_group_lasso" else dead_norm * 1.01

    masks = prox_(model, kind, threshold, groups=groups)  # the prox step: dead groups -> 0

    for mask, n, d in zip(masks, ref.coupled_group_norms(groups), dead):
        assert mask.tolist() == [i not in d.tolist() for i in range(n.numel())]
        assert (n[d] == 0).all() and (n[mask] > 0).all()
    before = snapshot(model)
    params_before = sum(p.numel() for p in model.parameters())
    macs_before = count_macs(model, x)
    weights_before = {
        name: m.weight.shape for name, m in model.named_modules() if name in macs_before
    }
    expected_removed = removed_elements(groups, dead)

    pruned = prune(model, x)

    assert_unchanged(model, before)
    torch.testing.assert_close(eval_out(pruned, x), eval_out(model, x), rtol=0, atol=1e-5)
    params_after = sum(p.numel() for p in pruned.parameters())
    assert params_before - params_after == sum(int(m.sum()) for m in expected_removed.values())
    macs_after = count_macs(pruned, x)
    for name, shape in weights_before.items():
        removed = expected_removed.get(f"{name}.weight", torch.zeros(shape, dtype=torch.bool))
        new_shape = pruned.get_submodule(name).weight.shape
        assert new_shape.numel() == shape.numel() - int(removed.sum()), name
        # conv/linear multiply-adds are proportional to the weight's size at fixed spatial size
        assert macs_after[name] * shape.numel() == macs_before[name] * new_shape.numel(), name
    assert sum(macs_after.values()) < sum(macs_before.values())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_prune_with_threshold_equals_thresholded_model(arch):
    model, x = make(arch, seed=3)
    groups = coupled_groups(model, x)
    shrink(groups, pick_dead(groups, fraction=0.25, seed=4), factor=0.05)
    threshold = float(torch.cat(ref.coupled_group_norms(groups)).quantile(0.3))
    pruned = prune(model, x, threshold=threshold)
    thresholded = copy.deepcopy(model)
    prox_(thresholded, "group_l0", threshold, groups=coupled_groups(thresholded, x))
    torch.testing.assert_close(eval_out(pruned, x), eval_out(thresholded, x), rtol=0, atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_constant_channel_is_kept():
    """Conv filter and BN scale zero but BN shift not: a constant channel, which must stay."""
    model, x = make("vgg11_bn")
    with torch.no_grad():
        model.features[0].weight[2] = 0
        model.features[1].weight[2] = 0
        model.features[1].bias[2] = 0.7
    pruned = prune(model, x)
    assert pruned.features[0].out_channels == 8
    with torch.no_grad():
        model.features[1].bias[2] = 0
        model.features[4].weight[:, 2] = 0
    pruned = prune(model, x)
    assert pruned.features[0].out_channels == 7
    torch.testing.assert_close(eval_out(pruned, x), eval_out(model, x), rtol=0, atol=1e-5)


def test_a_layer_keeps_one_channel_when_all_are_dead():
    model, x = make("lenet5")
    with torch.no_grad():
        model.features[0].weight.mul_(1e-3)
        model.features[0].bias.mul_(1e-3)
        model.features[3].weight.mul_(1e-3)
    norms = ref.coupled_group_norms(coupled_groups(model, x))[0]
    threshold = float(norms.max()) * 1.01
    pruned = prune(model, x, threshold=threshold)
    assert pruned.features[0].out_channels == 1
    thresholded = copy.deepcopy(model)
    prox_(thresholded, "group_l0", threshold, groups=coupled_groups(thresholded, x))
    torch.testing.assert_close(eval_out(pruned, x), eval_out(thresholded, x), rtol=0, atol=1e-5)


def test_prune_keeps_mode_flags_and_nothing_dead_is_a_copy():
    model, x = make("resnet18")
    model.stem[0].weight.requires_grad_(False)
    pruned = prune(model, x)
    assert pruned is not model and all(m.training for m in pruned.modules())
    assert not pruned.stem[0].weight.requires_grad and pruned.fc.weight.requires_grad
    assert sum(p.numel() for p in pruned.parameters()) == sum(p.numel() for p in model.parameters())
    model.eval()
    assert not any(m.training for m in prune(model, x).modules())


# ---------------------------------------------------------------------------- report


@pytest.mark.parametrize("arch", ["lenet5", "mobilenet"])
def test_sparsity_report(arch):
    model, x = make(arch)
    groups = coupled_groups(model, x)
    dead = pick_dead(groups)
    shrink(groups, dead, factor=0.0)
    before = snapshot(model)
    report = sparsity_report(model, x)
    assert_unchanged(model, before)
    pruned = prune(model, x)
    assert report.params == sum(p.numel() for p in model.parameters())
    assert report.params_after == sum(p.numel() for p in pruned.parameters())
    assert report.macs == sum(count_macs(model, x).values())
    assert report.macs_after == sum(count_macs(pruned, x).values())
    rows = {r.name: r for r in report.layers}
    for cg, d in zip(groups, dead):
        for m in cg.members:
            layer = m.name.rpartition(".")[0]
            if m.dim == 0 and m.name.endswith("weight") and layer in rows:
                assert rows[layer].alive == cg.num_groups - d.numel()
                assert rows[layer].filters_after == rows[layer].alive
                assert rows[layer].prunable
    classifier = report.layers[-1]
    assert not classifier.prunable and classifier.filters_after == classifier.filters
    text = str(report)
    assert "filters" in text and "alive" in text and "MACs" in text
    assert text.splitlines()[-1].startswith("total")
    assert f"{report.params_after:,}" in text


def test_report_threshold_counts_alive():
    model, x = make("lenet5")
    norms = ref.coupled_group_norms(coupled_groups(model, x))[0]
    threshold = float(norms.median())
    row = sparsity_report(model, x, threshold=threshold).layers[0]
    assert row.name == "features.0" and row.alive == int((norms > threshold).sum())


def test_count_macs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten())
    model.append(nn.Linear(8 * 6 * 6, 5))
    macs = count_macs(model, torch.randn(2, 3, 8, 8))
    assert macs == {"0": 2 * 8 * 64 * 27, "1": 2 * 8 * 36 * 9, "3": 2 * 5 * 288}


# ---------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet"])
def test_save_load_round_trip(arch):
    model, x = make(arch)
    groups = coupled_groups(model, x)
    shrink(groups, pick_dead(groups), factor=0.0)
    pruned = prune(model, x)
    expected = eval_out(pruned, x)

    buffer = io.BytesIO()  # 1) the whole module (the class must be importable)
    torch.save(pruned, buffer)
    buffer.seek(0)
    torch.testing.assert_close(
        eval_out(torch.load(buffer, weights_only=False), x), expected, rtol=0, atol=0
    )

    buffer = io.BytesIO()  # 2) a state_dict, loaded into a freshly built model
    torch.save(pruned.state_dict(), buffer)
    buffer.seek(0)
    fresh = make(arch, seed=9)[0]
    loaded = load_pruned(fresh, torch.load(buffer, weights_only=True))
    torch.testing.assert_close(eval_out(loaded, x), expected, rtol=0, atol=0)
    assert sum(p.numel() for p in loaded.parameters()) == sum(
        p.numel() for p in pruned.parameters()
    )
    assert sum(p.numel() for p in fresh.parameters()) == sum(p.numel() for p in model.parameters())


def test_load_pruned_rejects_a_mismatched_state_dict():
    model, _ = make("lenet5")
    state = model.state_dict()
    del state["features.0.bias"]
    with pytest.raises(RuntimeError, match="features.0.bias"):
        load_pruned(LeNet5(), state)


# ---------------------------------------------------------------------------- bad input


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.GroupNorm(2, 8)
        self.head = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x)))).mean(dim=(2, 3))


class Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).detach()


@pytest.mark.parametrize(
    "model, x, call, error, match",
    [
        (make("lenet5")[0], torch.randn(1, 1, 28, 28), "prune_negative", ValueError, ">= 0"),
        (make("lenet5")[0], torch.randn(1, 3, 28, 28), "prune", PruningError, "cannot trace"),
        (make("lenet5")[0], torch.randn(1, 3, 28, 28), "report", PruningError, "cannot trace"),
        (make("lenet5")[0], torch.randn(1, 3, 28, 28), "groups", PruningError, "cannot trace"),
        (Detached(), torch.randn(1, 3, 8, 8), "prune", PruningError, "no output depends"),
        (GroupNormNet(), torch.randn(1, 3, 8, 8), "prune", PruningError, "'norm'.*GroupNorm"),
        (GroupNormNet(), torch.randn(1, 3, 8, 8), "groups", PruningError, "'norm'.*GroupNorm"),
        (
            nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 4, 3, groups=2)),
            torch.randn(1, 4, 8, 8),
            "prune",
            PruningError,
            "'1'.*grouped",
        ),
    ],
    ids=["negative", "untraceable", "report", "groups", "detached", "gn", "gn-groups", "grouped"],
)
def test_bad_input_changes_nothing(model, x, call, error, match):
    before = snapshot(model)
    calls = {
        "prune_negative": lambda: prune(model, x, threshold=-1.0),
        "prune": lambda: prune(model, x),
        "report": lambda: sparsity_report(model, x),
        "groups": lambda: coupled_groups(model, x),
    }
    with pytest.raises(error, match=match):
        calls[call]()
    assert_unchanged(model, before)
    assert all(not m._forward_hooks for m in model.modules())


def test_non_lossless_pruning_is_refused():
    """A channel-mixing op the dependency graph sees as element-wise: verification catches it."""

    class ChannelMean(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            return self.head(y - y.mean(dim=1, keepdim=True)).mean(dim=(2, 3))

    model, x = ChannelMean(), torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        model.conv.weight[0] = 0
        model.conv.bias[0] = 0
        model.head.weight[:, 0] = 0
    before = snapshot(model)
    with pytest.raises(PruningError, match="not lossless"):
        prune(model, x)
    assert_unchanged(model, before)
