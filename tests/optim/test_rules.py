"""Rules: validation of every option, parameter matching (regex, module type, predicate, lists,
defaults), one rule per parameter, groupings resolved to tensors, the cubic ramp."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

from fastsparse.optim import Rule, SparseOptimizer, rules, sparsifier
from fastsparse.optim.rules import resolve


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 5),
    )  # fmt: skip


def _names(rule_list, model=None):
    model = model or _net()
    groups = torch.optim.SGD(model.parameters(), lr=0.1).param_groups
    return [t.names for t in resolve(rule_list, model, groups)]


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(), "exactly one of"),
        (dict(prox="l1", penalty="l1"), "exactly one of"),
        (dict(prox="l2"), "unknown prox"),
        (dict(penalty="group_l0"), "unknown penalty"),
        (dict(prox="l1", groups="rows"), "unknown grouping"),
        (dict(prox="l1", strength=-1.0), ">= 0"),
        (dict(prox="l1", strength=float("nan")), ">= 0"),
        (dict(prox="l1", strength=(1.0, 2.0)), "a pair only"),
        (dict(target=1.0), r"\[0, 1\)"),
        (dict(target=0.5, scope="model"), "unknown scope"),
        (dict(target=0.5, ramp_steps=-1), "ramp_steps"),
        (dict(prox="l1", groups="blocks"), "block_size"),
        (dict(prox="l1", block_size=4), "only for groups='blocks'"),
    ],
)
def test_bad_rules_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        Rule(**options)


def test_matching():
    assert _names([Rule(prox="l1")]) == [["0.weight", "3.weight"]]  # the output layer left out
    weights = ["0.weight", "1.weight", "3.weight", "6.weight"]
    assert _names([Rule(r"\d\.weight", prox="l1")]) == [weights]
    assert _names([Rule("3.weight", prox="l1")]) == [["3.weight"]]
    assert _names([Rule((nn.BatchNorm2d, "bias"), prox="l1")]) == [["1.bias"]]
    small_vector = lambda name, p: p.dim() == 1 and p.numel() == 5  # noqa: E731
    assert _names([Rule(small_vector, prox="l1")]) == [["6.bias"]]
    assert _names([Rule([(nn.Linear, "weight"), "0.bias"], prox="l1")]) == [["0.bias", "6.weight"]]
    assert _names([Rule("3.weight", prox="l1"), Rule("0.weight", penalty="l1")]) == [
        ["3.weight"],
        ["0.weight"],
    ]


def test_frozen_parameters_are_left_out():
    model = _net()
    model[0].weight.requires_grad_(False)
    assert _names([Rule(prox="l1")], model) == [["3.weight"]]


def test_one_target_per_learning_rate():
    model = _net()
    opt = torch.optim.SGD(
        [{"params": [model[0].weight]}, {"params": [model[3].weight], "lr": 0.01}], lr=0.1
    )
    targets = resolve([Rule(prox="l1")], model, opt.param_groups)
    assert [(t.names, t.group_index) for t in targets] == [(["0.weight"], 0), (["3.weight"], 1)]


@pytest.mark.parametrize(
    "rule_list,match",
    [
        ([Rule("nothing", prox="l1")], "matches no trainable parameter"),
        ([Rule(prox="l1"), Rule("0.weight", prox="l0")], "matched by rules 0 and 1"),
        ([Rule("6.bias", prox="l1")], "not in the optimizer"),
        ([Rule("0.weight", prox="l1", groups="coupled")], "example_inputs"),
        ([Rule("0.bias", prox="l1", groups="blocks", block_size=3)], "divides by 3"),
    ],
)
def test_bad_matches_are_refused(rule_list, match):
    model = _net()
    params = [p for n, p in model.named_parameters() if n != "6.bias"]
    with pytest.raises(ValueError, match=match):
        SparseOptimizer(torch.optim.SGD(params, lr=0.1), model, rule_list)


def test_not_a_rule_is_refused():
    model = _net()
    with pytest.raises(TypeError, match="fastsparse.Rule"):
        SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, [{"prox": "l1"}])
    with pytest.raises(TypeError, match="Rule.params"):
        SparseOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, [Rule(3, prox="l1")])


def test_blocks_are_views_of_the_parameters():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (target,) = resolve([Rule("3.weight", prox="l1", groups="blocks", block_size=4)], model,
                        opt.param_groups)  # fmt: skip
    (view,) = target.tensors
    assert view.shape == (6 * 8 * 9 // 4, 4)
    assert view.data_ptr() == model[3].weight.data_ptr()


def test_cubic_ramp():
    rule = Rule(target=0.8, ramp_steps=10)
    values = [rule.sparsity(t) for t in range(-1, 13)]
    expected = [0.0] + [0.8 * (1 - (1 - t / 10) ** 3) for t in range(10)] + [0.8] * 3
    assert values == pytest.approx(expected, abs=1e-15)
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert Rule(target=0.5).sparsity(0) == 0.5  # no ramp: the target at once
    with pytest.raises(ValueError, match="no target"):
        Rule(prox="l1").sparsity(3)


@pytest.mark.parametrize("module", [rules, sparsifier])
def test_docstring_examples_run(module):
    failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0


def test_tensors_without_a_model():
    a = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    frozen = torch.randn(2, 2)
    groups = torch.optim.SGD([a, b], lr=0.1).param_groups
    assert [t.names for t in resolve([Rule(prox="l1")], [a, b, frozen], groups)] == [["0", "1"]]
    named = {"w": a, "b": b}
    assert [t.names for t in resolve([Rule("w", prox="l1")], named, groups)] == [["w"]]
    with pytest.raises(TypeError, match="needs the model"):
        resolve([Rule((nn.Linear, "weight"), prox="l1")], [a, b], groups)
    with pytest.raises(TypeError, match="needs the model"):
        resolve([Rule(prox="l1", groups="heads")], [a, b], groups)
    with pytest.raises(TypeError, match="not a tensor"):
        resolve([Rule(prox="l1")], {"w": 3.0}, groups)


def test_coupled_rules_take_the_groups_their_parameters_produce():
    model = _net()
    x = torch.randn(2, 3, 8, 8)
    groups = torch.optim.SGD(model.parameters(), lr=0.1).param_groups
    (target,) = resolve([Rule("3.weight", prox="group_l0", groups="coupled")], model, groups, x)
    # conv 3's filters (with the classifier's columns), not conv 0's channels it consumes
    assert [cg.root for cg in target.coupled] == ["3"]
    assert set(target.names) == {"3.weight", "3.bias", "6.weight"}
    with pytest.raises(ValueError, match="produce no coupled group"):
        resolve([Rule("6.weight", prox="group_l0", groups="coupled")], model, groups, x)
