"""Backend choice for the ops that have a Triton kernel but no native one (feature flow, selective
weight decay): "triton" or "torch" (the oracle).

"auto" (and FASTSPARSE_BACKEND) resolve as for every op (fastsparse.backends); where that picks the
native C++ backend, these ops quietly use the oracle instead. Asking explicitly for "native" or
"cuda" raises, saying which backends exist for the op.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from fastsparse.backends import resolve_backend


def triton_or_torch(backend: Optional[str], device: torch.device, method: str) -> str:
    """ "triton" or "torch" for tensors on `device`.

    >>> triton_or_torch("torch", torch.device("cpu"), "feature_flow")
    'torch'
    """
    requested = "auto" if backend is None else backend
    if requested == "auto":
        requested = os.environ.get("FASTSPARSE_BACKEND", "auto") or "auto"
    if requested in ("native", "cuda"):
        raise RuntimeError(
            f"backend {requested!r} has no {method} kernel; use 'triton' (CUDA, or the CPU "
            "interpreter with TRITON_INTERPRET=1), 'torch' or 'auto'"
        )
    name = resolve_backend(backend, device)
    return "triton" if name == "triton" else "torch"
