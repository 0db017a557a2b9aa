"""Choosing a backend, and the registry of fused backends: "auto" | "triton" | "native" | "cuda"
| "torch". Every op resolves its backend here, once, and nowhere else. The engine
(fastsparse/engine.py) composes every op from the primitives of the `Backend` protocol below.

- "triton": the fused Triton kernels of `triton/` (CUDA tensors, or CPU tensors when Triton's
  interpreter is on: TRITON_INTERPRET=1, slow, for tests).
- "native": the C++ kernels of `csrc/` for the tensors' device (OpenMP on CPU, CUDA C++ on GPU),
  compiled on first use (`native.py`). "cuda" is "native" for CUDA tensors only.
- "torch": the plain-PyTorch oracle (fastsparse.reference), any device.
- "auto": the fastest available for the device: Triton, then native, on CUDA; native on CPU;
  the oracle when nothing else can run (quietly).

Feature flow and selective weight decay have Triton kernels only (`TRITON_ONLY_OPS`): for them
"auto" falls back to the oracle where it would pick native, and "native"/"cuda" raise.

The environment variable FASTSPARSE_BACKEND replaces "auto" (an explicit argument wins). An
explicitly requested backend that cannot run raises a RuntimeError that says why. Importing this
module imports neither triton nor the native libraries and never touches CUDA.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType, SimpleNamespace
from typing import Callable, Optional, Protocol

import torch

from fastsparse.core.contract import StepOptions
from fastsparse.core.layout import Plan, PlanCache, Select

BACKENDS = ("auto", "triton", "native", "cuda", "torch")
# Ops with a Triton kernel and no native one.
TRITON_ONLY_OPS = ("feature_flow", "selective_decay")


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


def native_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the native kernels cannot run on this device, or None (may build them once)."""
    from fastsparse.backends import native

    return native.unavailable_reason(device)


def resolve_backend(backend: Optional[str], device: torch.device, op: str = "penalty") -> str:
    """The concrete backend ("triton", "native" or "torch") of `op` for tensors on `device`.

    >>> resolve_backend("torch", torch.device("cpu"))
    'torch'
    """
    name = "auto" if backend is None else backend
    source = "backend"
    if name == "auto":
        name = os.environ.get("FASTSPARSE_BACKEND", "auto") or "auto"
        source = "FASTSPARSE_BACKEND"
    if name not in BACKENDS:
        raise ValueError(f"unknown {source} {name!r}; valid backends: {', '.join(BACKENDS)}")
    if op in TRITON_ONLY_OPS:
        if name in ("native", "cuda"):
            raise RuntimeError(
                f"backend {name!r} has no {op} kernel; use 'triton' (CUDA, or the CPU "
                "interpreter with TRITON_INTERPRET=1), 'torch' or 'auto'"
            )
        if name == "auto":
            on_gpu = device.type == "cuda" and triton_unavailable_reason(device) is None
            return "triton" if on_gpu else "torch"
    if name == "auto":
        if device.type == "cuda" and triton_unavailable_reason(device) is None:
            return "triton"
        if _native_allowed_in_auto():
            reason = native_unavailable_reason(device)
            if reason is None:
                return "native"
            if _native_required():  # FASTSPARSE_NATIVE=1: a failed build must surface
                raise RuntimeError(f"FASTSPARSE_NATIVE=1 but the native backend failed: {reason}")
        return "torch"
    if name == "triton":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"backend 'triton' is not available: {reason}")
    if name in ("native", "cuda"):
        if name == "cuda" and device.type != "cuda":
            raise RuntimeError(f"backend 'cuda' is not available: the tensors are on {device}")
        reason = native_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"backend {name!r} is not available: {reason}")
        return "native"
    return name


# Under torch.compile the choice is made once, at trace time, and kept as a constant: it reads
# the environment, probes Triton and may build the native library, none of which dynamo should
# trace (the first fastsparse call inside a fullgraph-compiled function would fail). This is what
# torch.compiler.assume_constant_result does; calling it would import torch._dynamo (and triton)
# at `import fastsparse`, seconds before anything is compiled, so the mark is set directly.
resolve_backend._dynamo_marked_constant = True


def _native_allowed_in_auto() -> bool:
    from fastsparse.backends import native

    return native.native_mode() in ("auto", "1")


def _native_required() -> bool:
    from fastsparse.backends import native

    return native.native_mode() == "1"


class Backend(Protocol):
    """The primitives a fused backend gives; every op of fastsparse/ops.py is built from them.

    All tensors are on the plan's device; statistics, coefficients and factors are fp64
    (COEFFICIENT_DTYPE), computed exactly for tiny groups too (docs/design.md, "Exact on tiny
    norms").
    """

    plans: PlanCache

    def stats(
        self, plan: Plan, tensors, select: Select, element_threshold: Optional[float] = None
    ) -> torch.Tensor:
        """[total groups, 2] = (s1, s2) of the selected segments' groups (the others are 0).

        With `element_threshold`, only elements with |w| > threshold count (l0 + group prox)."""

    def rule(
        self,
        stats: torch.Tensor,
        segment_of_group: torch.Tensor,
        sums: torch.Tensor,
        kind: str,
        alpha: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [groups], coefs [groups, 2] = (a_g, b_g)) from the statistics; `sums` holds
        each segment's (L, F^2) for the across-group kinds."""

    def apply(
        self,
        plan: Plan,
        tensors,
        grads,
        coefs: torch.Tensor,
        select: Select,
        *,
        accumulate: bool,
        scale: float,
        scale_tensor: Optional[torch.Tensor] = None,
    ) -> None:
        """grads [+]= scale * scale_tensor * (a_g sign(w) + b_g w) on the selected segments."""

    def fused(
        self,
        plan: Plan,
        tensors,
        grads,
        select: Select,
        kind: str,
        alpha: float,
        scale: float,
        values: torch.Tensor,
    ) -> None:
        """Statistics, rule and gradient of one-block groups in one pass; values[g] written."""

    def prepare_fused(
        self, plan: Plan, tensors, grads, select: Select, kind: str, alpha: float
    ) -> Optional[Callable[[float, torch.Tensor], None]]:
        """`fused` prepared for these tensors' addresses: launch(scale, values) runs it (None
        when nothing is selected). The caller keeps the tensors alive and unchanged."""

    def prox(
        self,
        plan: Plan,
        tensors,
        select: Select,
        kind: str,
        t_elem: float,
        t_group: float,
        factors: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """Prox step in place on the selected segments; [total groups, 2] (s1, s2) after it.

        `factors` (per group) replace the computed group factors ("scale", split groups)."""

    def step_prox(
        self,
        plan: Plan,
        tensors,
        grads,
        states,
        options: StepOptions,
        kind: str,
        t_elem: float,
        t_group: float,
    ) -> Optional[torch.Tensor]:
        """The optimizer step of `options` (per tensor its state buffers, laid out like it) and
        the prox in one pass per group; [total groups, 2] (s1, s2) after it, or None where the
        backend has no such pass for this plan (nothing is then modified)."""


# --- the registry of fused backends --------------------------------------------------------------

_FUSED: dict = {}


def fused_backend(name: str) -> Backend:
    """The engine backend of a resolved name ("triton" or "native"), imported on first use."""
    backend = _FUSED.get(name)
    if backend is None:
        if name == "triton":
            from fastsparse.backends.triton import penalty, prox, step_prox

            backend = SimpleNamespace(
                plans=penalty.plans,
                stats=penalty.stats,
                rule=penalty.rule,
                apply=penalty.apply,
                fused=penalty.fused,
                prepare_fused=penalty.prepare_fused,
                prox=prox.prox,
                step_prox=step_prox.step_prox,
            )
        elif name == "native":
            from fastsparse.backends import native as backend
        else:
            raise ValueError(f"no fused implementation for backend {name!r}")
        _FUSED[name] = backend
    return backend


def op_kernels(op: str, name: str) -> ModuleType:
    """The Triton kernel module of a Triton-only op (`TRITON_ONLY_OPS`)."""
    if name != "triton" or op not in TRITON_ONLY_OPS:
        raise ValueError(
            f"no fused {op} implementation for backend {name!r}; available: triton "
            "(or 'torch', the oracle)"
        )
    if op == "feature_flow":
        from fastsparse.backends.triton import feature_flow as module
    else:
        from fastsparse.backends.triton import selective_decay as module
    return module
