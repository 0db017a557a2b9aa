"""Selective weight decay, the functional layer: the fused Triton pass against the oracle (dtypes,
layouts, thresholds, counts), the update as the gradient of its penalty (float64), the torch
backend, bad input, and large shapes on a GPU (`gpu`)."""

import pytest
import torch
from torch import nn

from fastsparse import reference as ref
from fastsparse.functional.selective_decay import relevance_thresholds, selective_decay_
from tests.helpers import decay_params, record_constexpr


def assert_same_update(actual, expected):
    """The same fp32 (fp64) arithmetic as the oracle, rounded once to the gradient's dtype; a GPU
    may contract g + lambda * w into one fma, so allow an ulp of the result and of lambda * w."""
    eps = torch.finfo(actual.dtype).eps
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=eps, atol=eps * scale)


def run_oracle(ps, thresholds, strength, relevance, keep):
    return ref.selective_decay_grad(
        [p.detach() for p in ps], [p.grad for p in ps], thresholds, strength, relevance, keep
    )


def test_update_is_the_gradient_of_the_penalty_float64(device):
    """The fused update adds exactly d/dw of strength/2 * sum_{irrelevant} w^2 (float64)."""
    ps = decay_params(dtype=torch.float64, device=device, seed=1)
    grads0 = [p.grad.clone() for p in ps]
    taus = relevance_thresholds(ps, 0.4, scope="tensor")
    _, masks = run_oracle(ps, taus, 0.3, "taylor", True)
    selective_decay_(ps, 0.3, threshold=taus, backend="triton")
    leaves = [p.detach().clone().requires_grad_(True) for p in ps]
    penalty = ref.selective_decay_penalty(leaves, masks, 0.3)
    expected = torch.autograd.grad(penalty, leaves)
    for p, g0, e in zip(ps, grads0, expected):
        torch.testing.assert_close(p.grad - g0, e, rtol=1e-12, atol=1e-12)

    def f(*ws):
        return ref.selective_decay_penalty(list(ws), masks, 0.3)

    assert torch.autograd.gradcheck(f, tuple(leaves))


# ------------------------------------------------------------------------------------------------
# The fused pass against the oracle
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [True, False], ids=["keep_loss_grad", "decay_only"])
@pytest.mark.parametrize("relevance", ["taylor", "magnitude", "gradient"])
def test_fused_matches_oracle(relevance, keep, device):
    ps = decay_params(device=device)
    taus = relevance_thresholds(ps, 0.35, relevance=relevance, scope="tensor")
    expected, masks = run_oracle(ps, taus, 0.1, relevance, keep)
    count = selective_decay_(
        ps, 0.1, threshold=taus, relevance=relevance, keep_loss_grad=keep, backend="triton"
    )
    assert count.dtype == torch.int64 and int(count) == sum(int(m.sum()) for m in masks)
    for p, e in zip(ps, expected):
        assert_same_update(p.grad, e)


@pytest.mark.parametrize(
    "shapes, vector",
    [([(64, 32), (16, 8, 3, 3)], True), ([(64, 32), (63, 5)], False)],
    ids=["aligned", "odd-size"],
)
@pytest.mark.parametrize(
    "dtype, grad_dtype",
    [(torch.float32, None), (torch.bfloat16, torch.float32), (torch.float64, None)],
    ids=["fp32", "bf16-fp32grad", "fp64"],
)
def test_fused_vector_and_scalar_paths(shapes, vector, dtype, grad_dtype, device, monkeypatch):
    # 16-byte accesses only when every address is aligned and every size a multiple of a vector.
    launched = record_constexpr(
        monkeypatch, "fastsparse.backends.triton.selective_decay", "_selective_decay_kernel", "VEC"
    )
    ps = decay_params(shapes, dtype=dtype, grad_dtype=grad_dtype, device=device, seed=5)
    expected, _ = run_oracle(ps, torch.full((len(ps),), 0.3), 0.2, "taylor", True)
    selective_decay_(ps, 0.2, threshold=0.3, backend="triton")
    assert launched and all((v > 0) == vector for v in launched), launched
    for p, e in zip(ps, expected):
        assert_same_update(p.grad, e)


@pytest.mark.parametrize(
    "dtype, grad_dtype",
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float16), (torch.float64, None)],
    ids=["bf16-fp32grad", "fp16", "fp64"],
)
def test_fused_dtypes(dtype, grad_dtype, device):
    ps = decay_params(dtype=dtype, grad_dtype=grad_dtype, device=device, seed=2)
    expected, _ = run_oracle(ps, torch.full((len(ps),), 0.2), 0.25, "taylor", True)
    selective_decay_(ps, 0.25, threshold=0.2, backend="triton")
    for p, e in zip(ps, expected):
        assert p.grad.dtype == (grad_dtype or dtype)
        assert_same_update(p.grad, e)


def test_fused_layouts(device):
    w = torch.randn(4, 6, 3, 3, device=device).to(memory_format=torch.channels_last)
    cl = nn.Parameter(w)
    cl.grad = torch.randn(4, 6, 3, 3, device=device)  # contiguous grad: staged
    big = torch.randn(8, 10, device=device)
    view = big[:, :5].detach().requires_grad_(True)  # not dense
    view.grad = torch.randn(8, 5, device=device)
    ps = [cl, view]
    expected, _ = run_oracle(ps, torch.full((2,), 0.3), 0.5, "taylor", True)
    grad_objects = [p.grad for p in ps]
    selective_decay_(ps, 0.5, threshold=0.3, backend="triton")
    for p, e, g in zip(ps, expected, grad_objects):
        assert p.grad is g  # updated in place
        torch.testing.assert_close(p.grad, e)


def test_quantile_and_global_scope(device):
    ps = decay_params(device=device, seed=3)
    taus = ref.relevance_thresholds([p.detach() for p in ps], [p.grad for p in ps], 0.25)
    expected, masks = run_oracle(ps, taus, 0.1, "taylor", True)
    count = selective_decay_(ps, 0.1, quantile=0.25, backend="triton")
    total = sum(p.numel() for p in ps)
    assert int(count) == int(0.25 * total) == sum(int(m.sum()) for m in masks)
    for p, e in zip(ps, expected):
        torch.testing.assert_close(p.grad, e)


def test_torch_backend_and_missing_grad():
    p = nn.Parameter(torch.randn(6, 4))
    count = selective_decay_([p], 0.5, threshold=0.0, backend="torch")  # grad None: zeros
    assert int(count) == 24
    torch.testing.assert_close(p.grad, 0.5 * p.detach())


def test_bad_input():
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="exactly one"):
        selective_decay_([p], 0.1)
    with pytest.raises(ValueError, match="exactly one"):
        selective_decay_([p], 0.1, quantile=0.5, threshold=0.1)
    with pytest.raises(ValueError, match="relevance"):
        selective_decay_([p], 0.1, quantile=0.5, relevance="hessian")
    with pytest.raises(ValueError, match="quantile"):
        selective_decay_([p], 0.1, quantile=1.5)
    with pytest.raises(ValueError, match=r"params\[1\] is the same tensor as params\[0\]"):
        selective_decay_([p, p], 0.1, threshold=0.1)
    p.grad = torch.zeros(3).to_sparse()
    with pytest.raises(ValueError, match=r"params\[0\]\.grad .*sparse_coo.*expected a dense"):
        selective_decay_([p], 0.1, threshold=0.1)
    p.grad = None
    with pytest.raises(RuntimeError, match="no selective_decay kernel"):
        selective_decay_([p], 0.1, threshold=0.1, backend="native")


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_large_model(dtype):
    shapes = [(512, 512, 3, 3), (4096, 4096), (11008, 4096), (1000,), (63, 1023)]
    ps = decay_params(shapes, dtype=dtype, grad_dtype=torch.float32, device="cuda", seed=6)
    taus = relevance_thresholds(ps, 0.5)
    expected, masks = run_oracle(ps, taus, 1e-3, "taylor", True)
    count = selective_decay_(ps, 1e-3, threshold=taus, backend="triton")
    assert int(count) == sum(int(m.sum()) for m in masks)
    for p, e in zip(ps, expected):
        assert_same_update(p.grad, e)


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("quantile", [0.0, 0.01, 0.37, 0.5, 1.0])
def test_thresholds_equal_the_oracle(quantile, scope):
    gen = torch.Generator().manual_seed(3)
    shapes = [(6, 5), (4, 3, 3, 3), (7,), (3, 2)]
    ps = [torch.randn(s, generator=gen).requires_grad_(True) for s in shapes]
    with torch.no_grad():
        ps[0][1] = 0  # pruned weights are left out of the population
        ps[3].zero_()  # a tensor with none: -1 there (scope "tensor")
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    ps[1].grad[0, 0] = 0  # ties at relevance 0
    expected = ref.relevance_thresholds([p.detach() for p in ps], [p.grad for p in ps], quantile,
                                        "taylor", scope)  # fmt: skip
    assert torch.equal(relevance_thresholds(ps, quantile, scope=scope), expected)


def test_thresholds_need_no_host_read():
    # On the meta device a boolean index, kthvalue(k) with k from the data, or .item() fails:
    # the thresholds are computed with every count kept on the device.
    ps = [torch.empty(s, device="meta").requires_grad_(True) for s in [(6, 5), (7,)]]
    for p in ps:
        p.grad = torch.empty(p.shape, device="meta")
    for scope in ("global", "tensor"):
        assert relevance_thresholds(ps, 0.3, scope=scope).shape == (2,)
