"""Bad input gets a clear error and changes nothing; backend selection."""

import pytest
import torch

import fastsparse as fs
from fastsparse.core.backends import resolve_backend


def snapshot(tensors):
    return [(t.detach().clone(), None if t.grad is None else t.grad.clone()) for t in tensors]


def assert_unchanged(tensors, before):
    for t, (value, grad) in zip(tensors, before):
        assert torch.equal(t.detach(), value)
        assert (t.grad is None) == (grad is None)
        if grad is not None:
            assert torch.equal(t.grad.to_dense(), grad.to_dense())


@pytest.fixture
def params():
    a = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    a.grad = torch.ones_like(a)
    return [a, b]


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


def test_explicit_unavailable_backend_raises(monkeypatch, params):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    before = snapshot(params)
    with pytest.raises(RuntimeError, match="backend 'triton' is not available.*CUDA device"):
        fs.add_penalty_grad_(params, "l1", 1.0, backend="triton")
    assert_unchanged(params, before)


def test_auto_prefers_native_on_cpu_and_falls_back_quietly(monkeypatch, params):
    assert resolve_backend("auto", torch.device("cpu")) == "native"
    monkeypatch.setenv("FASTSPARSE_NATIVE", "0")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    before = snapshot(params)
    with pytest.raises(RuntimeError, match="backend 'native' is not available.*switched off"):
        fs.add_penalty_grad_(params, "l1", 1.0, backend="native")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: the tensors are on"):
        fs.add_penalty_grad_(params, "l1", 1.0, backend="cuda")
    assert_unchanged(params, before)


def test_backend_names_and_environment(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'cuda-ish'; valid backends: auto"):
        resolve_backend("cuda-ish", torch.device("cpu"))
    monkeypatch.setenv("FASTSPARSE_BACKEND", "torch")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("FASTSPARSE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown FASTSPARSE_BACKEND 'bogus'"):
        resolve_backend("auto", torch.device("cpu"))
    assert resolve_backend("torch", torch.device("cpu")) == "torch"  # explicit wins


def test_environment_selects_triton(monkeypatch, device):
    monkeypatch.setenv("FASTSPARSE_BACKEND", "triton")
    assert resolve_backend(None, torch.device(device)) == "triton"
    w = torch.randn(3, 4, device=device, requires_grad=True)
    value = fs.penalty(w, "l1l2")
    assert "fastsparse" in type(value.grad_fn).__name__.lower()
