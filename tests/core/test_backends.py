"""Backend selection (fastsparse.backends): names, the environment, "auto" and its quiet
fallback, and the clear error of an explicit backend that is not available (which changes
nothing)."""

import pytest
import torch

import fastsparse as fs
from fastsparse.backends import resolve_backend
from tests.helpers import assert_unchanged, params_with_grad, snapshot


@pytest.fixture
def params():
    return params_with_grad()


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
