"""The sparsity report and MAC counts (fastsparse.pruning.report): what pruning would remove,
per layer and in total, and the multiply-adds of conv and linear layers."""

import pytest
import torch
from torch import nn

from fastsparse.pruning import count_macs, coupled_groups, prune, sparsity_report
from fastsparse.pruning.importance import producer_norms
from tests.helpers import (
    arch_model,
    assert_state_unchanged,
    pick_dead,
    shrink,
    state_snapshot,
)


@pytest.mark.parametrize("arch", ["lenet5", "mobilenet"])
def test_sparsity_report(arch):
    model, x = arch_model(arch)
    groups = coupled_groups(model, x)
    dead = pick_dead(groups)
    shrink(groups, dead, factor=0.0)
    before = state_snapshot(model)
    report = sparsity_report(model, x)
    assert_state_unchanged(model, before)
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
    model, x = arch_model("lenet5")
    norms = producer_norms(coupled_groups(model, x))[0]
    threshold = float(norms.median())
    row = sparsity_report(model, x, threshold=threshold).layers[0]
    assert row.name == "features.0" and row.alive == int((norms > threshold).sum())


def test_count_macs():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, groups=8), nn.Flatten())
    model.append(nn.Linear(8 * 6 * 6, 5))
    macs = count_macs(model, torch.randn(2, 3, 8, 8))
    assert macs == {"0": 2 * 8 * 64 * 27, "1": 2 * 8 * 36 * 9, "3": 2 * 5 * 288}


def test_filters_feeding_a_constant_are_reported_kept():
    # A zero filter whose BatchNorm shift is not zero outputs a constant, not zero: it stays,
    # and the report says why.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 2),
    ).eval()  # fmt: skip
    with torch.no_grad():
        model[0].weight[:3] = 0
        model[0].bias[:3] = 0
        model[1].weight[:3] = 0
        model[1].bias[:2] = 0  # channels 0, 1 dead; channel 2 is the constant relu(bias)
        model[1].bias[2] = 0.5
    report = sparsity_report(model, torch.randn(1, 3, 8, 8))
    layer = next(layer for layer in report.layers if layer.name == "0")
    assert (layer.alive, layer.filters_after, layer.constant) == (4, 4, 1)
    assert "0: 1 filter(s) with zero weights feed a constant output" in str(report)
