"""Choosing a backend: "auto" | "triton" | "torch".

- "triton": the fused kernels of fastsparse.kernels (CUDA tensors, or CPU tensors when Triton's
  interpreter is on: TRITON_INTERPRET=1, slow, for tests).
- "torch": the plain-PyTorch oracle (fastsparse.reference), any device.
- "auto": the best available for the tensors' device, falling back quietly.

The environment variable FASTSPARSE_BACKEND replaces "auto" (an explicit argument wins). An
explicitly requested backend that cannot run raises a RuntimeError that says why. Nothing here
imports triton or touches CUDA.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why Triton cannot run on tensors of this device, or None if it can."""
    if not triton_installed():
        return "triton is not installed (pip install 'fastsparse[triton]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreter_enabled():
        return None
    return (
        f"the tensors are on {device}; Triton kernels need a CUDA device "
        "(or TRITON_INTERPRET=1 to run them, slowly, on the CPU interpreter)"
    )


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """The concrete backend ("triton" or "torch") for tensors on `device`.

    >>> resolve_backend("torch", torch.device("cpu"))
    'torch'
    """
    name = "auto" if backend is None else backend
    if name == "auto":
        name = os.environ.get("FASTSPARSE_BACKEND", "auto") or "auto"
        source = "FASTSPARSE_BACKEND"
    else:
        source = "backend"
    if name not in BACKENDS:
        raise ValueError(f"unknown {source} {name!r}; valid backends: {', '.join(BACKENDS)}")
    if name == "auto":
        if device.type == "cuda" and triton_unavailable_reason(device) is None:
            return "triton"
        return "torch"
    if name == "triton":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"backend 'triton' is not available: {reason}")
    return name
