"""Lossless physical pruning (fastsparse.pruning.prune) on LeNet-5, VGG-11-BN, a ResNet-18-style
residual net, a MobileNet-style depthwise-separable net (small widths) and a concat model the
feature was not designed around: prox then prune, thresholds, edge cases, save/load, bad input."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import fastsparse as fs
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
from fastsparse.pruning.importance import dead_masks, producer_norms, zero_channels_
from fastsparse.workflow.models import LeNet5
from tests.helpers import (
    ARCHS,
    arch_model,
    assert_state_unchanged,
    eval_out,
    pick_dead,
    shrink,
    state_snapshot,
)


def removed_elements(groups, dead):
    """Expected removal: per parameter name, the union of the dead groups' slices."""
    masks = {}
    for cg, d in zip(groups, dead):
        for m in cg.members:
            mask = masks.setdefault(m.name, torch.zeros(m.param.shape, dtype=torch.bool))
            mask.index_fill_(m.dim, m.index[torch.isin(m.group, d)], True)
    return masks


# ------------------------------------------------------------------------------------------------
# prox then prune
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["group_l0", "group_lasso", "l0_group_lasso"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_prox_then_prune_is_lossless_and_smaller(arch, kind):
    model, x = arch_model(arch)
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
    before = state_snapshot(model)
    params_before = sum(p.numel() for p in model.parameters())
    macs_before = count_macs(model, x)
    weights_before = {
        name: m.weight.shape for name, m in model.named_modules() if name in macs_before
    }
    expected_removed = removed_elements(groups, dead)

    pruned = prune(model, x)

    assert_state_unchanged(model, before)
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
    model, x = arch_model(arch, seed=3)
    groups = coupled_groups(model, x)
    shrink(groups, pick_dead(groups, fraction=0.25, seed=4), factor=0.05)
    threshold = float(torch.cat(producer_norms(groups)).quantile(0.3))
    pruned = prune(model, x, threshold=threshold)
    thresholded = copy.deepcopy(model)
    copied = coupled_groups(thresholded, x)
    zero_channels_(copied, dead_masks(copied, threshold))
    torch.testing.assert_close(eval_out(pruned, x), eval_out(thresholded, x), rtol=0, atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_zero_producers_are_removed_whatever_the_consumers_hold(arch):
    """A per-filter regularizer zeroes filters (and BatchNorm affines), never the next layer's
    input slices: such a channel outputs exactly zero, so it is removed, losslessly."""
    model, x = arch_model(arch, seed=5)
    groups = coupled_groups(model, x)
    picked = [torch.tensor([0, 1]) if cg.num_groups > 2 else torch.tensor([], dtype=torch.long)
              for cg in groups]  # fmt: skip
    with torch.no_grad():
        for cg, channels in zip(groups, picked):
            for m in cg.members:
                if m.dim == 0:  # producers only: filters, biases, BatchNorm scale and shift
                    sel = m.index[torch.isin(m.group, channels)]
                    m.param.index_fill_(m.dim, sel, 0.0)
    expected = eval_out(model, x)
    pruned = prune(model, x)
    torch.testing.assert_close(eval_out(pruned, x), expected, rtol=1e-5, atol=1e-6)
    removed = sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for p in pruned.parameters()
    )
    assert removed > 0
    report = sparsity_report(model, x)
    assert any(layer.alive < layer.filters for layer in report.layers)


def test_constant_channel_is_kept():
    """Conv filter and BN scale zero but BN shift not: a constant channel, which must stay."""
    model, x = arch_model("vgg11_bn")
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
    model, x = arch_model("lenet5")
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
    model, x = arch_model("resnet18")
    model.stem[0].weight.requires_grad_(False)
    pruned = prune(model, x)
    assert pruned is not model and all(m.training for m in pruned.modules())
    assert not pruned.stem[0].weight.requires_grad and pruned.fc.weight.requires_grad
    assert sum(p.numel() for p in pruned.parameters()) == sum(p.numel() for p in model.parameters())
    model.eval()
    assert not any(m.training for m in prune(model, x).modules())


# ------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet"])
def test_save_load_round_trip(arch):
    model, x = arch_model(arch)
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
    fresh = arch_model(arch, seed=9)[0]
    loaded = load_pruned(fresh, torch.load(buffer, weights_only=True))
    torch.testing.assert_close(eval_out(loaded, x), expected, rtol=0, atol=0)
    assert sum(p.numel() for p in loaded.parameters()) == sum(
        p.numel() for p in pruned.parameters()
    )
    assert sum(p.numel() for p in fresh.parameters()) == sum(p.numel() for p in model.parameters())


def test_load_pruned_rejects_a_mismatched_state_dict():
    model, _ = arch_model("lenet5")
    state = model.state_dict()
    del state["features.0.bias"]
    with pytest.raises(RuntimeError, match="features.0.bias"):
        load_pruned(LeNet5(), state)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


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
        (arch_model("lenet5")[0], torch.randn(1, 1, 28, 28), "prune_negative", ValueError, ">= 0"),
        (arch_model("lenet5")[0], torch.randn(1, 3, 28, 28), "prune", PruningError, "cannot trace"),
        (
            arch_model("lenet5")[0],
            torch.randn(1, 3, 28, 28),
            "report",
            PruningError,
            "cannot trace",
        ),
        (
            arch_model("lenet5")[0],
            torch.randn(1, 3, 28, 28),
            "groups",
            PruningError,
            "cannot trace",
        ),
        (Detached(), torch.randn(1, 3, 8, 8), "prune", PruningError, "no output depends"),
        (GroupNormNet(), torch.randn(1, 3, 8, 8), "strict", PruningError, "'norm'.*GroupNorm"),
        (GroupNormNet(), torch.randn(1, 3, 8, 8), "groups", PruningError, "'norm'.*GroupNorm"),
        (
            nn.Sequential(nn.Conv2d(4, 8, 3), nn.ConvTranspose2d(8, 4, 3)),
            torch.randn(1, 4, 8, 8),
            "strict",
            PruningError,
            "'1'.*transposed",
        ),
    ],
    ids=[
        "negative",
        "untraceable",
        "report",
        "groups",
        "detached",
        "gn",
        "gn-groups",
        "transposed",
    ],
)
def test_bad_input_changes_nothing(model, x, call, error, match):
    before = state_snapshot(model)
    calls = {
        "prune_negative": lambda: prune(model, x, threshold=-1.0),
        "prune": lambda: prune(model, x),
        "report": lambda: sparsity_report(model, x),
        "groups": lambda: coupled_groups(model, x, strict=True),
        "strict": lambda: prune(model, x, strict=True),
    }
    with pytest.raises(error, match=match):
        calls[call]()
    assert_state_unchanged(model, before)
    assert all(not m._forward_hooks for m in model.modules())


class MixedNet(nn.Module):
    """A prunable conv pair, and a conv whose channels feed a GroupNorm (not prunable)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        y = self.norm(self.c(torch.relu(self.b(torch.relu(self.a(x))))))
        return self.head(y.mean(dim=(2, 3)))


def test_an_unsupported_layer_leaves_its_group_whole_and_the_rest_is_pruned():
    torch.manual_seed(0)
    model, x = MixedNet().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model.a.weight[:3] = 0
        model.a.bias[:3] = 0
    assert [g.root for g in coupled_groups(model, x)] == ["a", "b"]
    with pytest.warns(UserWarning, match="'c'.*GroupNorm"):
        small = prune(model, x)
    assert small.a.out_channels == 5 and small.c.out_channels == 8
    torch.testing.assert_close(eval_out(small, x), eval_out(model, x), rtol=1e-5, atol=1e-6)
    report = sparsity_report(model, x)
    assert [root for root, _ in report.skipped] == ["c"]
    assert "not prunable, left whole: c:" in report.format()


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
    before = state_snapshot(model)
    with pytest.raises(PruningError, match="not lossless"):
        prune(model, x)
    assert_state_unchanged(model, before)


def test_models_too_large_to_trace_are_refused_before_any_copy(monkeypatch):
    from fastsparse.pruning import structure

    model, x = LeNet5(), torch.randn(1, 1, 28, 28)
    monkeypatch.setattr(structure, "MAX_TRACED_PARAMETERS", 1000)
    monkeypatch.setattr(copy, "deepcopy", lambda *a, **k: pytest.fail("copied before the check"))
    for call in (fs.prune, fs.coupled_groups, fs.sparsity_report, fs.threshold_and_prune):
        with pytest.raises(fs.PruningError, match="M parameters, more than the"):
            call(model, x, 0.5) if call is fs.threshold_and_prune else call(model, x)
