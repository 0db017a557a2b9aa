"""How "auto" resolves when the native build fails: quietly to the oracle, unless
FASTSPARSE_NATIVE=1 demands the native backend."""

import pytest
import torch

from fastsparse.backends import native, resolve_backend


@pytest.fixture
def failed_native_build(monkeypatch):
    monkeypatch.setattr(native, "_libraries", {})
    monkeypatch.setattr(native, "_failures", {"cpu": native.NativeBuildError("compiler broke")})
    monkeypatch.delenv("FASTSPARSE_BACKEND", raising=False)


def test_auto_falls_back_to_the_oracle_by_default(failed_native_build, monkeypatch):
    monkeypatch.delenv("FASTSPARSE_NATIVE", raising=False)
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_required_native_build_failure_is_an_error(failed_native_build, monkeypatch):
    monkeypatch.setenv("FASTSPARSE_NATIVE", "1")
    with pytest.raises(RuntimeError, match="FASTSPARSE_NATIVE=1 .*compiler broke"):
        resolve_backend("auto", torch.device("cpu"))


def test_native_off_is_the_oracle(failed_native_build, monkeypatch):
    monkeypatch.setenv("FASTSPARSE_NATIVE", "0")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
