"""The native backend: CPU C++ (OpenMP) and CUDA C++ kernels from csrc/, through a plain C ABI.

Why just-in-time and a C ABI (see also the README):
- `pip install .` needs no compiler: the sources ship as package data (fastsparse.csrc) and are
  compiled on first use into a cache (`~/.cache/fastsparse/native`, or FASTSPARSE_CACHE_DIR),
  keyed by a hash of the sources, the compiler command and the machine. A build takes a few
  seconds once; `python -m fastsparse.native` builds ahead of time.
- The libraries include no torch headers and are loaded with ctypes, so one build works with
  every torch version: no C++ ABI to match, nothing that can crash on a torch upgrade.
- -march=native is safe because the build happens on the machine that runs it.

Environment:
    FASTSPARSE_NATIVE          "auto" (default: build on first use, quietly fall back to the
                               oracle under backend="auto" if that fails), "0" (off), "1"
                               (a failed build is an error even under "auto").
    FASTSPARSE_CUDA_ARCH_LIST  CUDA architectures, default "8.0;9.0" (sm_80, sm_90, + PTX).
    FASTSPARSE_CACHE_DIR       where built libraries are kept.
    CXX, NVCC                  the compilers (default c++ and nvcc).

The driver functions below have the signatures of fastsparse.kernels.penalty's, so
fastsparse.ops serves both backends with the same torch.library ops.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

from fastsparse.layout import (
    SPLIT_BLOCK,
    Plan,
    PlanCache,
    new_empty,
    segment_of_group_map,
    segment_sums,
)

# Field order of fs_segment in csrc/fastsparse_native.h.
NATIVE_FIELDS = (
    "w",
    "grad",
    "groups",
    "rows",
    "cols",
    "stride_group",
    "stride_row",
    "stride_col",
    "group_offset",
    "chunks",
    "chunk_len",
    "item_offset",
    "w_dtype",
    "grad_dtype",
    "accumulate",
)
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
KIND_IDS = {
    "l1": 0,
    "l2": 1,
    "group_lasso": 2,
    "l1l2": 3,
    "hoyer_square": 4,
    "sparse_group_lasso": 5,
    "group_l1l2": 6,
    "group_hoyer_square": 7,
}
ACROSS_KINDS = ("group_l1l2", "group_hoyer_square")

# --------------------------------------------------------------------------------------------
# Building and loading
# --------------------------------------------------------------------------------------------

_SOURCES = {"cpu": "cpu_kernels.cpp", "cuda": "cuda_kernels.cu"}
_libraries: dict = {}
_failures: dict = {}


class NativeBuildError(RuntimeError):
    pass


def native_mode() -> str:
    mode = os.environ.get("FASTSPARSE_NATIVE", "auto").strip().lower() or "auto"
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"FASTSPARSE_NATIVE must be auto, 0 or 1, got {mode!r}")
    return mode


def cache_dir() -> Path:
    root = os.environ.get("FASTSPARSE_CACHE_DIR") or Path.home() / ".cache" / "fastsparse"
    return Path(root) / "native"


def cuda_arch_flags() -> list[str]:
    archs = os.environ.get("FASTSPARSE_CUDA_ARCH_LIST", "8.0;9.0")
    codes = [a.strip().replace(".", "") for a in archs.replace(",", ";").split(";") if a.strip()]
    if not codes:
        raise ValueError("FASTSPARSE_CUDA_ARCH_LIST names no architecture")
    flags = [f"-gencode=arch=compute_{c},code=sm_{c}" for c in codes]
    return flags + [f"-gencode=arch=compute_{codes[-1]},code=compute_{codes[-1]}"]


def compile_command(device_type: str, source: Path, output: Path) -> list[str]:
    """The compiler command line for one library."""
    if device_type == "cpu":
        compiler = os.environ.get("CXX") or "c++"
        flags = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-march=native"]
        return [compiler, *flags, str(source), "-o", str(output)]
    compiler = os.environ.get("NVCC") or "nvcc"
    flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-shared", *cuda_arch_flags()]
    return [compiler, *flags, str(source), "-o", str(output)]


def _source_dir() -> Path:
    return Path(str(importlib.resources.files("fastsparse.csrc")))


def _machine_id() -> str:
    """What -march=native depends on: the CPU's name and feature flags."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            text += "".join(line for line in f if line.startswith(("model name", "flags")))
    except OSError:
        pass
    return text


def build(device_type: str) -> Path:
    """Compile the library for "cpu" or "cuda" into the cache (if needed); return its path."""
    source_dir = _source_dir()
    source = source_dir / _SOURCES[device_type]
    command = compile_command(device_type, source, Path("OUT"))
    digest = hashlib.sha256()
    for name in (_SOURCES[device_type], "fastsparse_native.h"):
        digest.update((source_dir / name).read_bytes())
    digest.update(" ".join(command).encode())
    digest.update(_machine_id().encode())
    target = cache_dir() / f"libfastsparse_{device_type}_{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    if shutil.which(command[0]) is None:
        raise NativeBuildError(f"no compiler: {command[0]!r} not found (set CXX / NVCC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        output = Path(tmp) / target.name
        command = compile_command(device_type, source, output)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise NativeBuildError(
                f"building the native {device_type} library failed:\n$ {' '.join(command)}\n"
                f"{result.stderr[-4000:]}"
            )
        os.replace(output, target)  # atomic: concurrent builders never see a partial file
    return target


def _declare(lib: ctypes.CDLL, device_type: str) -> None:
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    prefix = f"fs_{device_type}_"
    stream = [p] if device_type == "cuda" else []
    items = [i64] if device_type == "cuda" else []
    signatures = {
        "group_stats": [p, i64, *items, p, p, *stream],
        "rule": [p, p, p, i64, i32, f64, p, p, *stream],
        "apply": [p, i64, *items, p, f64, *([p] if device_type == "cuda" else []), *stream],
        "fused": [p, i64, *items, i32, f64, f64, p, *stream],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, prefix + name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int


def library(device_type: str) -> ctypes.CDLL:
    """The loaded native library for "cpu" or "cuda", built on first use."""
    if native_mode() == "0":
        raise NativeBuildError("the native backend is switched off (FASTSPARSE_NATIVE=0)")
    if device_type not in _libraries:
        if device_type in _failures:
            raise _failures[device_type]
        try:
            lib = ctypes.CDLL(str(build(device_type)))
            _declare(lib, device_type)
        except (OSError, NativeBuildError) as error:
            failure = NativeBuildError(str(error))
            _failures[device_type] = failure
            raise failure from error
        _libraries[device_type] = lib
    return _libraries[device_type]


def unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the native backend cannot run on this device, or None (builds it if needed)."""
    if device.type not in _SOURCES:
        return f"no native kernels for {device.type} tensors"
    try:
        library(device.type)
    except NativeBuildError as error:
        return str(error)
    return None


# --------------------------------------------------------------------------------------------
# Launchers (same interface as fastsparse.kernels.penalty)
# --------------------------------------------------------------------------------------------

_plans = PlanCache()


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"native {what} failed with status {status}")


def _table(plan: Plan, segments, tensors, grads, accumulate: bool) -> tuple[torch.Tensor, int]:
    """Segment table (on the plan's device) and number of work items, cached per addresses."""
    key = (
        "native",
        tuple(s.segment_id for s in segments),
        tuple(tensors[s.tensor_index].data_ptr() for s in segments),
        None if grads is None else tuple(grads[s.tensor_index].data_ptr() for s in segments),
        accumulate,
    )
    cached = plan.cache.get(key)
    if cached is None:
        rows, items = [], 0
        for s in segments:
            geo = s.geometry
            w = tensors[s.tensor_index]
            g = None if grads is None else grads[s.tensor_index]
            fields = {
                "w": w.data_ptr(),
                "grad": 0 if g is None else g.data_ptr(),
                "groups": geo.groups,
                "rows": geo.rows,
                "cols": geo.cols,
                "stride_group": geo.stride_group,
                "stride_row": geo.stride_row,
                "stride_col": geo.stride_col,
                "group_offset": s.group_offset,
                "chunks": s.chunks,
                "chunk_len": geo.group_size if s.chunks == 1 else SPLIT_BLOCK,
                "item_offset": items,
                "w_dtype": DTYPE_CODES[w.dtype],
                "grad_dtype": DTYPE_CODES[w.dtype if g is None else g.dtype],
                "accumulate": int(accumulate),
            }
            rows.append([fields[f] for f in NATIVE_FIELDS])
            items += geo.groups * s.chunks
        table = torch.tensor(rows, dtype=torch.int64).reshape(-1, len(NATIVE_FIELDS))
        cached = (table.to(plan.device, non_blocking=True), items)
        if len(plan.cache) > 64:  # addresses change when grads are reallocated: stay bounded
            for stale in [k for k in plan.cache if isinstance(k, tuple)][:32]:
                del plan.cache[stale]
        plan.cache[key] = cached
    return cached


def _stream_args(device: torch.device) -> list:
    if device.type == "cuda":
        return [torch.cuda.current_stream(device).cuda_stream]
    return []


def _item_args(device: torch.device, items: int) -> list:
    return [items] if device.type == "cuda" else []


def _acc_dtype(tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _stats(plan: Plan, segments, tensors) -> torch.Tensor:
    """float64 [total_groups, 2] statistics; groups outside `segments` stay 0."""
    lib = library(plan.device.type)
    stats = torch.zeros((plan.total_groups, 2), dtype=torch.float64, device=plan.device)
    if segments:
        table, items = _table(plan, segments, tensors, None, False)
        partials = torch.empty((max(items, 1), 2), dtype=torch.float64, device=plan.device)
        status = getattr(lib, f"fs_{plan.device.type}_group_stats")(
            table.data_ptr(),
            len(segments),
            *_item_args(plan.device, items),
            stats.data_ptr(),
            partials.data_ptr(),
            *_stream_args(plan.device),
        )
        _check(status, "group_stats")
    return stats


def _rule(plan: Plan, stats: torch.Tensor, kind: str, alpha: float):
    lib = library(plan.device.type)
    segment_of_group = segment_of_group_map(plan)
    sums = segment_sums(plan, stats) if kind in ACROSS_KINDS else stats
    values = new_empty((plan.total_groups,), dtype=torch.float64, device=plan.device)
    coefs = new_empty((plan.total_groups, 2), dtype=torch.float64, device=plan.device)
    status = getattr(lib, f"fs_{plan.device.type}_rule")(
        stats.data_ptr(),
        segment_of_group.data_ptr(),
        sums.data_ptr(),
        plan.total_groups,
        KIND_IDS[kind],
        float(alpha),
        values.data_ptr(),
        coefs.data_ptr(),
        *_stream_args(plan.device),
    )
    _check(status, "rule")
    return values, coefs


def _apply(plan, segments, tensors, grads, coefs, *, accumulate, scale, scale_tensor=None):
    if not segments:
        return
    lib = library(plan.device.type)
    table, items = _table(plan, segments, tensors, grads, accumulate)
    device_args = []
    if plan.device.type == "cuda":
        device_args = [0 if scale_tensor is None else scale_tensor.data_ptr()]
    elif scale_tensor is not None:
        scale = scale * float(scale_tensor)
    status = getattr(lib, f"fs_{plan.device.type}_apply")(
        table.data_ptr(),
        len(segments),
        *_item_args(plan.device, items),
        coefs.data_ptr(),
        float(scale),
        *device_args,
        *_stream_args(plan.device),
    )
    _check(status, "apply")


def _fused(plan, segments, tensors, grads, kind, alpha, scale, values):
    if not segments:
        return
    lib = library(plan.device.type)
    table, items = _table(plan, segments, tensors, grads, True)
    status = getattr(lib, f"fs_{plan.device.type}_fused")(
        table.data_ptr(),
        len(segments),
        *_item_args(plan.device, items),
        KIND_IDS[kind],
        float(alpha),
        float(scale),
        values.data_ptr(),
        *_stream_args(plan.device),
    )
    _check(status, "fused")


def penalty_forward(tensors, kind, groupings, alpha):
    """Penalty value (0-dim) and per-group coefficients [total_groups, 2] for the backward."""
    plan = _plans.get(tensors, groupings)
    stats = _stats(plan, plan.segments, tensors)
    values, coefs = _rule(plan, stats, kind, alpha)
    acc = _acc_dtype(tensors)
    return values.sum().to(acc), coefs.to(acc)


def penalty_backward(tensors, coefs, grad_value, kind, groupings, alpha):
    """dR/dW * grad_value for each tensor, in the tensor's dtype and layout."""
    # Several groupings add up in fp32 buffers for low-precision weights (rounded once).
    dtypes = [t.dtype for t in tensors]
    if len(groupings) > 1:
        dtypes = [torch.float64 if d == torch.float64 else torch.float32 for d in dtypes]
    plan = _plans.get(tensors, groupings, dtypes)
    grads = [
        new_empty(t.shape, stride=t.stride(), dtype=d, device=t.device)
        for t, d in zip(tensors, dtypes)
    ]
    scale_tensor = grad_value.reshape(1).to(torch.float64)
    coefs = coefs.to(torch.float64)
    for gi in range(len(groupings)):
        segments = [s for s in plan.segments if s.grouping_index == gi]
        _apply(
            plan,
            segments,
            tensors,
            grads,
            coefs,
            accumulate=gi > 0,
            scale=1.0,
            scale_tensor=scale_tensor,
        )
    return [g.to(t.dtype) for g, t in zip(grads, tensors)]


def add_penalty_grad(grads, tensors, kind, groupings, alpha, strength):
    """grads[i] += strength * dR/dW_i in place; returns the penalty value (0-dim)."""
    plan = _plans.get(tensors, groupings, [g.dtype for g in grads])
    across = kind in ACROSS_KINDS
    unfused = [s for s in plan.segments if across or s.chunks > 1]
    unfused_ids = {s.segment_id for s in unfused}
    if unfused:
        values, coefs = _rule(plan, _stats(plan, unfused, tensors), kind, alpha)
    else:
        values = new_empty((plan.total_groups,), dtype=torch.float64, device=plan.device)
        coefs = values
    # One grouping after the other: a tensor's gradient is never written by two at once.
    for gi in range(len(groupings)):
        of_grouping = [s for s in plan.segments if s.grouping_index == gi]
        two_pass = [s for s in of_grouping if s.segment_id in unfused_ids]
        one_pass = [s for s in of_grouping if s.segment_id not in unfused_ids]
        _apply(plan, two_pass, tensors, grads, coefs, accumulate=True, scale=strength)
        _fused(plan, one_pass, tensors, grads, kind, alpha, strength, values)
    return values.sum().to(_acc_dtype(tensors))


def group_norms(tensors, grouping):
    """The group l2 norms of all tensors, concatenated in order (accumulation dtype)."""
    plan = _plans.get(tensors, (grouping,))
    stats = _stats(plan, plan.segments, tensors)
    return torch.sqrt(stats[:, 1]).to(_acc_dtype(tensors))


if __name__ == "__main__":  # python -m fastsparse.native: build ahead of time
    for device_type in ("cpu", "cuda"):
        try:
            print(f"{device_type}: {build(device_type)}")
        except NativeBuildError as error:
            print(f"{device_type}: not built: {error}")
