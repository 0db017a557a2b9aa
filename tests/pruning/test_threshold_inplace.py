"""The public thresholding step, `fastsparse.threshold_`: scored once (no cascade), per layer or
global, only whole coupled groups zeroed; `prune` then removes exactly those filters."""

import pytest
import torch
from torch import nn

import fastsparse as fs


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3),
    )  # fmt: skip
    with torch.no_grad():
        model[0].weight[:3] *= 1e-3  # three weak filters in the first conv
        model[1].bias.fill_(0.1)  # BatchNorm shifts that are not zero
    return model.eval()


X = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_scores_are_taken_before_any_zeroing():
    model = _model()
    before = model[3].weight.detach().flatten(1).norm(dim=1)
    limit = 0.5 * float(before.max())
    zeroed = fs.threshold_(model, X, 0.5)
    # Zeroing conv 0's weak filters also zeroed conv 3's input slices, shrinking its norms; the
    # decision for conv 3 was still made on the norms before.
    assert torch.equal(zeroed["3"], (before <= limit) & (before != before.max()))
    assert zeroed["0"].tolist() == [True] * 3 + [False] * 5


def test_only_coupled_groups_are_touched():
    model = _model()
    classifier_bias = model[6].bias.detach().clone()
    zeroed = fs.threshold_(model, X, 0.5)
    assert torch.equal(model[6].bias, classifier_bias)  # never a group of its own
    kept_shift = model[1].bias[~zeroed["0"]]
    assert torch.all(kept_shift == 0.1) and torch.all(model[1].bias[zeroed["0"]] == 0)
    small = fs.prune(model, X)
    assert small[0].out_channels == int((~zeroed["0"]).sum())
    assert small[3].out_channels == int((~zeroed["3"]).sum())


def test_global_mode_uses_the_largest_score_of_all_layers():
    model = _model()
    scores = [model[i].weight.detach().flatten(1).norm(dim=1) for i in (0, 3)]
    overall = max(float(s.max()) for s in scores)
    zeroed = fs.threshold_(_model(), X, 0.3, mode="global")
    for name, s in zip(("0", "3"), scores):
        expected = s <= 0.3 * overall
        expected[int(s.argmax())] = False
        assert torch.equal(zeroed[name], expected)


@pytest.mark.parametrize(
    "kwargs, error",
    [({"mode": "per-layer"}, ValueError), ({"criterion": "energy"}, ValueError)],
)
def test_bad_options(kwargs, error):
    with pytest.raises(error):
        fs.threshold_(_model(), X, 0.1, **kwargs)


def test_threshold_and_prune_leaves_the_model_alone():
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = fs.threshold_and_prune(model, X, 0.5)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert result.kept["0"] == (5, 8)
