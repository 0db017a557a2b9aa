"""Threshold and prune (fastsparse.pruning.threshold): relative and absolute thresholds on the
filter norms, and the other criteria (BatchNorm scales, coupled-group norms)."""

import pytest
import torch

from fastsparse.pruning import coupled_groups, threshold_and_prune
from fastsparse.reference import coupled_group_stats
from fastsparse.workflow.models import VGG, LeNet5

X = torch.zeros(1, 1, 28, 28)


# ------------------------------------------------------------------------------------------------
# filter norms: relative and absolute thresholds
# ------------------------------------------------------------------------------------------------


def _lenet_with_weak_filters():
    torch.manual_seed(0)
    model = LeNet5().eval()
    with torch.no_grad():
        model.features[0].weight[:5] *= 1e-3  # 5 weak conv1 filters
        model.features[3].weight[:10] *= 0.04  # 10 weak conv2 filters
    return model


def test_threshold_and_prune_relative():
    model = _lenet_with_weak_filters()
    before = [p.clone() for p in model.parameters()]
    result = threshold_and_prune(model, X, 0.05)
    assert result.kept == {
        "features.0": (15, 20),
        "features.3": (40, 50),
        "classifier.0": (500, 500),
    }
    assert result.pruned.features[0].out_channels == 15
    assert result.pruned.features[3].in_channels == 15
    assert result.pruned.features[3].out_channels == 40
    assert result.report.params_after == sum(p.numel() for p in result.pruned.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # untouched
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(result.pruned(x), result.thresholded(x), atol=1e-5, rtol=0)
        # The weak filters' coupled groups are zero: filter, bias, next layer's input slice.
        assert result.thresholded.features[0].weight[:5].abs().sum() == 0
        assert result.thresholded.features[0].bias[:5].abs().sum() == 0
        assert result.thresholded.features[3].weight[:, :5].abs().sum() == 0


def test_threshold_absolute_keeps_the_strongest_filter():
    model = _lenet_with_weak_filters()
    result = threshold_and_prune(model, X, 1e6, mode="absolute")
    assert result.kept == {"features.0": (1, 20), "features.3": (1, 50), "classifier.0": (1, 500)}


def test_threshold_zero_removes_nothing():
    result = threshold_and_prune(_lenet_with_weak_filters(), X, 0.0)
    assert result.report.params_after == result.report.params


# ------------------------------------------------------------------------------------------------
# criteria
# ------------------------------------------------------------------------------------------------


def _vgg_with_dead_scales():
    torch.manual_seed(0)
    model = VGG(((8,), (16,)), in_channels=1).eval()
    with torch.no_grad():
        model.features[1].weight[:3] = 0.0  # BatchNorm scales of 3 channels of conv 1
    return model


def test_bn_scale_criterion_removes_channels_with_zero_scale():
    model, x = _vgg_with_dead_scales(), torch.randn(2, 1, 8, 8)
    by_norm = threshold_and_prune(model, x, 0.05)
    by_scale = threshold_and_prune(model, x, 0.05, criterion="bn_scale")
    assert by_norm.kept["features.0"] == (8, 8)  # the conv's filters themselves are not small
    assert by_scale.kept["features.0"] == (5, 8)
    with torch.no_grad():  # lossless: the zero-scale channels output only their BN shift...
        torch.testing.assert_close(by_scale.pruned(x), by_scale.thresholded(x), atol=1e-5, rtol=0)
    assert by_scale.pruned.features[0].out_channels == 5


def test_group_norm_criterion_scores_the_whole_coupled_group():
    torch.manual_seed(0)
    model, x = LeNet5().eval(), torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        model.features[0].weight[:4] *= 1e-3  # four small conv1 filters; two of them (2, 3)
        model.features[0].bias[:4] *= 1e-3
        model.features[3].weight[:, 2:4] *= 1e-3  # also feed conv2 weakly, two do not
    result = threshold_and_prune(model, x, 0.01, criterion="group_norm")
    groups = coupled_groups(LeNet5(), x)
    assert groups[0].root == "features.0"
    assert result.kept["features.0"] == (18, 20)  # filters 2 and 3 go, 0 and 1 stay
    assert threshold_and_prune(model, x, 0.01).kept["features.0"] == (16, 20)
    norms = coupled_group_stats(coupled_groups(model, x)[0])[1].sqrt()
    assert norms[:2].min() > norms[2:4].max()


def test_unknown_criterion():
    with pytest.raises(ValueError, match="valid: filter_norm, bn_scale, group_norm"):
        threshold_and_prune(LeNet5(), torch.randn(1, 1, 28, 28), 0.1, criterion="energy")
