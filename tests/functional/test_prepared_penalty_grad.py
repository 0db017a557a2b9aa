"""PreparedPenaltyGrad: add_penalty_grad_ validated once. Every call gives what add_penalty_grad_
gives, bitwise (values and gradients), on both fused backends, through each change it must see:
new gradients, gradients set to None, a weight moved or re-laid out, a gradient of another dtype
or layout; and bad gradients are refused before anything is written."""

import pytest
import torch

import fastsparse as fs
from fastsparse.functional import PreparedPenaltyGrad
from tests.helpers import assert_unchanged, make, snapshot

SHAPES = [(6, 3, 3, 3), (5, 7), (9,), (4, 20000)]  # conv, linear, bias, a split group


def _params(device, dtype=torch.float32, shapes=SHAPES, grad_dtype=None):
    params = [t.requires_grad_(True) for t in make(shapes, dtype, device)]
    gen = torch.Generator().manual_seed(7)
    for p in params:
        if grad_dtype not in (None, dtype) and hasattr(p, "grad_dtype"):
            p.grad_dtype = grad_dtype  # torch >= 2.10 checks .grad's dtype unless told otherwise
        p.grad = torch.randn(p.shape, generator=gen).to(device, grad_dtype or dtype)
    return params


def _expected(params, kind, strength, backend, **options):
    """add_penalty_grad_ on copies: (value, grads)."""
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    for c, p in zip(copies, params):
        if hasattr(p, "grad_dtype"):
            c.grad_dtype = p.grad_dtype
        c.grad = None if p.grad is None else p.grad.clone()
    value = fs.add_penalty_grad_(copies, kind, strength, backend=backend, **options)
    return value, [c.grad for c in copies]


def _check(params, step, strength, kind, backend):
    """step(strength) gives what add_penalty_grad_ gives from the same gradients."""
    expected = _expected(params, kind, strength, backend)
    _assert_same(params, step(strength), expected)


def _assert_same(params, got, expected):
    value, grads = expected
    assert got.dtype == value.dtype and torch.equal(got, value)
    for p, g in zip(params, grads):
        assert p.grad.dtype == g.dtype and torch.equal(p.grad, g)


@pytest.mark.parametrize("kind", ["l1", "group_lasso", "l1l2", "group_l1l2", "sparse_group_lasso"])
def test_calls_equal_add_penalty_grad_bitwise(kind, backend, device):
    params = _params(device, shapes=[(6, 3, 3, 3), (5, 7), (4, 20000)])
    options = {"alpha": 0.3} if kind == "sparse_group_lasso" else {}
    step = PreparedPenaltyGrad(params, kind, groups=("filters", "channels"), backend=backend,
                               **options)  # fmt: skip
    for strength in (1e-3, 0.5, 0.0):
        expected = _expected(params, kind, strength, backend, groups=("filters", "channels"),
                             **options)  # fmt: skip
        _assert_same(params, step(strength), expected)


@pytest.mark.parametrize(
    "dtype, grad_dtype",
    [(torch.float64, torch.float64), (torch.bfloat16, torch.float32), (torch.float16, None)],
)
def test_dtypes(dtype, grad_dtype, backend, device):
    params = _params(device, dtype, shapes=[(6, 3, 3, 3), (5, 7)], grad_dtype=grad_dtype)
    step = PreparedPenaltyGrad(params, "hoyer_square", backend=backend)
    for _ in range(2):
        _check(params, step, 1e-2, "hoyer_square", backend)


def test_new_gradients_are_bound_in(backend, device):
    params = _params(device)
    step = PreparedPenaltyGrad(params, "group_lasso", backend=backend)
    step(1e-3)
    for p in params:  # as after zero_grad(): fresh tensors, then None
        p.grad = torch.randn_like(p)
    _check(params, step, 1e-3, "group_lasso", backend)
    for p in params:
        p.grad = None
    expected = _expected(params, "group_lasso", 1e-3, backend)
    _assert_same(params, step(1e-3), expected)


def test_new_storage_under_the_same_gradient_is_seen(backend, device):
    params = _params(device, shapes=[(6, 3, 3, 3), (5, 7), (9,)])  # bound launches: no split
    step = PreparedPenaltyGrad(params, "group_lasso", backend=backend)
    step(1e-3)
    old = [p.grad for p in params]
    for p in params:  # the same .grad tensors, other memory
        p.grad.data = torch.randn_like(p)
    assert all(p.grad is g for p, g in zip(params, old))
    _check(params, step, 1e-3, "group_lasso", backend)


def test_gradients_of_another_dtype_or_layout(backend, device):
    params = _params(device, shapes=[(6, 5), (4, 3, 3, 3)])
    step = PreparedPenaltyGrad(params, "group_lasso", backend=backend)
    step(1e-3)
    if hasattr(params[0], "grad_dtype"):
        params[0].grad_dtype = None  # any dtype (torch >= 2.10)
    params[0].grad = torch.randn(6, 5, dtype=torch.float64, device=device)
    _check(params, step, 1e-3, "group_lasso", backend)
    params[1].grad = torch.randn(3, 3, 3, 4, device=device).permute(3, 2, 1, 0)  # not like w
    _check(params, step, 1e-3, "group_lasso", backend)


def test_a_moved_or_relaid_weight_binds_anew(backend, device):
    params = _params(device, shapes=[(6, 6), (5, 7)])
    step = PreparedPenaltyGrad(params, "group_lasso", backend=backend)
    step(1e-3)
    with torch.no_grad():
        params[1].data = torch.randn(5, 7, device=device)  # new storage
        params[0].data = params[0].data.t()  # same address, other strides
    params[0].grad = torch.randn_like(params[0])
    _check(params, step, 1e-3, "group_lasso", backend)


def test_value_scale(backend, device):
    params = _params(device)
    step = PreparedPenaltyGrad(params, "group_lasso", backend=backend)
    value, _ = _expected(params, "group_lasso", 1e-3, backend)
    scaled = step(1e-3, value_scale=0.25)
    assert scaled.dtype == value.dtype
    torch.testing.assert_close(scaled, value * 0.25, rtol=1e-6, atol=0)


def test_bad_gradients_are_refused_before_anything_is_written(backend, device):
    params = _params(device, shapes=[(6, 5), (4, 3)])
    step = PreparedPenaltyGrad(params, "group_lasso", backend=backend)
    step(1e-3)
    params[1].grad = torch.zeros(4, 3).to_sparse().to(device)
    before = snapshot(params)
    with pytest.raises(ValueError, match=r"tensors\[1\]\.grad .*sparse_coo.*expected a dense"):
        step(1e-3)
    assert_unchanged(params, before)
    with pytest.raises(ValueError, match="strength"):
        step(-1.0)


def test_paths_it_leaves_to_add_penalty_grad_(device):
    params = _params(device, shapes=[(6, 5), (0, 3)])  # an empty tensor
    step = PreparedPenaltyGrad(params, "group_lasso", backend="torch")
    _check(params, step, 1e-3, "group_lasso", "torch")
    empty = fs.add_penalty_grad_([], "group_lasso", 1e-3)
    assert torch.equal(PreparedPenaltyGrad([], "group_lasso")(1e-3), empty)
    with pytest.raises(ValueError, match="coupled"):
        PreparedPenaltyGrad(params, "group_lasso", groups=[])
    with pytest.raises(ValueError, match="unknown kind"):
        PreparedPenaltyGrad(params, "l3")


def test_regularizer_apply_follows_its_settings(backend, device):
    params = _params(device)
    reg = fs.Regularizer(params, "group_lasso", 1e-3, backend=backend)
    value, grads = _expected(params, "group_lasso", 1e-3, backend)
    torch.testing.assert_close(reg.apply_(), value * 1e-3, rtol=1e-6, atol=0)
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)
    reg.kind = "l1"  # a changed setting is honoured at the next call
    value, grads = _expected(params, "l1", 1e-3, backend)
    torch.testing.assert_close(reg.apply_(), value * 1e-3, rtol=1e-6, atol=0)
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("kind", ["group_lasso", "group_hoyer_square"])
def test_one_grouping_with_biases(kind, backend, device):
    params = _params(device)
    step = PreparedPenaltyGrad(params, kind, backend=backend)
    for _ in range(2):
        _check(params, step, 1e-3, kind, backend)
