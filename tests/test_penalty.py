"""The fused Triton penalty against the oracle: every kind x grouping, dtypes, layouts, gradcheck.

On a CPU-only machine these run the Triton kernels under TRITON_INTERPRET=1 (see conftest.py),
so shapes stay small; the `gpu`-marked tests at the end use large shapes on CUDA.
"""

import pytest
import torch
from helpers import (
    GROUPINGS,
    ODD_SHAPES,
    assert_close_to_oracle,
    contract_coefficients,
    gradient_scale,
    grouping_id,
    shapes_for,
    term_magnitude,
    ungroup,
)

import fastsparse as fs
from fastsparse import reference as ref

TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def make(shapes, dtype, device, seed=0, zero_groups=True):
    """Random tensors with some all-zero filters, so the zero-group rule is exercised."""
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for shape in shapes:
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        if zero_groups and t.dim() >= 2 and t.shape[0] > 2:
            t[1] = 0
        tensors.append(t.to(device=device, dtype=dtype))
    return tensors


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


@pytest.mark.parametrize("groups", GROUPINGS, ids=grouping_id)
@pytest.mark.parametrize("kind", fs.KINDS)
def test_contract_table_equals_autograd_of_the_oracle(kind, groups):
    for shape in shapes_for(groups):
        w = make([shape], torch.float64, "cpu", seed=9)[0]
        expected = ref.penalty_grad(w, kind, groups, 0.3)[0]
        total = torch.zeros_like(w)
        for grouping in ref.as_groupings(groups):
            a, b = contract_coefficients(w, kind, grouping, 0.3)
            view = ref.grouped_view(w, grouping)
            total += ungroup(a[:, None] * view.sign() + b[:, None] * view, w, grouping)
        torch.testing.assert_close(total, expected, rtol=1e-10, atol=1e-12)


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


def test_odd_shapes_cover_the_issue_list():
    assert (50, 20, 5, 5) in ODD_SHAPES and (1, 1) in ODD_SHAPES and (7, 13) in ODD_SHAPES
