"""Proximal / threshold steps: the oracle against explicit per-group formulas, the public `prox_`
validation (a bad call changes nothing) and prox / penalty on coupled groups."""

from __future__ import annotations

import math

import pytest
import torch

import fastsparse.reference as ref
from fastsparse.functional.prox import PROX_BACKENDS, prox_
from fastsparse.reference import PROX_KINDS, CoupledGroup, CoupledMember

GROUPINGS = ("filters", "channels", "kernels", None)


def explicit_prox(w: torch.Tensor, kind: str, t, grouping) -> tuple[torch.Tensor, torch.Tensor]:
    """Element by element and group by group in fp64 with Python loops: the independent check."""
    t_elem, t_group = (t, t) if not isinstance(t, tuple) else t
    x = ref.grouped_view(w.double(), grouping).clone()
    kept = []
    for g in range(x.shape[0]):
        row = x[g]
        if kind in ("l0", "l0_group_lasso"):
            row = torch.tensor([v if abs(v) > t_elem else 0.0 for v in row.tolist()], dtype=x.dtype)
        if kind == "l1":
            row = torch.tensor(
                [math.copysign(max(abs(v) - t_elem, 0.0), v) for v in row.tolist()], dtype=x.dtype
            )
        n = math.sqrt(sum(v * v for v in row.tolist()))
        if kind in ("group_lasso", "l0_group_lasso"):
            row = row * (max(0.0, 1.0 - t_group / n) if n > t_group else 0.0)
        if kind == "group_l0":
            row = row * (1.0 if n > t_group else 0.0)
        x[g] = row
        kept.append(n > t_group if kind not in ("l1", "l0") else bool((row != 0).any()))
    return ref.ungroup(x, w.shape, grouping), torch.tensor(kept, dtype=torch.bool)


@pytest.mark.parametrize("grouping", GROUPINGS, ids=str)
@pytest.mark.parametrize("kind", PROX_KINDS)
def test_oracle_matches_explicit_formula(kind, grouping):
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
    expected = w.to(ref.accumulation_dtype(dtype))
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


# ------------------------------------------------------------------------------ bad input


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


# ------------------------------------------------------------------------------ coupled groups


def _overlapping_groups():
    """Two layers a -> b and the two OICSR-style coupled groups, overlapping on b's weight.

    Group set A (root "a", G=3): a.weight rows, a.bias, b.weight columns.
    Group set B (root "b", G=2): b.weight rows.
    """
    torch.manual_seed(6)
    a_w = torch.randn(3, 4, dtype=torch.float64)
    a_b = torch.randn(3, dtype=torch.float64)
    b_w = torch.randn(2, 3, dtype=torch.float64)
    ar = torch.arange(3)
    group_a = CoupledGroup(
        "a",
        3,
        (
            CoupledMember("a.weight", a_w, 0, ar, ar),
            CoupledMember("a.bias", a_b, 0, ar, ar),
            CoupledMember("b.weight", b_w, 1, ar, ar),
        ),
    )
    group_b = CoupledGroup("b", 2, (CoupledMember("b.weight", b_w, 0, ar[:2], ar[:2]),))
    return [group_a, group_b], (a_w, a_b, b_w)


def _explicit_rows(groups):
    """Each group's elements, gathered with Python loops."""
    out = []
    for cg in groups:
        rows = []
        for g in range(cg.num_groups):
            parts = [
                m.param.select(m.dim, int(i)).flatten()
                for m in cg.members
                for i, gid in zip(m.index, m.group)
                if int(gid) == g
            ]
            rows.append(torch.cat(parts))
        out.append(rows)
    return out


def test_coupled_stats_and_norms_sum_member_slices():
    groups, _ = _overlapping_groups()
    for cg, rows in zip(groups, _explicit_rows(groups)):
        s1, s2 = ref.coupled_group_stats(cg)
        torch.testing.assert_close(s1, torch.stack([r.abs().sum() for r in rows]))
        torch.testing.assert_close(s2, torch.stack([r.square().sum() for r in rows]))
    norms = ref.coupled_group_norms(groups)
    assert [n.shape[0] for n in norms] == [3, 2]
    assert groups[0].group_sizes().tolist() == [4 + 1 + 2] * 3


def test_coupled_matrix_handles_uneven_groups():
    """A flatten maps one channel to several columns; group sizes may even differ."""
    w = torch.arange(12.0).reshape(2, 6)
    member = CoupledMember("fc.weight", w, 1, torch.arange(6), torch.tensor([0, 0, 0, 1, 1, 2]))
    matrix = ref.coupled_matrix(CoupledGroup("conv", 3, (member,)))
    assert matrix.shape == (3, 6)
    s1, _ = ref.coupled_group_stats(CoupledGroup("conv", 3, (member,)))
    assert s1.tolist() == [0 + 1 + 2 + 6 + 7 + 8, 3 + 4 + 9 + 10, 5 + 11]


@pytest.mark.parametrize("kind", ref.KINDS)
def test_coupled_penalty_and_grad(kind):
    groups, params = _overlapping_groups()
    expected = sum(
        ref.tensor_penalty(
            torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), kind, "filters", 0.5
        )
        for rows in _explicit_rows(groups)
    )
    torch.testing.assert_close(ref.coupled_penalty(groups, kind), expected)
    grads = ref.coupled_penalty_grad(groups, kind)
    assert [g.shape for g in grads] == [p.shape for p in params]
    leaves = [p.detach().requires_grad_(True) for p in params]
    mapping = {id(p): leaf for p, leaf in zip(params, leaves)}
    torch.autograd.gradcheck(
        lambda *_: ref.coupled_penalty(ref.rebind(groups, mapping), kind), leaves
    )


def test_coupled_prox_is_simultaneous():
    groups, (a_w, a_b, b_w) = _overlapping_groups()
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
    groups, (a_w, a_b, b_w) = _overlapping_groups()
    with torch.no_grad():
        a_w[1], a_b[1], b_w[:, 1] = 1e-3, 1e-3, 1e-3  # group 1 of A is nearly dead
    keep = [a_w.clone(), b_w.clone()]
    masks = prox_(None, "group_l0", 0.01, groups=groups)
    assert masks[0].tolist() == [True, False, True] and masks[1].tolist() == [True, True]
    assert (a_w[1] == 0).all() and a_b[1] == 0 and (b_w[:, 1] == 0).all()
    assert torch.equal(a_w[[0, 2]], keep[0][[0, 2]]) and torch.equal(b_w[:, 0], keep[1][:, 0])

    groups, (a_w, a_b, b_w) = _overlapping_groups()
    expected = b_w.clone()
    prox_(expected, "l1", 0.2)
    prox_(None, "l1", 0.2, groups=groups)  # b.weight is in both sets: thresholded once
    assert torch.equal(b_w, expected)


def test_coupled_prox_leaves_uncovered_elements():
    w = torch.full((3, 2), 0.25)
    group = CoupledGroup("w", 1, (CoupledMember("w", w, 0, torch.tensor([1]), torch.tensor([0])),))
    prox_(None, "l0", 0.5, groups=group)
    assert w.tolist() == [[0.25, 0.25], [0.0, 0.0], [0.25, 0.25]]


def test_coupled_groups_must_belong_to_tensors():
    groups, params = _overlapping_groups()
    before = [p.clone() for p in params]
    with pytest.raises(ValueError, match="another copy"):
        prox_([params[0]], "group_l0", 10.0, groups=groups)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    prox_(list(params), "group_l0", 0.0, groups=groups)  # all there: accepted
