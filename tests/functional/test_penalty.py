"""The public penalty functions (fastsparse.penalty, add_penalty_grad_, group_norms) against the
oracle on every fused backend: every kind x grouping, dtypes, layouts, gradcheck, the in-place
gradient, group norms, random cases (hypothesis), coupled groups, bad input, torch.compile, CUDA
graphs and mixed precision.

On a CPU-only machine these run the Triton kernels under TRITON_INTERPRET=1 (see conftest.py),
so shapes stay small; the `gpu`-marked tests use large shapes on CUDA.
"""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastsparse as fs
from fastsparse import reference as ref
from fastsparse.core.groups import coupled_params
from fastsparse.pruning import coupled_groups
from tests.conftest import FUSED_BACKENDS
from tests.helpers import (
    GROUPINGS,
    applies,
    assert_close_to_oracle,
    assert_unchanged,
    coupled_models,
    gradient_scale,
    grouping_id,
    make,
    params_with_grad,
    shapes_for,
    snapshot,
    term_magnitude,
    two_weights,
)

TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def fused_value_and_grads(backend, tensors, kind, groups, grad_out=1.7, **options):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    value = fs.penalty(leaves, kind, groups=groups, backend=backend, **options)
    (value * grad_out).backward()
    return value.detach(), [t.grad for t in leaves]


def oracle_value_and_grads(tensors, kind, groups, grad_out=1.7, **options):
    alpha = options.get("alpha", 0.5)
    value = ref.penalty(tensors, kind, groups, alpha)
    grads = ref.penalty_grad(tensors, kind, groups, alpha)
    return value, [g * grad_out for g in grads]


# ------------------------------------------------------------------------------------------------
# Every kind and grouping against the oracle
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", GROUPINGS, ids=grouping_id)
@pytest.mark.parametrize("kind", fs.KINDS)
def test_every_kind_and_grouping_matches_oracle_fp32(kind, groups, device, nan_outputs, backend):
    tensors = make(shapes_for(groups), torch.float32, device)
    value, grads = fused_value_and_grads(backend, tensors, kind, groups)
    value32, grads32 = oracle_value_and_grads(tensors, kind, groups)
    value64, grads64 = oracle_value_and_grads([t.double() for t in tensors], kind, groups)
    assert value.dtype == torch.float32 and value.dim() == 0
    assert_close_to_oracle(value, value32, value64, name="value")
    scale = gradient_scale(grads64)
    for i, (g, g32, g64) in enumerate(zip(grads, grads32, grads64)):
        assert g.dtype == torch.float32 and g.shape == tensors[i].shape
        terms = 1.7 * term_magnitude(tensors[i], kind, groups)
        assert_close_to_oracle(g, g32, g64, scale=torch.clamp(terms, min=scale), name=f"grad[{i}]")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", fs.KINDS)
def test_low_precision_follows_tolerance_rule(kind, dtype, device, nan_outputs, backend):
    groups = ("filters", "channels") if kind.startswith("group") else "filters"
    tensors = make(shapes_for(groups), dtype, device, seed=1)
    value, grads = fused_value_and_grads(backend, tensors, kind, groups)
    value_lp, grads_lp = oracle_value_and_grads(tensors, kind, groups)
    value64, grads64 = oracle_value_and_grads([t.double() for t in tensors], kind, groups)
    assert value.dtype == torch.float32
    assert_close_to_oracle(value, value_lp, value64, atol=TOLERANCE[dtype], name="value")
    scale = gradient_scale(grads64)
    for i, (g, g_lp, g64) in enumerate(zip(grads, grads_lp, grads64)):
        assert g.dtype == dtype
        terms = torch.clamp(1.7 * term_magnitude(tensors[i], kind, groups), min=scale)
        assert_close_to_oracle(g, g_lp, g64, atol=TOLERANCE[dtype], scale=terms, name=f"grad[{i}]")


@pytest.mark.parametrize("kind", fs.KINDS)
def test_gradcheck_float64(kind, device, backend):
    shapes = [(3, 2, 2, 2), (3,), (2, 3)]
    tensors = [t.requires_grad_(True) for t in make(shapes, torch.float64, device, seed=2)]
    groups = ("filters", "channels") if kind.startswith("group") else "filters"
    tensors = [t for t in tensors if t.dim() >= 2] if "channels" in groups else tensors

    def f(*ts):
        return fs.penalty(list(ts), kind, groups=groups, backend=backend)

    assert torch.autograd.gradcheck(f, tuple(tensors), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("groups", ["kernels", None], ids=grouping_id)
def test_gradcheck_float64_other_groupings(groups, device, backend):
    t = torch.randn(2, 3, 2, 2, dtype=torch.float64, device=device, requires_grad=True)
    for kind in ("l1l2", "group_hoyer_square"):
        assert torch.autograd.gradcheck(
            lambda w, k=kind: fs.penalty(w, k, groups=groups, backend=backend), (t,)
        )


def test_sparse_group_lasso_alpha(device, backend):
    tensors = make([(5, 4, 3, 3)], torch.float32, device)
    for alpha in (0.0, 0.3, 1.0):
        value, grads = fused_value_and_grads(
            backend, tensors, "sparse_group_lasso", "filters", alpha=alpha
        )
        expected, expected_grads = oracle_value_and_grads(
            tensors, "sparse_group_lasso", "filters", alpha=alpha
        )
        torch.testing.assert_close(value, expected)
        torch.testing.assert_close(grads[0], expected_grads[0])


def test_mixed_list_of_twenty_tensors(device, nan_outputs, backend):
    gen = torch.Generator().manual_seed(3)
    shapes = [
        tuple(
            int(s)
            for s in torch.randint(
                1, 9, (int(torch.randint(2, 5, (1,), generator=gen)),), generator=gen
            )
        )
        for _ in range(20)
    ]
    tensors = make(shapes, torch.float32, device, seed=3)
    for kind in ("l1l2", "group_l1l2"):
        value, grads = fused_value_and_grads(backend, tensors, kind, "filters")
        expected, expected_grads = oracle_value_and_grads(tensors, kind, "filters")
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["l1l2", "group_lasso", "group_l1l2"])
def test_long_groups_take_the_split_path(kind, device, nan_outputs, backend):
    # 20000 elements per group: more than one block, partial sums per chunk.
    tensors = make([(2, 20000), (3, 4)], torch.float32, device, seed=4)
    value, grads = fused_value_and_grads(backend, tensors, kind, "filters")
    expected, expected_grads = oracle_value_and_grads(tensors, kind, "filters")
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def test_mixed_dtypes_in_one_list(device, backend):
    tensors = make([(4, 3, 3, 3), (6, 5)], torch.float32, device)
    tensors = [tensors[0].to(torch.bfloat16), tensors[1]]
    value, grads = fused_value_and_grads(backend, tensors, "hoyer_square", "filters")
    expected, expected_grads = oracle_value_and_grads(tensors, "hoyer_square", "filters")
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
    assert grads[0].dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-2, atol=1e-3)


LAYOUTS = {
    "channels_last": lambda t: t.to(memory_format=torch.channels_last),
    "transposed": lambda t: t.transpose(0, 1),
    "sliced": lambda t: t[:, ::2],
    "permuted": lambda t: t.permute(1, 0, 3, 2),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("groups", GROUPINGS, ids=grouping_id)
def test_non_contiguous_layouts(layout, groups, device, backend):
    base = make([(6, 4, 3, 3)], torch.float32, device, seed=5)[0]
    w = LAYOUTS[layout](base)
    for kind in ("l1l2", "group_l1l2"):
        value, grads = fused_value_and_grads(backend, [w], kind, groups)
        expected, expected_grads = oracle_value_and_grads([w], kind, groups)
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grads[0], expected_grads[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", fs.KINDS)
def test_zero_groups_and_zero_tensors_give_zero_never_nan(kind, device, backend):
    w = torch.zeros(4, 3, 2, 2, device=device)
    w[2, 1] = 0.5  # one non-zero group of each grouping
    all_zero = torch.zeros(3, 5, device=device)
    value, grads = fused_value_and_grads(backend, [w, all_zero], kind, ("filters", "channels"))
    expected, expected_grads = oracle_value_and_grads([w, all_zero], kind, ("filters", "channels"))
    assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grads[0], expected_grads[0])
    assert (grads[1] == 0).all() and (grads[0][0] == 0).all()


def test_empty_tensors_give_zero(device, backend):
    empty = torch.empty(0, 3, device=device, requires_grad=True)
    w = torch.randn(3, 3, device=device, requires_grad=True)
    value = fs.penalty([empty, w], "l1l2", backend=backend)
    value.backward()
    torch.testing.assert_close(value, ref.penalty([w.detach()], "l1l2"))
    assert empty.grad is None or empty.grad.numel() == 0
    only_empty = fs.penalty([torch.empty(0, device=device)], "l1", backend=backend)
    assert only_empty.item() == 0.0 and only_empty.dtype == torch.float32


def test_results_are_deterministic(device, backend):
    tensors = make([(16, 8, 3, 3), (2, 20000)], torch.float32, device, seed=6)
    first = fused_value_and_grads(backend, tensors, "group_hoyer_square", "filters")
    second = fused_value_and_grads(backend, tensors, "group_hoyer_square", "filters")
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


# ------------------------------------------------------------------------------------------------
# The in-place gradient: add_penalty_grad_
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", GROUPINGS, ids=grouping_id)
@pytest.mark.parametrize("kind", fs.KINDS)
def test_inplace_equals_autograd(kind, groups, device, nan_outputs, backend):
    tensors = make(shapes_for(groups), torch.float32, device, seed=11)
    existing = [torch.randn_like(t) for t in tensors]
    params = [t.clone().requires_grad_(True) for t in tensors]
    for p, g in zip(params, existing):
        p.grad = g.clone()
    value = fs.add_penalty_grad_(params, kind, 0.25, groups=groups, backend=backend)

    leaves = [t.clone().requires_grad_(True) for t in tensors]
    fs.penalty(leaves, kind, groups=groups, backend=backend).backward()
    torch.testing.assert_close(value, ref.penalty(tensors, kind, groups))
    for p, g, leaf in zip(params, existing, leaves):
        torch.testing.assert_close(p.grad, g + 0.25 * leaf.grad, rtol=1e-5, atol=1e-6)


def test_inplace_allocates_missing_grads_and_keeps_weights(device, backend):
    tensors = make([(5, 3, 3, 3), (5,)], torch.float32, device)
    params = [t.clone().requires_grad_(True) for t in tensors]
    fs.add_penalty_grad_(params, "group_lasso", 1e-2, backend=backend)
    expected = ref.penalty_grad(tensors, "group_lasso")
    for p, t, e in zip(params, tensors, expected):
        assert torch.equal(p.detach(), t)
        torch.testing.assert_close(p.grad, 1e-2 * e)


def test_inplace_low_precision_weights_fp32_grads(device, backend):
    w = make([(8, 4, 3, 3)], torch.bfloat16, device)[0].requires_grad_(True)
    if hasattr(w, "grad_dtype"):  # torch >= 2.10 checks .grad's dtype unless told otherwise
        w.grad_dtype = torch.float32
    w.grad = torch.zeros(w.shape, dtype=torch.float32, device=device)
    fs.add_penalty_grad_(w, "l1l2", 0.5, backend=backend)
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad, 0.5 * ref.penalty_grad(w.detach().float(), "l1l2")[0])


@pytest.mark.parametrize(
    "groups", ["filters", "channels", ("filters", "channels")], ids=grouping_id
)
def test_inplace_channels_last_and_mismatched_grad_layout(groups, device, backend):
    w = make([(6, 4, 3, 3)], torch.float32, device)[0]
    param = w.to(memory_format=torch.channels_last).requires_grad_(True)
    param.grad = torch.ones(w.shape, device=device)  # contiguous grad, channels_last weight
    fs.add_penalty_grad_(param, "hoyer_square", 0.1, groups=groups, backend=backend)
    expected = 1 + 0.1 * ref.penalty_grad(w, "hoyer_square", groups)[0]
    torch.testing.assert_close(param.grad, expected, rtol=1e-5, atol=1e-6)


def test_inplace_split_path_and_fp64_strength(device, backend):
    tensors = make([(2, 20000), (3, 3)], torch.float64, device)
    params = [t.clone().requires_grad_(True) for t in tensors]
    fs.add_penalty_grad_(params, "l1l2", 1e-3, backend=backend)
    for p, e in zip(params, ref.penalty_grad(tensors, "l1l2")):
        torch.testing.assert_close(p.grad, 1e-3 * e, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------------------------
# group_norms
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grouping", ["filters", "channels", "kernels", None], ids=grouping_id)
def test_group_norms_match_oracle(grouping, device, backend):
    tensors = make(shapes_for(grouping), torch.float32, device, seed=12)
    norms = fs.group_norms(tensors, groups=grouping, backend=backend)
    expected = ref.group_norms(tensors, grouping)
    assert len(norms) == len(tensors)
    for n, e in zip(norms, expected):
        assert n.dim() == 1
        torch.testing.assert_close(n, e)


def test_group_norms_empty_and_torch_backend(backend):
    norms = fs.group_norms([torch.empty(4, 0), torch.randn(3, 2)], backend="torch")
    assert norms[0].shape == (4,) and (norms[0] == 0).all()
    assert norms[1].shape == (3,)


# ------------------------------------------------------------------------------------------------
# Random shapes, kinds and groupings (hypothesis), each fused backend
# ------------------------------------------------------------------------------------------------


GROUPING_CHOICES = [
    "filters",
    "channels",
    "kernels",
    None,
    ("filters", "channels"),
    ("kernels", None),
]


@st.composite
def cases(draw):
    grouping = draw(st.sampled_from(GROUPING_CHOICES))
    count = draw(st.integers(1, 4))
    shapes = []
    while len(shapes) < count:
        shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=4)))
        if applies(grouping, shape):
            shapes.append(shape)
    kind = draw(st.sampled_from(fs.KINDS))
    seed = draw(st.integers(0, 2**16))
    zero_first = draw(st.booleans())
    return grouping, shapes, kind, seed, zero_first


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_fused_backends_match_oracle(backend, case):
    from tests.conftest import TRITON_DEVICE

    grouping, shapes, kind, seed, zero_first = case
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(s, generator=gen).to(TRITON_DEVICE) for s in shapes]
    if zero_first:
        tensors[0].zero_()
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    value = fs.penalty(leaves, kind, groups=grouping, backend=backend)
    value.backward()
    expected = ref.penalty([t.double() for t in tensors], kind, grouping)
    expected_grads = ref.penalty_grad([t.double() for t in tensors], kind, grouping)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-5)
    scale = gradient_scale(expected_grads)
    for t, leaf, e in zip(tensors, leaves, expected_grads):
        terms = torch.clamp(term_magnitude(t, kind, grouping), min=scale)
        assert torch.isfinite(leaf.grad).all()
        assert ((leaf.grad.double() - e).abs() <= 1e-5 * terms).all()


# ------------------------------------------------------------------------------------------------
# Coupled groups (groups=[CoupledGroup, ...])
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["group_lasso", "l1l2", "group_l1l2", "hoyer_square"])
def test_coupled_penalty_value_grad_and_norms(kind, backend, device):
    for model, x in coupled_models():
        model = model.to(device)
        groups = coupled_groups(model, x.to(device))
        params = reference_params = coupled_params(groups)
        value = fs.penalty(None, kind, groups=groups, backend=backend)
        grads = torch.autograd.grad(value, params)
        expected = ref.coupled_penalty(groups, kind)
        expected_grads = ref.coupled_penalty_grad(groups, kind)
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
        # Norm-wise: errors relative to the largest gradient entry (terms cancel elementwise).
        atol = 1e-6 * gradient_scale(expected_grads)
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=atol)
        norms = fs.group_norms(None, groups=groups, backend=backend)
        for n, e in zip(norms, ref.coupled_group_norms(groups)):
            torch.testing.assert_close(n, e, rtol=1e-5, atol=1e-6)
        for p in reference_params:
            p.grad = torch.ones_like(p)
        fs.add_penalty_grad_(model, kind, 0.5, groups=groups, backend=backend)
        for p, e in zip(reference_params, expected_grads):
            torch.testing.assert_close(p.grad, 1 + 0.5 * e, rtol=1e-4, atol=atol)


def test_coupled_gradcheck_float64(backend, device):
    model, x = coupled_models()[0]
    model = model.double().to(device)
    groups = coupled_groups(model, x.double().to(device))
    params = coupled_params(groups)

    def f(*_params):  # the groups hold the model's parameters: gradcheck perturbs them in place
        return fs.penalty(None, "l1l2", groups=groups, backend=backend)

    # Perturbing every weight costs two interpreted penalties each: the small tensors (conv1,
    # BN, biases) cover every member kind; the big ones are checked against the oracle above.
    small = tuple(p for p in params if p.numel() <= 30)
    assert len(small) >= 5
    assert torch.autograd.gradcheck(f, small, eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Bad input gets a clear error and changes nothing
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def params():
    return params_with_grad()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_floating_tensor_names_position_and_dtype(params, backend):
    bad = params + [torch.ones(3, dtype=torch.int64)]
    before = snapshot(params)
    with pytest.raises(TypeError, match=r"tensors\[2\] has dtype torch.int64"):
        fs.penalty(bad, "l1", backend=backend)
    with pytest.raises(TypeError, match=r"tensors\[2\] has dtype torch.int64"):
        fs.add_penalty_grad_(bad, "l1", 1.0, backend=backend)
    assert_unchanged(params, before)


def test_different_devices_are_named(params):
    meta = torch.empty(3, 3, device="meta")
    before = snapshot(params)
    with pytest.raises(ValueError, match=r"cpu \(tensors\[0\]\).*meta \(tensors\[2\]\)"):
        fs.add_penalty_grad_(params + [meta], "l1", 1.0)
    assert_unchanged(params, before)


def test_unknown_kind_and_grouping_list_valid_ones(params):
    before = snapshot(params)
    with pytest.raises(ValueError, match="valid kinds: l1, l2, group_lasso"):
        fs.add_penalty_grad_(params, "lasso", 1.0)
    with pytest.raises(ValueError, match="valid groupings: 'filters', 'channels', 'kernels', None"):
        fs.penalty(params, "l1", groups="rows")
    with pytest.raises(ValueError, match="valid groupings"):
        fs.add_penalty_grad_(params, "l1", 1.0, groups=("filters", "rows"))
    assert_unchanged(params, before)


def test_channels_on_a_vector_and_kernels_on_a_matrix(params):
    before = snapshot(params)
    with pytest.raises(
        ValueError, match=r"'channels' needs .* at least 2 dims; tensors\[1\] has shape \(4,\)"
    ):
        fs.add_penalty_grad_(params, "group_lasso", 1.0, groups="channels")
    with pytest.raises(ValueError, match=r"'kernels' needs .* at least 3 dims"):
        fs.penalty(torch.randn(3, 3), "l1", groups="kernels")
    assert_unchanged(params, before)


@pytest.mark.parametrize("strength", [-1.0, float("nan"), float("inf")])
def test_bad_strength_changes_nothing(params, strength):
    before = snapshot(params)
    with pytest.raises(ValueError, match="strength must be finite and >= 0"):
        fs.add_penalty_grad_(params, "l1", strength)
    assert_unchanged(params, before)


def test_bad_options(params):
    with pytest.raises(TypeError, match="unexpected option"):
        fs.penalty(params, "l1", beta=2)
    with pytest.raises(ValueError, match="alpha applies to kind 'sparse_group_lasso' only"):
        fs.penalty(params, "l1", alpha=0.2)
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]"):
        fs.penalty(params, "sparse_group_lasso", alpha=1.5)
    with pytest.raises(TypeError, match="expected a tensor or a sequence"):
        fs.penalty(3.0, "l1")
    with pytest.raises(TypeError, match=r"tensors\[1\] is a str"):
        fs.penalty([params[0], "w"], "l1")


def test_duplicate_tensor_in_place_is_refused(params):
    before = snapshot(params)
    with pytest.raises(ValueError, match=r"tensors\[2\] is the same tensor as tensors\[0\]"):
        fs.add_penalty_grad_(params + [params[0]], "l1", 1.0)
    assert_unchanged(params, before)


def test_sparse_grad_is_refused(params):
    params[1].grad = torch.zeros(4).to_sparse()
    before = snapshot(params)
    with pytest.raises(ValueError, match=r"tensors\[1\]\.grad .*sparse_coo.*expected a dense"):
        fs.add_penalty_grad_(params, "l1", 1.0)
    assert_unchanged(params, before)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_inputs_give_zero(backend):
    assert fs.penalty([], "l1", backend=backend).item() == 0.0
    e = torch.empty(0, 4, requires_grad=True)
    assert fs.add_penalty_grad_(e, "l1l2", 1.0, backend=backend).item() == 0.0
    assert e.grad.shape == (0, 4)


# ------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): the penalty in a compiled loss and training step
# ------------------------------------------------------------------------------------------------


def _train_step_loss(model, x, backend):
    loss = model(x).square().mean()
    return loss + 1e-2 * fs.penalty([model[0].weight, model[2].weight], "l1l2", backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton", "native"])
def test_compiled_loss_has_no_graph_breaks(backend, device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 3 * 3, 3)
    ).to(device)
    x = torch.randn(2, 2, 5, 5, device=device)
    explanation = torch._dynamo.explain(_train_step_loss)(model, x, backend)
    assert explanation.graph_break_count == 0, explanation.break_reasons

    torch._dynamo.reset()
    compiled = torch.compile(_train_step_loss, fullgraph=True, backend="aot_eager")
    loss = compiled(model, x, backend)
    loss.backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _train_step_loss(model, x, "torch").backward()
    for got, expected in zip(compiled_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_compiled_inductor_with_fused_penalty(device, backend):
    weights = two_weights(device)

    def loss_fn(ws):
        return fs.penalty(ws, "group_l1l2", groups=("filters", "channels"), backend=backend) * 3

    compiled = torch.compile(loss_fn, fullgraph=True)
    value = compiled(weights)
    value.backward()
    expected = [
        3 * g
        for g in ref.penalty_grad(
            [w.detach() for w in weights], "group_l1l2", ("filters", "channels")
        )
    ]
    torch.testing.assert_close(
        value.detach(),
        3 * ref.penalty([w.detach() for w in weights], "group_l1l2", ("filters", "channels")),
    )
    for w, e in zip(weights, expected):
        torch.testing.assert_close(w.grad, e, rtol=1e-5, atol=1e-6)


def test_compiled_inplace_step(device, backend):
    weights = [w.detach().requires_grad_(True) for w in two_weights(device)]
    for w in weights:
        w.grad = torch.zeros_like(w)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(ws):
        return fs.add_penalty_grad_(ws, "group_lasso", 0.5, backend=backend)

    step(weights)
    for w, e in zip(weights, ref.penalty_grad([w.detach() for w in weights], "group_lasso")):
        torch.testing.assert_close(w.grad, 0.5 * e)


# A whole training step in one graph: `Tensor.backward()` is traced when
# torch._dynamo.config.trace_autograd_ops is on. The step updates the parameters with foreach ops:
# torch.optim's `Optimizer.step` inserts graph breaks on purpose (pytorch/pytorch#104053), so with
# torch.optim compile the rest of the step and call `optimizer.step()` outside it.


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3)
        self.fc = torch.nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def make_step(model, path: str, backend: str, lr: float = 0.1):
    """forward, loss with the penalty (autograd) or its in-place gradient, backward, SGD step."""
    params = list(model.parameters())
    weights = [model.conv.weight, model.fc.weight]

    def step(x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        if path == "autograd":
            loss = loss + 1e-2 * fs.penalty(weights, "l1l2", backend=backend)
            loss.backward()
        else:
            loss.backward()
            fs.add_penalty_grad_(weights, "group_hoyer_square", 1e-2, backend=backend)
        with torch.no_grad():
            torch._foreach_add_(params, [p.grad for p in params], alpha=-lr)
        for p in params:
            p.grad = None
        return loss.detach()

    return step


@pytest.mark.parametrize("path", ["autograd", "inplace"])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_compiled_training_step_has_no_graph_breaks(backend, path):
    torch.manual_seed(0)
    eager_model = ConvNet()
    explained_model, compiled_model = copy.deepcopy(eager_model), copy.deepcopy(eager_model)
    x, y = torch.randn(4, 2, 5, 5), torch.randn(4, 3)
    fs.penalty(eager_model.fc.weight, "l1", backend=backend)  # load the kernels outside tracing

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        explanation = torch._dynamo.explain(make_step(explained_model, path, backend))(x, y)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
        torch._dynamo.reset()
        compiled = torch.compile(
            make_step(compiled_model, path, backend), fullgraph=True, backend="aot_eager"
        )
        compiled_losses = [compiled(x, y) for _ in range(2)]
    eager = make_step(eager_model, path, backend)
    eager_losses = [eager(x, y) for _ in range(2)]

    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for got, expected in zip(compiled_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_compiled_step_then_torch_optim():
    """The usual split: forward + loss + backward compiled in one graph, then torch.optim's
    step (outside: it breaks graphs on purpose)."""
    torch.manual_seed(0)
    model = ConvNet()
    eager_model = copy.deepcopy(model)
    x, y = torch.randn(4, 2, 5, 5), torch.randn(4, 3)

    def loss_and_grads(m):
        loss = torch.nn.functional.mse_loss(m(x), y)
        loss = loss + 1e-2 * fs.penalty([m.conv.weight, m.fc.weight], "l1l2", backend="native")
        loss.backward()
        return loss.detach()

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(loss_and_grads, fullgraph=True, backend="aot_eager")
        for m, fn in ((model, compiled), (eager_model, loss_and_grads)):
            opt = torch.optim.SGD(m.parameters(), lr=0.1)
            for _ in range(2):
                fn(m)
                opt.step()
                opt.zero_grad()
    for got, expected in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# CUDA graphs: the in-place path captured once, replayed on new weights
# ------------------------------------------------------------------------------------------------


def _graph_params():
    torch.manual_seed(0)
    return [
        torch.randn(64, 32, 3, 3, device="cuda").requires_grad_(True),
        torch.randn(96, 576, device="cuda").requires_grad_(True),
        torch.randn(64, 7, device="cuda", dtype=torch.bfloat16).requires_grad_(True),
    ]


def _replay_on_new_weights(graph, params, static_value, kind, groups, strength):
    """Write new weights into the captured tensors, NaN into their gradients (the replay must
    overwrite every element), replay, and check value and gradients against the oracle."""
    for trial in range(2):
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn_like(p) * (trial + 1))
                p.grad.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        weights = [p.detach() for p in params]
        torch.testing.assert_close(
            static_value, ref.penalty(weights, kind, groups), rtol=1e-5, atol=1e-5
        )
        for p, expected in zip(params, ref.penalty_grad(weights, kind, groups)):
            tol = 2e-2 if p.dtype == torch.bfloat16 else 1e-4
            torch.testing.assert_close(p.grad, strength * expected, rtol=tol, atol=tol * 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["l1l2", "group_hoyer_square"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_inplace_gradient_in_cuda_graph(backend, kind):
    """Static weights and gradients; warm up on a side stream (builds plans, tables and
    kernels), capture, then write new weights into the same tensors and replay."""
    groups = ("filters", "channels")
    params = _graph_params()
    for p in params:
        p.grad = torch.zeros_like(p)

    def step():
        for p in params:
            p.grad.zero_()
        return fs.add_penalty_grad_(params, kind, 0.1, groups=groups, backend=backend)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_value = step()

    _replay_on_new_weights(graph, params, static_value, kind, groups, strength=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["group_lasso", "group_l1l2"])
def test_autograd_penalty_in_cuda_graph(kind):
    """Forward and backward captured whole, as torch.cuda.graphs' whole-network recipe does:
    the backward's gradients come from the graph's pool at capture, with new addresses, and the
    Triton gradient table (offsets within the flat buffers) needs no copy."""
    groups = ("filters", "channels")
    params = _graph_params()

    def step():
        value = fs.penalty(params, kind, groups=groups, backend="triton")
        value.backward()
        return value.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for p in params:
                p.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_value = step()

    _replay_on_new_weights(graph, params, static_value, kind, groups, strength=1.0)


# ------------------------------------------------------------------------------------------------
# Mixed precision: low-precision parameters, fp32 gradients or fp32 master weights
# ------------------------------------------------------------------------------------------------


def low_precision_weights(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(6, 4, 3, 3, generator=gen).to(dtype),
        torch.randn(5, 9, generator=gen).to(dtype),
    ]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_low_precision_parameters_with_fp32_gradients(dtype, backend):
    """bf16/fp16 parameters whose .grad is fp32 (`grad_dtype`): both paths write fp32
    gradients, the in-place path the fp32 gradient of the low-precision weights."""
    params = [torch.nn.Parameter(w) for w in low_precision_weights(dtype)]
    if not hasattr(params[0], "grad_dtype"):
        pytest.skip("Tensor.grad_dtype needs a newer PyTorch")
    for p in params:
        p.grad_dtype = torch.float32
    exact = ref.penalty_grad([p.detach().double() for p in params], "l1l2")

    fs.penalty(params, "l1l2", backend=backend).backward()
    for p, e in zip(params, exact):
        assert p.grad.dtype == torch.float32
        # the autograd path computes the gradient in the weights' dtype, then casts
        torch.testing.assert_close(p.grad.double(), e, rtol=2e-2, atol=2e-2)
        p.grad = None
    value = fs.add_penalty_grad_(params, "l1l2", 1.0, backend=backend)
    assert value.dtype == torch.float32
    # The fused kernels compute in fp32 and write fp32; the oracle (backend "torch") computes
    # the gradient in the weights' dtype, then adds it.
    tol = 2e-2 if backend == "torch" else 1e-5
    for p, e in zip(params, exact):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad.double(), e, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_parameters_gradients_in_their_dtype(dtype, backend):
    """Without grad_dtype, gradients have the parameters' dtype (what a bf16 optimizer
    expects), within 2x torch's own same-dtype error of the fp64 gradient."""
    params = [torch.nn.Parameter(w) for w in low_precision_weights(dtype)]
    fs.penalty(params, "group_lasso", groups=("filters", "channels"), backend=backend).backward()
    autograd = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    fs.add_penalty_grad_(
        params, "group_lasso", 1.0, groups=("filters", "channels"), backend=backend
    )
    exact = ref.penalty_grad(
        [p.detach().double() for p in params], "group_lasso", ("filters", "channels")
    )
    same_dtype = ref.penalty_grad(
        [p.detach() for p in params], "group_lasso", ("filters", "channels")
    )
    for p, a, e, t in zip(params, autograd, exact, same_dtype):
        assert p.grad.dtype == dtype and a.dtype == dtype
        bound = 2 * (t.double() - e).abs().max() + torch.finfo(dtype).eps * e.abs().max()
        assert (a.double() - e).abs().max() <= bound
        assert (p.grad.double() - e).abs().max() <= bound


def test_fp32_master_weights():
    """bf16 model for compute, fp32 master weights in the optimizer: the penalty gradient goes
    to the master weights in fp32, exactly the fp32 gradient."""
    torch.manual_seed(0)
    model = ConvNet().to(torch.bfloat16)
    master = [p.detach().float().requires_grad_(True) for p in model.parameters()]
    opt = torch.optim.SGD(master, lr=0.1)
    x, y = torch.randn(4, 2, 5, 5, dtype=torch.bfloat16), torch.randn(4, 3, dtype=torch.bfloat16)
    for _ in range(2):
        torch.nn.functional.mse_loss(model(x), y).backward()
        for m, p in zip(master, model.parameters()):
            m.grad = p.grad.float()
            p.grad = None
        data_grads = [m.grad.clone() for m in master]
        weights = [master[0], master[2]]  # conv and fc weights
        fs.add_penalty_grad_(weights, "l1l2", 1e-2, backend="native")
        expected = ref.penalty_grad([w.detach() for w in weights], "l1l2")
        for w, d, e in zip(weights, (data_grads[0], data_grads[2]), expected):
            assert w.grad.dtype == torch.float32
            torch.testing.assert_close(w.grad, d + 1e-2 * e, rtol=1e-5, atol=1e-7)
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for m, p in zip(master, model.parameters()):
                p.copy_(m)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_penalty_under_autocast_stays_fp32(backend):
    """Autocast does not touch the penalty: fp32 statistics, value and gradients."""
    torch.manual_seed(0)
    model = ConvNet()
    x = torch.randn(4, 2, 5, 5)
    weights = [model.conv.weight, model.fc.weight]
    plain = fs.penalty(weights, "group_l1l2", backend=backend)
    expected = torch.autograd.grad(plain, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        value = fs.penalty(weights, "group_l1l2", backend=backend)
    assert out.dtype == torch.bfloat16 and value.dtype == torch.float32
    assert torch.equal(value, plain)
    for g, e in zip(torch.autograd.grad(value, weights), expected):
        assert g.dtype == torch.float32
        assert torch.equal(g, e)


# ------------------------------------------------------------------------------------------------
# GPU: large shapes on the compiled Triton path
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape,dtype",
    [
        ((4096, 11008), torch.bfloat16),
        ((512, 512, 3, 3), torch.float32),
        ((512, 512, 3, 3), torch.bfloat16),
    ],
    ids=["4096x11008-bf16", "512x512x3x3-fp32", "512x512x3x3-bf16"],
)
@pytest.mark.parametrize("kind", ["l1l2", "group_l1l2", "hoyer_square", "group_lasso"])
@pytest.mark.parametrize("groups", ["filters", "channels"])
def test_gpu_large_shapes(shape, dtype, kind, groups, backend):
    tensors = make([shape], dtype, "cuda", seed=7)
    atol = TOLERANCE[dtype]
    value, grads = fused_value_and_grads(backend, tensors, kind, groups)
    value_lp, grads_lp = oracle_value_and_grads(tensors, kind, groups)
    value64, grads64 = oracle_value_and_grads([t.double() for t in tensors], kind, groups)
    assert_close_to_oracle(value, value_lp, value64, atol=atol, name="value")
    assert_close_to_oracle(
        grads[0], grads_lp[0], grads64[0], atol=atol, scale=gradient_scale(grads64), name="grad"
    )


@pytest.mark.gpu
def test_gpu_none_grouping_on_a_large_tensor_splits(backend):
    tensors = make([(8192, 4096)], torch.float32, "cuda", seed=8)
    value, grads = fused_value_and_grads(backend, tensors, "l1l2", None)
    expected, expected_grads = oracle_value_and_grads([t.double() for t in tensors], "l1l2", None)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(grads[0].double(), expected_grads[0], rtol=1e-4, atol=1e-9)
