"""The native backend: CPU C++ (OpenMP) and CUDA C++ kernels from `csrc/`, through a plain C ABI.

Why just-in-time and a C ABI (see also the README):
- `pip install .` needs no compiler: the sources ship as package data
  (fastsparse.backends.csrc) and are compiled on first use into a cache
  (`~/.cache/fastsparse/native`, or FASTSPARSE_CACHE_DIR), keyed by a hash of the sources, the
  compiler command and the machine. A build takes a few seconds once;
  `python -m fastsparse.backends.native` builds ahead of time.
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

The launchers below are this backend's primitives (stats, rule, apply, fused, prepare_fused,
prox, step_prox), which fastsparse/engine.py composes into the ops, as it does the Triton
backend's.
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
import typing
from pathlib import Path
from typing import Optional

import torch

from fastsparse.core.contract import (
    GROUP_PROX_KINDS,
    KIND_IDS,
    PROX_IDS,
    AdamStepOptions,
    SGDStepOptions,
    StepOptions,
)
from fastsparse.core.layout import SPLIT_BLOCK, Plan, PlanCache, new_empty, selected

# Field order of fs_segment in fastsparse/backends/csrc/fastsparse_native.h.
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
_W_COLUMN, _GRAD_COLUMN = NATIVE_FIELDS.index("w"), NATIVE_FIELDS.index("grad")


def _step_struct(options_type: type) -> type:
    """The ctypes mirror of a step-options NamedTuple: fs_sgd_step / fs_adam_step of
    csrc/fastsparse_native.h, its fields in the NamedTuple's order (floats as double, flags as
    int)."""
    hints = typing.get_type_hints(options_type)
    c_types = {float: ctypes.c_double, bool: ctypes.c_int}
    fields = [(name, c_types[hints[name]]) for name in options_type._fields]
    return type(f"{options_type.__name__}Struct", (ctypes.Structure,), {"_fields_": fields})


# The C struct each step family passes its options in (to fs_cpu_<family>_prox).
_STEP_STRUCTS = {SGDStepOptions: _step_struct(SGDStepOptions),
                 AdamStepOptions: _step_struct(AdamStepOptions)}  # fmt: skip

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
        # No contraction of a*b + c into one fused multiply-add: each operation rounds as in
        # PyTorch's own (an optimizer step fused here then tracks torch.optim's, whichever
        # instructions -march=native offers).
        flags = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-march=native",
                 "-ffp-contract=off"]  # fmt: skip
        return [compiler, *flags, str(source), "-o", str(output)]
    compiler = os.environ.get("NVCC") or "nvcc"
    flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-shared", *cuda_arch_flags()]
    return [compiler, *flags, str(source), "-o", str(output)]


def _source_dir() -> Path:
    return Path(str(importlib.resources.files("fastsparse.backends.csrc")))


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
        "group_stats": [p, i64, *items, p, p, f64, *stream],
        "prox": [p, i64, *items, i32, f64, f64, p, p, p, *stream],
        "rule": [p, p, p, i64, i32, f64, p, p, *stream],
        "apply": [p, i64, *items, p, f64, *([p] if device_type == "cuda" else []), *stream],
        "fused": [p, i64, *items, i32, f64, f64, p, *stream],
    }
    if device_type == "cpu":
        sgd, adam = (ctypes.POINTER(_STEP_STRUCTS[t]) for t in (SGDStepOptions, AdamStepOptions))
        signatures["sgd_prox"] = [p, i64, p, sgd, i32, f64, f64, p]
        signatures["adam_prox"] = [p, i64, p, p, adam, i32, f64, f64, p]
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
# Launchers (same interface as fastsparse.backends.triton.penalty)
# --------------------------------------------------------------------------------------------

plans = PlanCache()


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"native {what} failed with status {status}")


def _geometry(plan: Plan, segments, dtype_codes: tuple, accumulate: bool):
    """The segment table without addresses (columns w and grad 0) and the work-item count,
    cached per selection: a table for new addresses is then a copy with two columns set."""
    key = ("native-geometry", tuple(s.segment_id for s in segments), dtype_codes, accumulate)
    cached = plan.cache.get(key)
    if cached is None:
        rows, items = [], 0
        for s, (w_code, grad_code) in zip(segments, dtype_codes):
            geo = s.geometry
            fields = {
                "w": 0,
                "grad": 0,
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
                "w_dtype": w_code,
                "grad_dtype": grad_code,
                "accumulate": int(accumulate),
            }
            rows.append([fields[f] for f in NATIVE_FIELDS])
            items += geo.groups * s.chunks
        table = torch.tensor(rows, dtype=torch.int64).reshape(-1, len(NATIVE_FIELDS))
        cached = plan.cache[key] = (table, items)
    return cached


def _table(plan: Plan, segments, tensors, grads, accumulate: bool) -> tuple[torch.Tensor, int]:
    """Segment table (on the plan's device) and number of work items, cached per addresses."""
    weights = tuple(tensors[s.tensor_index].data_ptr() for s in segments)
    gradients = None if grads is None else tuple(grads[s.tensor_index].data_ptr() for s in segments)
    key = ("native", tuple(s.segment_id for s in segments), weights, gradients, accumulate)
    cached = plan.cache.get(key)
    if cached is None:
        written = tensors if grads is None else grads  # the dtype the kernels write
        codes = tuple(
            (DTYPE_CODES[tensors[s.tensor_index].dtype], DTYPE_CODES[written[s.tensor_index].dtype])
            for s in segments
        )
        geometry, items = _geometry(plan, segments, codes, accumulate)
        table = geometry.clone()
        table[:, _W_COLUMN] = torch.tensor(weights, dtype=torch.int64)
        if gradients is not None:
            table[:, _GRAD_COLUMN] = torch.tensor(gradients, dtype=torch.int64)
        cached = (table.to(plan.device, non_blocking=True), items)
        stale = [k for k in plan.cache if isinstance(k, tuple) and k[0] == "native"]
        for k in stale[: max(0, len(stale) - 32)]:  # addresses change as grads are reallocated
            del plan.cache[k]
        plan.cache[key] = cached
    return cached


def _call(plan: Plan, name: str, *args, items: Optional[int] = None) -> None:
    """Call fs_<device>_<name>: CUDA functions take the work-item count and torch's stream."""
    device = plan.device
    fn = getattr(library(device.type), f"fs_{device.type}_{name}")
    if device.type == "cuda":
        head, tail = args[:2], args[2:]
        counted = (*head, items, *tail) if items is not None else args
        _check(fn(*counted, torch.cuda.current_stream(device).cuda_stream), name)
    else:
        _check(fn(*args), name)


def _pairs_kernel(plan: Plan, name: str, segments, tensors, *args) -> torch.Tensor:
    """Run group_stats or prox over `segments`: [total_groups, 2] pairs (others stay 0)."""
    out = torch.zeros((plan.total_groups, 2), dtype=torch.float64, device=plan.device)
    if segments:
        table, items = _table(plan, segments, tensors, None, False)
        partials = torch.empty((max(items, 1), 2), dtype=torch.float64, device=plan.device)
        if name == "group_stats":
            call_args = (out.data_ptr(), partials.data_ptr(), *args)
        else:
            call_args = (*args, out.data_ptr(), partials.data_ptr())
        _call(plan, name, table.data_ptr(), len(segments), *call_args, items=items)
    return out


def stats(plan: Plan, tensors, select, element_threshold=None) -> torch.Tensor:
    """float64 [total_groups, 2] = (s1, s2) of the selected segments' groups (others stay 0)."""
    hard = -1.0 if element_threshold is None else float(element_threshold)
    return _pairs_kernel(plan, "group_stats", selected(plan.segments, select), tensors, hard)


def rule(stats_, segment_of_group, segment_sums_, kind: str, alpha: float):
    """Per-group value terms [groups] and coefficients [groups, 2] from statistics."""
    device = stats_.device
    stats_ = stats_.to(torch.float64).contiguous()
    sums = segment_sums_.to(torch.float64).contiguous()
    groups = stats_.shape[0]
    values = new_empty((groups,), dtype=torch.float64, device=device)
    coefs = new_empty((groups, 2), dtype=torch.float64, device=device)
    fn = getattr(library(device.type), f"fs_{device.type}_rule")
    args = [
        stats_.data_ptr(),
        segment_of_group.data_ptr(),
        sums.data_ptr(),
        groups,
        KIND_IDS[kind],
        float(alpha),
        values.data_ptr(),
        coefs.data_ptr(),
    ]
    if device.type == "cuda":
        args.append(torch.cuda.current_stream(device).cuda_stream)
    _check(fn(*args), "rule")
    return values, coefs


def apply(plan, tensors, grads, coefs, select, *, accumulate, scale, scale_tensor=None):
    """grads [+]= scale * scale_tensor * (a_g sign(w) + b_g w) on the selected segments."""
    segments = selected(plan.segments, select)
    if not segments:
        return
    table, items = _table(plan, segments, tensors, grads, accumulate)
    coefs = coefs.to(torch.float64).contiguous()
    if plan.device.type == "cuda":
        pointer = 0
        if scale_tensor is not None:
            scale_tensor = scale_tensor.reshape(1).to(torch.float64)
            pointer = scale_tensor.data_ptr()
        extra = (pointer,)
    else:
        if scale_tensor is not None:
            scale = scale * float(scale_tensor)
        extra = ()
    _call(
        plan,
        "apply",
        table.data_ptr(),
        len(segments),
        coefs.data_ptr(),
        float(scale),
        *extra,
        items=items,
    )


def prepare_fused(plan, tensors, grads, select, kind, alpha):
    """`fused` prepared for these tensors' addresses: launch(scale, values) runs it
    (None when no segment is selected). The caller keeps the tensors alive and unchanged."""
    segments = selected(plan.segments, select)
    if not segments:
        return None
    table, items = _table(plan, segments, tensors, grads, True)
    device, count, kind_id, alpha = plan.device, len(segments), KIND_IDS[kind], float(alpha)
    fn = getattr(library(device.type), f"fs_{device.type}_fused")
    if device.type == "cuda":

        def launch(scale, values):
            stream = torch.cuda.current_stream(device).cuda_stream
            table_ptr, values_ptr = table.data_ptr(), values.data_ptr()
            status = fn(table_ptr, count, items, kind_id, alpha, scale, values_ptr, stream)
            _check(status, "fused")

    else:

        def launch(scale, values):
            _check(fn(table.data_ptr(), count, kind_id, alpha, scale, values.data_ptr()), "fused")

    return launch


def fused(plan, tensors, grads, select, kind, alpha, scale, values):
    """One pass per group for within-group kinds: values[g] and grads += scale * dR/dw."""
    launch = prepare_fused(plan, tensors, grads, select, kind, alpha)
    if launch is not None:
        launch(float(scale), values)


def prox(plan, tensors, select, kind, t_elem, t_group, factors):
    """Prox step in place on the selected segments; [total_groups, 2] (s1, s2) after it."""
    segments = selected(plan.segments, select)
    pointer = 0
    if factors is not None:
        factors = factors.to(torch.float64).contiguous()
        pointer = factors.data_ptr()
    elif kind == "scale" or (kind in GROUP_PROX_KINDS and any(s.chunks > 1 for s in segments)):
        raise ValueError("group prox on groups longer than one chunk needs factors")
    return _pairs_kernel(
        plan, "prox", segments, tensors, PROX_IDS[kind], float(t_elem), float(t_group), pointer
    )


def step_prox(plan, tensors, grads, states, options: StepOptions, kind, t_elem, t_group):
    """An optimizer step (`options`: `SGDStepOptions` or `AdamStepOptions`; `states`: per tensor
    its state buffers, laid out like it) and the prox in one pass per group (CPU, whole groups,
    fp32 / fp64); returns [total_groups, 2] (s1, s2) after it, or None where the plan does not
    qualify."""
    segments = plan.segments
    if plan.device.type != "cpu" or any(s.chunks > 1 for s in segments):
        return None
    if any(t.dtype not in (torch.float32, torch.float64) for t in tensors):
        return None
    after = torch.zeros((plan.total_groups, 2), dtype=torch.float64, device=plan.device)
    if not segments:
        return after
    table, _ = _table(plan, segments, tensors, grads, False)
    # One address array per state (SGD: the momentum buffers; Adam: exp_avg, then exp_avg_sq).
    addresses = [
        torch.tensor([state[s.tensor_index].data_ptr() for s in segments], dtype=torch.int64)
        for state in zip(*states)
    ]
    step = _STEP_STRUCTS[type(options)](*options)
    fn = getattr(library("cpu"), f"fs_cpu_{options.family}_prox")
    status = fn(
        table.data_ptr(), len(segments), *(a.data_ptr() for a in addresses), ctypes.byref(step),
        PROX_IDS[kind], float(t_elem), float(t_group), after.data_ptr(),
    )  # fmt: skip
    return None if status else after


if __name__ == "__main__":  # python -m fastsparse.backends.native: build ahead of time
    for device_type in ("cpu", "cuda"):
        try:
            print(f"{device_type}: {build(device_type)}")
        except NativeBuildError as error:
            print(f"{device_type}: not built: {error}")
