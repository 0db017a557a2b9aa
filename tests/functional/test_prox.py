"""The public proximal / threshold step `prox_` on every backend: against explicit per-group
formulas and the oracle (kinds, groupings, dtypes, layouts, long groups), its properties, the
validation of a bad call (which changes nothing), and prox on coupled groups."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fastsparse as fs
import fastsparse.reference as ref
from fastsparse.core.contract import PROX_KINDS, accumulation_dtype
from fastsparse.core.groups import CoupledGroup, CoupledMember
from fastsparse.functional.prox import PROX_BACKENDS, prox_
from fastsparse.pruning import coupled_groups
from tests.helpers import (
    coupled_models,
    explicit_prox,
    grouping_id,
    make,
    overlapping_groups,
    shapes_for,
)

GROUPINGS = ("filters", "channels", "kernels", None)


# ------------------------------------------------------------------------------------------------
# Against explicit formulas and the oracle
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grouping", GROUPINGS, ids=str)
@pytest.mark.parametrize("kind", PROX_KINDS)
def test_matches_explicit_formula(kind, grouping):
    # backend "auto": the native kernels on a CPU (the oracle: tests/reference/test_prox.py)
    torch.manual_seed(0)
    w = torch.randn(7, 5, 3, 3, dtype=torch.float64)
    w[2] = 0.0  # an all-zero filter stays zero and never gives NaN
    t = 0.9 if grouping in ("filters", "channels") else 0.5
    t = 0.3 * t if grouping is None else t
    expected, expected_kept = explicit_prox(w, kind, t, grouping)
    kept = prox_(w, kind, t, groups=grouping)[0]
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(kept, expected_kept)
    assert not w.isnan().any()


PROX_CASES = [
    ("l1", 0.5),
    ("l0", 0.5),
    ("group_lasso", 1.5),
    ("group_l0", 2.0),
    ("l0_group_lasso", (0.4, 1.0)),
]


@pytest.mark.parametrize("kind,threshold", PROX_CASES, ids=[k for k, _ in PROX_CASES])
@pytest.mark.parametrize("grouping", ["filters", "channels", "kernels", None], ids=grouping_id)
def test_fused_prox_matches_oracle(kind, threshold, grouping, backend, device):
    shapes = shapes_for(grouping) + ([(3, 20000)] if grouping != "kernels" else [])
    tensors = make(shapes, torch.float32, device, seed=31)
    fused = [t.clone() for t in tensors]
    expected = [t.clone() for t in tensors]
    masks = prox_(fused, kind, threshold, groups=grouping, backend=backend)
    expected_masks = ref.prox_(expected, kind, threshold, grouping)
    for f, e, m, em in zip(fused, expected, masks, expected_masks):
        torch.testing.assert_close(f, e, rtol=1e-6, atol=1e-6)
        assert torch.equal(m.cpu(), em.cpu())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_fused_prox_dtypes_and_layouts(dtype, backend, device):
    base = make([(6, 4, 3, 3)], dtype, device, seed=32)[0]
    for layout in (
        lambda t: t,
        lambda t: t.to(memory_format=torch.channels_last),
        lambda t: t.transpose(0, 1),
    ):
        w, expected = layout(base.clone()), layout(base.clone())
        prox_(w, "group_lasso", 1.0, groups="filters", backend=backend)
        ref.prox_([expected], "group_lasso", 1.0, "filters")
        torch.testing.assert_close(
            w,
            expected,
            rtol=1e-2 if dtype == torch.bfloat16 else 1e-12,
            atol=1e-2 if dtype == torch.bfloat16 else 1e-12,
        )


# ------------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PROX_KINDS)
def test_zero_threshold_is_identity(kind):
    torch.manual_seed(1)
    w = torch.randn(6, 4, 3)
    w[1] = 0.0
    before = w.clone()
    kept = prox_(w, kind, 0.0)[0]
    assert torch.equal(w, before)
    assert kept.tolist() == [True, False, True, True, True, True]


def test_boundary_is_dead():
    """|w| == t and n == t are dead (the rule shared with prune: dead when <= t)."""
    w = torch.tensor([[-0.5, 0.25, 1.0]])
    prox_(w, "l0", 0.5)
    assert w.tolist() == [[0.0, 0.0, 1.0]]
    w = torch.tensor([[3.0, 4.0], [6.0, 8.0]])
    assert prox_(w.clone(), "group_l0", 5.0)[0].tolist() == [False, True]
    g = w.clone()
    assert prox_(g, "group_lasso", 5.0)[0].tolist() == [False, True]
    assert g.tolist() == [[0.0, 0.0], [3.0, 4.0]]


def test_group_lasso_is_the_proximal_operator():
    """y = prox(w) minimizes 1/2 ||y - w||^2 + t sum_g ||y_g||: perturbations never do better."""
    torch.manual_seed(2)
    w = torch.randn(8, 6, dtype=torch.float64)
    t = 1.5
    y = w.clone()
    prox_(y, "group_lasso", t)

    def objective(z):
        return 0.5 * (z - w).square().sum() + t * z.norm(dim=1).sum()

    best = objective(y)
    for _ in range(200):
        assert objective(y + 1e-3 * torch.randn_like(y)) >= best - 1e-12


def test_l0_group_lasso_composes_and_takes_a_pair():
    torch.manual_seed(3)
    w = torch.randn(9, 4, 3, 3)
    a, b = w.clone(), w.clone()
    prox_(a, "l0_group_lasso", (0.4, 2.0))
    prox_(b, "l0", 0.4)
    prox_(b, "group_lasso", 2.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c, d = w.clone(), w.clone()
    prox_(c, "l0_group_lasso", 0.7)
    prox_(d, "l0_group_lasso", (0.7, 0.7))
    assert torch.equal(c, d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kind", PROX_KINDS)
def test_dtypes_compute_in_accumulation_dtype_and_round_once(kind, dtype):
    torch.manual_seed(4)
    w = torch.randn(5, 3, 3, 3).to(dtype)
    expected = w.to(accumulation_dtype(dtype))
    prox_(expected, kind, 0.8)
    prox_(w, kind, 0.8)
    assert w.dtype == dtype
    assert torch.equal(w, expected.to(dtype))


def test_in_place_on_parameters_and_views():
    conv = torch.nn.Conv2d(3, 4, 3)
    ptr = conv.weight.data_ptr()
    masks = prox_([conv.weight, conv.bias], "l1", 0.05)
    assert conv.weight.data_ptr() == ptr and conv.weight.requires_grad
    assert [m.shape for m in masks] == [torch.Size([4]), torch.Size([4])]
    base = torch.randn(4, 6, 5)
    view = base.transpose(0, 1)  # non-contiguous: written through to `base`
    expected = view.clone()
    prox_(expected, "group_lasso", 1.0, groups="channels")
    prox_(view, "group_lasso", 1.0, groups="channels")
    assert torch.equal(base.transpose(0, 1), expected)


def test_mask_shapes_and_empty_tensors():
    w = torch.randn(4, 3, 2, 2)
    shapes = {g: prox_(w.clone(), "group_l0", 0.1, groups=g)[0].shape for g in GROUPINGS}
    assert shapes == {
        "filters": torch.Size([4]),
        "channels": torch.Size([3]),
        "kernels": torch.Size([12]),
        None: torch.Size([1]),
    }
    assert prox_(torch.empty(0, 3), "group_lasso", 1.0)[0].shape == torch.Size([0])
    assert prox_(torch.empty(2, 0), "l1", 1.0)[0].tolist() == [False, False]
    assert prox_([], "l1", 1.0) == []


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def _two_tensors():
    torch.manual_seed(5)
    return [torch.randn(4, 3, 3, 3), torch.randn(4)]


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda ts: prox_(ts, "l1", -0.1), ValueError, ">= 0"),
        (lambda ts: prox_(ts, "l1", float("nan")), ValueError, ">= 0"),
        (lambda ts: prox_(ts, "l1", True), TypeError, "real number"),
        (lambda ts: prox_(ts, "l1", "0.1"), TypeError, "real number"),
        (lambda ts: prox_(ts, "group_lasso", (0.1, 0.2)), ValueError, "pair"),
        (lambda ts: prox_(ts, "l0_group_lasso", (0.1, -0.2)), ValueError, ">= 0"),
        (lambda ts: prox_(ts, "hoyer", 0.1), ValueError, "valid kinds: l1, group_lasso"),
        (lambda ts: prox_(ts, "l1", 0.1, groups="rows"), ValueError, "valid groupings"),
        (lambda ts: prox_(ts, "l1", 0.1, groups=("filters", "channels")), ValueError, "tuple"),
        (lambda ts: prox_(ts, "l1", 0.1, groups="channels"), ValueError, r"tensors\[1\]"),
        (lambda ts: prox_(ts, "l1", 0.1, backend="numpy"), ValueError, "valid backends"),
        (lambda ts: prox_([*ts, torch.ones(3, dtype=torch.int64)], "l1", 0.1), TypeError, "dtype"),
        (lambda ts: prox_([*ts, "w"], "l1", 0.1), TypeError, "not a tensor"),
        (
            lambda ts: prox_([*ts, torch.ones(3, device="meta")], "l1", 0.1),
            ValueError,
            "one device",
        ),
        (lambda ts: prox_([*ts, torch.ones(3).to_sparse()], "l1", 0.1), TypeError, "dense"),
        (lambda ts: prox_(None, "l1", 0.1), ValueError, "None"),
    ],
)
def test_bad_input_changes_nothing(call, error, match):
    tensors = _two_tensors()
    before = [t.clone() for t in tensors]
    with pytest.raises(error, match=match):
        call(tensors)
    for t, b in zip(tensors, before):
        assert torch.equal(t, b)


@pytest.mark.parametrize("backend", [b for b in PROX_BACKENDS if b != "cuda"])
def test_every_backend_name_runs(backend):
    w = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    assert prox_(w, "group_l0", 1.0, backend=backend)[0].tolist() == [True, False]


def test_cuda_backend_on_cpu_tensors_is_refused():
    w = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        prox_(w, "group_l0", 1.0, backend="cuda")
    assert w[1].tolist() == pytest.approx([0.3, 0.4])


def test_module_argument_and_tensor_threshold():
    lin = torch.nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight[1] = 0.01
    masks = prox_(lin, "group_l0", torch.tensor(0.1))
    assert masks[0].tolist() == [True, False, True]


# ------------------------------------------------------------------------------------------------
# Coupled groups
# ------------------------------------------------------------------------------------------------


def test_coupled_prox_is_simultaneous():
    groups, (a_w, a_b, b_w) = overlapping_groups()
    norms_a, norms_b = ref.coupled_group_norms(groups)
    t = float(torch.cat([norms_a, norms_b]).median())
    orig = [p.clone() for p in (a_w, a_b, b_w)]
    masks = prox_(None, "group_lasso", t, groups=groups)
    fa = torch.clamp(1 - t / norms_a, min=0)
    fb = torch.clamp(1 - t / norms_b, min=0)
    torch.testing.assert_close(a_w, orig[0] * fa[:, None])
    torch.testing.assert_close(a_b, orig[1] * fa)
    torch.testing.assert_close(b_w, orig[2] * fa[None, :] * fb[:, None])  # both factors
    assert masks[0].tolist() == (norms_a > t).tolist()
    assert masks[1].tolist() == (norms_b > t).tolist()


def test_coupled_group_l0_zeroes_union_and_element_kinds_apply_once():
    groups, (a_w, a_b, b_w) = overlapping_groups()
    with torch.no_grad():
        a_w[1], a_b[1], b_w[:, 1] = 1e-3, 1e-3, 1e-3  # group 1 of A is nearly dead
    keep = [a_w.clone(), b_w.clone()]
    masks = prox_(None, "group_l0", 0.01, groups=groups)
    assert masks[0].tolist() == [True, False, True] and masks[1].tolist() == [True, True]
    assert (a_w[1] == 0).all() and a_b[1] == 0 and (b_w[:, 1] == 0).all()
    assert torch.equal(a_w[[0, 2]], keep[0][[0, 2]]) and torch.equal(b_w[:, 0], keep[1][:, 0])

    groups, (a_w, a_b, b_w) = overlapping_groups()
    expected = b_w.clone()
    prox_(expected, "l1", 0.2)
    prox_(None, "l1", 0.2, groups=groups)  # b.weight is in both sets: thresholded once
    assert torch.equal(b_w, expected)


def test_coupled_prox_leaves_uncovered_elements():
    w = torch.full((3, 2), 0.25)
    group = CoupledGroup("w", 1, (CoupledMember("w", w, 0, torch.tensor([1]), torch.tensor([0])),))
    prox_(None, "l0", 0.5, groups=group)
    assert w.tolist() == [[0.25, 0.25], [0.0, 0.0], [0.25, 0.25]]


def test_coupled_members_are_rows_or_columns():
    w = torch.ones(3, 2, 2)
    slices = CoupledMember("w", w, 2, torch.tensor([1]), torch.tensor([0]))
    with pytest.raises(
        ValueError, match=r"w is sliced along dim 2; members are slices along dim 0"
    ):
        prox_(None, "group_l0", 10.0, groups=CoupledGroup("w", 1, (slices,)))
    assert torch.equal(w, torch.ones(3, 2, 2))


def test_coupled_groups_must_belong_to_tensors():
    groups, params = overlapping_groups()
    before = [p.clone() for p in params]
    with pytest.raises(ValueError, match="another copy"):
        prox_([params[0]], "group_l0", 10.0, groups=groups)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    prox_(list(params), "group_l0", 0.0, groups=groups)  # all there: accepted


@pytest.mark.parametrize("kind", ["group_lasso", "group_l0"])
def test_coupled_prox_zeroes_whole_groups_and_prune_removes_them(kind, backend, device):
    model, x = coupled_models()[1]
    model = model.to(device).eval()
    x = x.to(device)
    groups = coupled_groups(model, x)
    expected_model = copy.deepcopy(model)
    expected_groups = coupled_groups(expected_model, x)
    threshold = torch.quantile(torch.cat(ref.coupled_group_norms(groups)), 0.4).item()
    masks = prox_(None, kind, threshold, groups=groups, backend=backend)
    expected_masks = ref.prox_(None, kind, threshold, expected_groups)
    for m, e in zip(masks, expected_masks):
        assert torch.equal(m.cpu(), e.cpu())
    for p, e in zip(model.parameters(), expected_model.parameters()):
        torch.testing.assert_close(p, e, rtol=1e-6, atol=1e-6)
    dead = sum(int((~m).sum()) for m in masks)
    assert dead > 0
    pruned = fs.prune(model, x, threshold=0.0)
    torch.testing.assert_close(pruned(x), model(x), rtol=0, atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# The SGD step fused with the prox
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,threshold", PROX_CASES, ids=[k for k, _ in PROX_CASES])
@pytest.mark.parametrize("grouping", ["filters", "channels", "kernels", None], ids=grouping_id)
def test_sgd_prox_matches_the_step_then_the_prox(kind, threshold, grouping, backend, device):
    from fastsparse.core.layout import SPLIT_BLOCK, group_count
    from fastsparse.functional import sgd_prox_

    if backend == "native" and device != "cpu":
        pytest.skip("the native fused step is CPU code (CUDA tensors take the Triton one)")
    # Groups that fit one chunk: longer ones are declined (tested below).
    shapes = [
        s for s in shapes_for(grouping) if math.prod(s) // group_count(s, grouping) <= SPLIT_BLOCK
    ]
    params = make(shapes, torch.float64, device, seed=41)
    expected = [p.clone() for p in params]
    for p, e in zip(params, expected):
        p.grad = torch.randn_like(p)
        e.grad = p.grad.clone()
    options = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=False)
    bufs = [torch.empty_like(p) for p in params]
    expected_bufs = None
    for step in range(2):
        masks = sgd_prox_(params, kind, threshold, bufs=bufs, first=step == 0, groups=grouping,
                          backend=backend, **options)  # fmt: skip
        expected_masks, expected_bufs = ref.sgd_prox_(
            expected, expected_bufs, options, kind, threshold, grouping
        )
        for p, e, m, em in zip(params, expected, masks, expected_masks):
            torch.testing.assert_close(p, e, rtol=1e-12, atol=1e-12)
            assert torch.equal(m, em)
        for b, eb in zip(bufs, expected_bufs):
            torch.testing.assert_close(b, eb, rtol=1e-12, atol=1e-12)


def test_sgd_prox_declines_what_it_cannot_fuse():
    from fastsparse.functional import sgd_prox_

    def one(dtype=torch.float32, grad_layout=lambda g: g):
        w = torch.randn(4, 3, dtype=dtype)
        w.grad = grad_layout(torch.randn(4, 3, dtype=dtype))
        return w

    long = torch.randn(1, 20000)
    long.grad = torch.randn_like(long)
    cases = [
        ([one(torch.bfloat16)], {}),  # bf16: no fused pass
        ([one(grad_layout=lambda g: g.t().contiguous().t())], {}),  # grad laid out otherwise
        ([one()], {"backend": "torch"}),
        ([torch.randn(2, 20000)], {}),  # no grad
        ([long], {}),  # a group longer than one chunk
    ]
    for params, extra in cases:
        before = [p.clone() for p in params]
        assert sgd_prox_(params, "group_lasso", 0.1, lr=0.1, **extra) is None
        assert all(torch.equal(p, b) for p, b in zip(params, before))
    with pytest.raises(ValueError, match="bufs"):
        sgd_prox_([one()], "group_lasso", 0.1, lr=0.1, momentum=0.9)


@pytest.mark.parametrize("kind,threshold", PROX_CASES, ids=[k for k, _ in PROX_CASES])
@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam"])
def test_adam_prox_matches_the_step_then_the_prox(kind, threshold, decoupled, backend, device):
    from fastsparse.functional import adam_prox_

    if backend == "native" and device != "cpu":
        pytest.skip("the native fused step is CPU code (CUDA tensors take the Triton one)")
    params = make([(6, 4, 3, 3), (7, 13), (5,)], torch.float64, device, seed=43)
    expected = [p.clone() for p in params]
    moments = [[torch.zeros_like(p) for p in params] for _ in range(4)]
    options = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, decoupled=decoupled)
    for step in (1, 2, 3):
        for p, e in zip(params, expected):
            p.grad = torch.randn_like(p)
            e.grad = p.grad.clone()
        masks = adam_prox_(params, kind, threshold, lr=0.01, step=step, exp_avgs=moments[0],
                           exp_avg_sqs=moments[1], betas=(0.9, 0.99), weight_decay=0.05,
                           decoupled=decoupled, backend=backend)  # fmt: skip
        expected_masks = ref.adam_prox_(
            expected, moments[2], moments[3], options, step, kind, threshold, "filters"
        )
        for p, e, m, em in zip(params, expected, masks, expected_masks):
            torch.testing.assert_close(p, e, rtol=1e-12, atol=1e-12)
            assert torch.equal(m, em)
    for got, want in zip(moments[0] + moments[1], moments[2] + moments[3]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="step"):
        adam_prox_(params, kind, threshold, lr=0.01, step=0, exp_avgs=moments[0],
                   exp_avg_sqs=moments[1])  # fmt: skip
