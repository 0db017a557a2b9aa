"""The benchmark harness: every provider on every workload and mode, in one run.

    python -m benchmarks.run                      # CUDA if available (profile "full"), else CPU
    python -m benchmarks.run --device cpu         # profile "cpu": a few minutes on 2 cores
    python -m benchmarks.run --device cpu --quick # CI smoke: seconds
    python -m benchmarks.run --list               # workloads, providers and modes
    fastsparse bench [same options]               # the same, through fastsparse.workflow.bench

Modes (the minimal bytes each must move, used for the effective bandwidth; W = the weights'
bytes, G = the gradients' bytes, groups = number of groups):

    value        R(W) without gradient                         W
    value_grad   R(W), then backward() into fresh .grad        W + G
    inplace      add_penalty_grad_: .grad += strength·dR/dW    W + 2G (G read and written)
    group_norms  the group l2 norms                            W + 4·groups (fp32 norms)
    prox_step    an optimizer step, then a group-lasso prox    4W + G with SGD (read W, G, M,
                 on the weights of 2+ dims                     write W, M), 6W + G with AdamW

prox_step's figure of merit is the cost over the plain step (provider "plain-step"): the sparse
step's time minus the plain step's, measured in the same run. --step-optimizer picks the step:
SGD with momentum 0.9 (lr 0.1) or AdamW (lr 1e-3).

Timing: on CUDA, CUDA events around each call, after a synchronize and an L2 flush (a 256 MB
write), so a time covers the host launch overhead and the device work; on CPU, time.perf_counter
around each call, after the same 256 MB write has flushed the CPU's caches (without it, what the
reset of the inputs left in a 32 MB L3 flatters whichever provider touches it first). Each
provider's first call (which compiles, builds plans, checks the result against the oracle) is
timed separately as first_call_s; then warmup calls; then timed repeats (enough to fill
--target-seconds, within the repeat limits). Inputs are reset before every call, outside the
timed region: .grad set to None (value_grad) or zeroed (inplace).

Peak extra memory: on CUDA, torch.cuda.max_memory_allocated() during one call minus the memory
allocated before it; on CPU, the same from the allocation events of torch.profiler
(profile_memory=True: every tensor allocated through PyTorch's CPU allocator, outputs included;
memory a native kernel allocates by other means is not seen).

Long runs: --time-budget stops starting cases after that many seconds (the rest is recorded as
skipped), and the run so far is saved as <out-dir>/running-*.partial.json while it goes (removed
at the end), so a run cut short still leaves data that benchmarks.report can render or merge.

Adding a mode: add an entry to MODES with its bytes model and its call builder, and a method on
the providers (see benchmarks/providers.py).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch

from benchmarks import report
from benchmarks.providers import (
    PROVIDER_NAMES,
    STEP_LRS,
    Case,
    CompiledOracle,
    Provider,
    all_providers,
    step_optimizer,
)
from benchmarks.workloads import PROFILES, Workload, profile_workloads, select
from fastsparse import reference
from fastsparse.core.contract import KINDS

SCHEMA = 1
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- modes


@dataclass
class Mode:
    """One measured operation: its bytes model and how to call a provider for it."""

    name: str
    description: str
    bytes_model: str
    min_bytes: Callable[[Workload, object], int]
    build: Callable[[Provider, Case], tuple]  # -> (setup, fn)


def _no_setup() -> None:
    pass


def _build_value(provider: Provider, case: Case):
    weights = case.weights

    def fn():
        with torch.no_grad():
            return provider.penalty(case, weights)

    return _no_setup, fn


def _build_value_grad(provider: Provider, case: Case):
    def setup():
        for p in case.params:
            p.grad = None

    def fn():
        value = provider.penalty(case, case.params)
        value.backward()
        return value.detach()

    return setup, fn


def _build_inplace(provider: Provider, case: Case):
    grad_dtype = case.workload.grad_dtype

    def setup():
        if any(p.grad is None or p.grad.dtype != grad_dtype for p in case.params):
            for p in case.params:
                p.grad = torch.zeros(p.shape, dtype=grad_dtype, device=p.device)
        else:
            torch._foreach_zero_([p.grad for p in case.params])

    def fn():
        return provider.add_grad_(case)

    return setup, fn


def _build_group_norms(provider: Provider, case: Case):
    weights = case.weights

    def fn():
        with torch.no_grad():
            return provider.group_norms(case, weights)

    return _no_setup, fn


def step_inputs(case: Case) -> tuple:
    """(weights, gradients) every prox_step call starts from: the same for every provider."""
    if "step" not in case.cache:
        gen = torch.Generator(device=case.device).manual_seed(1)
        grads = [
            torch.randn(p.shape, generator=gen, device=case.device).mul_(0.01).to(p.dtype)
            for p in case.params
        ]
        case.cache["step"] = ([p.detach().clone() for p in case.params], grads)
    return case.cache["step"]


def _build_prox_step(provider: Provider, case: Case):
    start, grads = step_inputs(case)
    step = provider.sparse_step(case)  # a fresh optimizer: the first call is a first step
    weights = case.weights

    def setup():
        torch._foreach_copy_(weights, start)
        for p, g in zip(case.params, grads):
            p.grad = g

    def fn():
        step()
        return weights

    return setup, fn


MODES = {
    m.name: m
    for m in (
        Mode(
            "value",
            "penalty value R(W), no gradient",
            "W",
            lambda w, groups: w.weight_bytes,
            _build_value,
        ),
        Mode(
            "value_grad",
            "R(W) then backward() into fresh .grad (autograd)",
            "W + G",
            lambda w, groups: w.weight_bytes + w.grad_bytes,
            _build_value_grad,
        ),
        Mode(
            "inplace",
            "add_penalty_grad_: .grad += strength * dR/dW (no graph)",
            "W + 2G",
            lambda w, groups: w.weight_bytes + 2 * w.grad_bytes,
            _build_inplace,
        ),
        Mode(
            "group_norms",
            "group l2 norms (fp32)",
            "W + 4*groups",
            lambda w, groups: w.weight_bytes + 4 * w.groups(groups),
            _build_group_norms,
        ),
        Mode(
            "prox_step",
            "an optimizer step with sparsity: the optimizer (--step-optimizer) over every "
            "parameter, then a group-lasso prox (threshold lr * strength) on the weights of "
            "2+ dims",
            "4W + G with SGD, 6W + G with AdamW (the fused floor: read W, G and the optimizer's "
            "state, write W and the state; counted with SGD's)",
            lambda w, groups: 4 * w.weight_bytes + w.grad_bytes,
            _build_prox_step,
        ),
    )
}


def _mode_skip_reason(mode: str, case: Case) -> Optional[str]:
    if mode in ("group_norms", "prox_step") and isinstance(case.groups, (tuple, list)):
        return f"{mode} takes one grouping, not a tuple"
    if mode == "prox_step" and case.workload.grad_dtype != case.workload.dtype:
        return (
            "an optimizer steps weights with gradients of their dtype (the fp32 master weights "
            "of bf16 training: --llama-dtype fp32)"
        )
    return None


# --------------------------------------------------------------------------- timing


@dataclass
class Settings:
    """Repeat policy: warmup calls, then enough repeats to fill target_s, within the limits."""

    warmup: int
    min_repeats: int
    max_repeats: int
    target_s: float


DEFAULT_SETTINGS = {
    "cuda": Settings(warmup=3, min_repeats=10, max_repeats=200, target_s=0.3),
    "cpu": Settings(warmup=1, min_repeats=3, max_repeats=20, target_s=0.4),
    "quick": Settings(warmup=0, min_repeats=2, max_repeats=3, target_s=0.0),
}


class Timer:
    """Times calls on one device; see the module docstring for the method."""

    FLUSH_BYTES = 256 * 2**20  # more than any GPU's L2 or CPU's last-level cache

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._flush = None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _flush_caches(self) -> None:
        if self._flush is None:
            self._flush = torch.empty(self.FLUSH_BYTES, dtype=torch.int8, device=self.device)
        self._flush.zero_()

    def time(self, fn: Callable, setup: Callable, repeats: int) -> List[float]:
        """Seconds per call, one per repeat; setup runs before every call, untimed."""
        times = []
        if self.cuda:
            pairs = []
            for _ in range(repeats):
                setup()
                self._flush_caches()
                self.sync()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                pairs.append((start, end))
            self.sync()
            times = [s.elapsed_time(e) / 1e3 for s, e in pairs]
        else:
            for _ in range(repeats):
                setup()
                self._flush_caches()
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
        return times

    def peak_extra_bytes(self, fn: Callable, setup: Callable) -> tuple:
        """(bytes, method): the peak memory one call allocates on top of what exists before."""
        setup()
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            out = fn()
            self.sync()
            peak = torch.cuda.max_memory_allocated(self.device) - base
            del out
            return int(peak), "cuda max_memory_allocated delta"
        return _cpu_peak_extra_bytes(fn), "torch.profiler CPU allocation events"


def _cpu_peak_extra_bytes(fn: Callable) -> Optional[int]:
    """Peak live bytes allocated through PyTorch's CPU allocator during fn (None if unknown)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    try:
        from torch._C._profiler import _EventType

        events = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            event = stack.pop()
            if event.tag == _EventType.Allocation:
                fields = event.extra_fields
                events.append((event.start_time_ns, fields.alloc_size, fields.total_allocated))
            stack.extend(event.children)
    except Exception:  # a private API: say "unknown" rather than guess
        return None
    if not events:
        return 0
    events.sort()
    _, first_size, first_total = events[0]
    baseline = first_total - first_size
    return int(max(0, max(total for _, _, total in events) - baseline))


def _quantiles(times: List[float]) -> tuple:
    t = torch.tensor(times, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return tuple(float(x) for x in q)


def copy_bandwidth(timer: Timer, nbytes: int, settings: Settings) -> dict:
    """Device-to-device copy bandwidth (read + write bytes per second) of one large buffer."""
    numel = nbytes // 4
    src = torch.randn(numel, device=timer.device)
    dst = torch.empty_like(src)

    def fn():
        dst.copy_(src)

    timer.time(fn, _no_setup, max(2, settings.warmup))
    times = timer.time(fn, _no_setup, max(10, settings.min_repeats))
    median, p20, p80 = _quantiles(times)
    moved = 2 * numel * 4
    return {
        "buffer_bytes": numel * 4,
        "bytes_moved": moved,
        "median_ms": median * 1e3,
        "p20_ms": p20 * 1e3,
        "p80_ms": p80 * 1e3,
        "gbps": moved / median / 1e9,
        "raw_ms": [t * 1e3 for t in times],
    }


# --------------------------------------------------------------------------- checks


class OracleCheck:
    """The oracle's outputs for one workload (computed once, lazily) and tolerance checks.

    A sanity check that every provider computes the same thing; tests of correctness live in
    tests/. Gradients are compared by their per-tensor l2 norms (cheap to keep), relative to
    max(norm, 10% of the largest norm): a tensor whose exact gradient is 0 (l1l2 on one-element
    groups, biases) holds rounding noise in every implementation, which is not compared.
    """

    def __init__(self, case: Case):
        self.case = case
        self._value = None
        self._grad_norms = None
        self._group_norms = None
        self._stepped_norms = None
        self.error = None
        low = case.workload.dtype in (torch.bfloat16, torch.float16)
        self.tolerance = 2e-2 if low else 1e-3

    def prepare(self, modes: List[str]) -> None:
        """Compute what `modes` will be checked against now, while memory is free."""
        try:
            if {"value", "value_grad", "inplace"} & set(modes):
                self.value()
            if {"value_grad", "inplace"} & set(modes):
                self.grad_norms()
            if "group_norms" in modes and not isinstance(self.case.groups, (tuple, list)):
                self.group_norms()
            if "prox_step" in modes and _mode_skip_reason("prox_step", self.case) is None:
                self.stepped_norms()
        except Exception as error:  # no reference: results are reported unchecked
            self.error = _short(error)
        _free(self.case.device)

    def value(self) -> float:
        if self._value is None:
            c = self.case
            with torch.no_grad():
                self._value = float(reference.penalty(c.weights, c.kind, c.groups, c.alpha))
        return self._value

    def grad_norms(self) -> torch.Tensor:
        if self._grad_norms is None:
            c = self.case
            grads = reference.penalty_grad(c.weights, c.kind, c.groups, c.alpha)
            self._grad_norms = _norms(grads)
            del grads
        return self._grad_norms

    def group_norms(self) -> torch.Tensor:
        if self._group_norms is None:
            norms = reference.group_norms(self.case.weights, self.case.groups)
            self._group_norms = torch.cat([n.double().cpu().flatten() for n in norms])
        return self._group_norms

    def stepped_norms(self) -> torch.Tensor:
        """Per-tensor norms after one prox_step from `step_inputs`: w - lr g, then the prox."""
        if self._stepped_norms is None:
            c = self.case
            start, grads = step_inputs(c)
            after = [w.clone().requires_grad_(True) for w in start]
            for w, g in zip(after, grads):
                w.grad = g
            step_optimizer(c, after).step()  # the first step, as the providers' first call
            weights = [w.detach() for w in after if w.dim() >= 2]
            reference.prox_(weights, "group_lasso", STEP_LRS[c.step] * c.strength, c.groups)
            self._stepped_norms = _norms(after)
            del after, weights
        return self._stepped_norms

    def check(self, mode: str, provider: Provider, out) -> dict:
        """{"status": "ok" | "mismatch" | "n/a", "max_rel_err": float | None}."""
        if not provider.checked:
            return {"status": "n/a", "max_rel_err": None}
        if self.error:
            return {"status": "n/a", "max_rel_err": None, "note": f"oracle: {self.error}"}
        errors = []
        if mode in ("value", "value_grad", "inplace") and isinstance(out, torch.Tensor):
            ref = self.value()
            errors.append(abs(float(out) - ref) / max(abs(ref), 1e-30))
        if mode in ("value_grad", "inplace"):
            grads = [p.grad for p in self.case.params]
            if any(g is None for g in grads):
                return {"status": "mismatch", "max_rel_err": None, "note": "no .grad written"}
            got = _norms(grads)
            if mode == "inplace":
                got = got / self.case.strength
            errors.append(_rel_err(got, self.grad_norms()))
        if mode == "group_norms":
            got = torch.cat([n.double().cpu().flatten() for n in out])
            errors.append(_rel_err(got, self.group_norms()))
        if mode == "prox_step":
            errors.append(_rel_err(_norms(out), self.stepped_norms()))
        if not errors:
            return {"status": "n/a", "max_rel_err": None}
        err = max(errors)
        ok = math.isfinite(err) and err <= self.tolerance
        return {"status": "ok" if ok else "mismatch", "max_rel_err": err}


def _norms(tensors) -> torch.Tensor:
    return torch.stack([t.detach().double().norm().cpu() for t in tensors])


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    if got.shape != ref.shape:
        return math.inf
    floor = 0.1 * float(ref.abs().max()) if ref.numel() else 0.0
    scale = ref.abs().clamp_min(max(floor, 1e-30))
    return float(((got - ref).abs() / scale).max()) if ref.numel() else 0.0


# --------------------------------------------------------------------------- the run


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def measure(
    provider: Provider,
    mode: Mode,
    case: Case,
    timer: Timer,
    settings: Settings,
    oracle: OracleCheck,
) -> dict:
    """One result row: times and metrics, or status "skipped"/"failed" with the reason."""
    row = {
        "workload": case.workload.label,
        "mode": mode.name,
        "provider": provider.name,
        "role": provider.role,
        "status": "ok",
        "reason": None,
        "bytes": provider.moved_bytes(mode.name, case.workload)
        or mode.min_bytes(case.workload, case.groups),
    }
    reason = _mode_skip_reason(mode.name, case) or provider.unsupported(mode.name, case)
    if reason:
        return {**row, "status": "skipped", "reason": reason}
    try:
        setup, fn = mode.build(provider, case)
        setup()
        timer.sync()
        start = time.perf_counter()
        out = fn()
        timer.sync()
        row["first_call_s"] = time.perf_counter() - start
        row["check"] = oracle.check(mode.name, provider, out)
        del out
        warm = timer.time(fn, setup, settings.warmup) if settings.warmup else []
        estimate = min(warm) if warm else row["first_call_s"]
        wanted = math.ceil(settings.target_s / max(estimate, 1e-9))
        repeats = min(settings.max_repeats, max(settings.min_repeats, wanted))
        times = timer.time(fn, setup, repeats)
        peak, method = timer.peak_extra_bytes(fn, setup)
    except Exception as error:
        return {**row, "status": "failed", "reason": _short(error)}
    finally:
        for p in case.params:
            p.grad = None
        _free(case.device)
    median, p20, p80 = _quantiles(times)
    return {
        **row,
        "median_ms": median * 1e3,
        "p20_ms": p20 * 1e3,
        "p80_ms": p80 * 1e3,
        "repeats": len(times),
        "raw_ms": [t * 1e3 for t in times],
        "gbps": row["bytes"] / median / 1e9,
        "peak_extra_bytes": peak,
        "peak_method": method,
    }


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def profile_policy(args, provider: Provider, mode: str, workload: Workload) -> Optional[str]:
    """Cases a profile leaves out to keep its run short (unless --providers names them).

    torch.compile spends seconds compiling each graph, and minutes on a whole model's list of
    tensors on a few CPU cores: "quick" leaves it out, and "cpu" measures it on whole models in
    the in-place mode only (the CPU targets). "full" measures everything.
    """
    if not isinstance(provider, CompiledOracle) or args.providers:
        return None
    if args.profile == "quick":
        return "--quick leaves out torch.compile (seconds of compilation per graph)"
    if args.profile == "cpu" and workload.family == "model" and mode != "inplace":
        return (
            "cpu profile: torch.compile of a whole model is measured in the inplace mode only "
            "(minutes of compilation per mode on a few cores); --full measures every mode"
        )
    return None


def _unmeasured(workload: Workload, mode: Mode, provider: Provider, status, reason, groups):
    return {
        "workload": workload.label,
        "mode": mode.name,
        "provider": provider.name,
        "role": provider.role,
        "status": status,
        "reason": reason,
        "bytes": mode.min_bytes(workload, groups),
    }


def run_benchmarks(args: argparse.Namespace, log=print, checkpoint=None) -> dict:
    """Run every selected workload × mode × provider; return the run as a JSON-ready dict.

    checkpoint(run), if given, is called with the run so far after every workload and every
    10 s or so (the harness saves it, so that a run cut short still leaves its results). With
    args.time_budget, no case starts after that many seconds: the rest is recorded as skipped.
    """
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = _settings(args)
    workloads = select(
        profile_workloads(args.profile, device, args.llama_layers, _llama_dtype(args)),
        args.workloads,
    )
    providers = [p for p in all_providers() if not args.providers or p.name in args.providers]
    modes = [MODES[m] for m in (args.modes or MODES)]
    timer = Timer(device)
    started = datetime.datetime.now(datetime.timezone.utc)
    deadline = None if args.time_budget is None else time.monotonic() + args.time_budget
    env = environment(device)
    log(f"fastsparse benchmarks on {env['device']['name']} ({args.profile} profile)")
    copy_bytes = {"cuda": 2**30, "cpu": 256 * 2**20}[device.type]
    if args.profile == "quick":
        copy_bytes = 16 * 2**20
    copy = copy_bandwidth(timer, copy_bytes, settings)
    log(f"device-to-device copy: {copy['gbps']:.1f} GB/s ({copy['buffer_bytes'] >> 20} MiB)")
    results = []
    run = {
        "schema": SCHEMA,
        "started": started.isoformat(timespec="seconds"),
        "finished": None,
        "complete": False,
        "date": started.date().isoformat(),
        **env,
        "config": {
            "profile": args.profile,
            "kind": args.kind,
            "groups": _groups_text(args.groups),
            "alpha": args.alpha,
            "strength": args.strength,
            "step_optimizer": args.step_optimizer,
            "modes": [m.name for m in modes],
            "providers": [p.name for p in providers],
            "settings": settings.__dict__,
            "time_budget_s": args.time_budget,
            "argv": args.argv,
        },
        "modes": {m.name: {"description": m.description, "bytes": m.bytes_model} for m in modes},
        "providers": {p.name: {"role": p.role, "description": p.description} for p in providers},
        "copy": copy,
        "workloads": [w.describe(args.groups) for w in workloads],
        "results": results,
        "load_samples": [],
    }

    total = len(workloads) * len(modes) * len(providers)
    saved = time.monotonic()
    for workload in workloads:
        try:
            params, model = workload.build(device)
        except Exception as error:  # e.g. out of memory: the workload fails, the run goes on
            reason = f"building the workload failed: {_short(error)}"
            for mode in modes:
                for provider in providers:
                    row = _unmeasured(workload, mode, provider, "failed", reason, args.groups)
                    results.append(row)
            log(f"{workload.label}: {reason}")
            continue
        case = Case(
            workload,
            params,
            model,
            args.kind,
            args.groups,
            args.alpha,
            args.strength,
            device,
            allow_interpreter=args.allow_interpreter,
            step=args.step_optimizer,
        )
        oracle = OracleCheck(case)
        oracle.prepare([m.name for m in modes])
        unavailable = {}
        for provider in providers:
            reason = provider.unavailable(case)
            if reason is None:
                try:
                    provider.start(case)
                except Exception as error:
                    reason = f"setup failed: {_short(error)}"
            unavailable[provider.name] = reason
        for mode in modes:
            for provider in providers:
                reason = unavailable[provider.name] or profile_policy(
                    args, provider, mode.name, workload
                )
                if deadline is not None and time.monotonic() > deadline and reason is None:
                    reason = f"time budget of {args.time_budget:g} s used up before this case"
                if reason is not None:
                    status = "failed" if reason.startswith("setup failed") else "skipped"
                    row = _unmeasured(workload, mode, provider, status, reason, args.groups)
                else:
                    row = measure(provider, mode, case, timer, settings, oracle)
                results.append(row)
                log(f"[{len(results)}/{total}] {_progress(row)}")
                if checkpoint is not None and time.monotonic() - saved > 10:
                    report.add_derived_metrics(run)
                    checkpoint(run)
                    saved = time.monotonic()
        for provider in providers:
            try:
                provider.finish()
            except Exception as error:
                log(f"{provider.name}: cleanup failed: {_short(error)}")
        del params, model, case, oracle
        _free(device)
        run["load_samples"].append((load_average() or [None])[0])
        if checkpoint is not None:
            report.add_derived_metrics(run)
            checkpoint(run)

    run["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    run["complete"] = True
    run["load_after"] = load_average()
    report.add_derived_metrics(run)
    return run


def _llama_dtype(args) -> torch.dtype:
    return torch.float32 if getattr(args, "llama_dtype", "bf16") == "fp32" else torch.bfloat16


def _progress(row: dict) -> str:
    head = f"{row['workload']:<24} {row['mode']:<11} {row['provider']:<21}"
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row['reason']}"
    check = row.get("check", {}).get("status", "n/a")
    return (
        f"{head} {row['median_ms']:10.3f} ms  [{row['p20_ms']:.3f}, {row['p80_ms']:.3f}]  "
        f"{row['gbps']:7.2f} GB/s  check {check}"
    )


def _settings(args) -> Settings:
    key = "quick" if args.profile == "quick" else args.device
    base = DEFAULT_SETTINGS[key]
    return Settings(
        warmup=base.warmup if args.warmup is None else args.warmup,
        min_repeats=base.min_repeats if args.min_repeats is None else args.min_repeats,
        max_repeats=base.max_repeats if args.max_repeats is None else args.max_repeats,
        target_s=base.target_s if args.target_seconds is None else args.target_seconds,
    )


# --------------------------------------------------------------------------- environment


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git() -> dict:
    def git(*cmd):
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *cmd], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        commit, status = None, None
    return {"commit": commit or "unknown", "dirty": bool(status) if status is not None else None}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def environment(device: torch.device) -> dict:
    """Device, versions and git commit of this run."""
    import fastsparse

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info = {
            "type": "cuda",
            "name": props.name,
            "slug": _slug(props.name),
            "capability": f"{props.major}.{props.minor}",
            "memory_bytes": props.total_memory,
            "cuda": torch.version.cuda,
        }
    else:
        info = {"type": "cpu", "name": _cpu_model(), "slug": "cpu"}
    info["threads"] = torch.get_num_threads()
    info["cpu_count"] = os.cpu_count()
    info["load_before"] = load_average()
    return {
        "device": info,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "fastsparse": fastsparse.__version__,
            "torch_pruning": _version("torch-pruning"),
            "numpy": _version("numpy"),
            "platform": platform.platform(),
        },
        "git": _git(),
    }


# --------------------------------------------------------------------------- command line


def _parse_groups(text: str):
    names = [None if g in ("none", "None", "") else g for g in text.split(",")]
    return names[0] if len(names) == 1 else tuple(names)


def _groups_text(groups) -> str:
    groupings = groups if isinstance(groups, tuple) else (groups,)
    return ",".join("none" if g is None else g for g in groupings)


def parser() -> argparse.ArgumentParser:
    """The command line of `python -m benchmarks.run` and `fastsparse bench`."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmark fastsparse against the oracle, torch.compile, hand-written "
        "PyTorch and Torch-Pruning; write JSON, CSV, markdown and plots.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    p.add_argument(
        "--profile",
        choices=PROFILES,
        help='workload sizes: "full" (default on cuda), "cpu" (default on cpu), "quick"',
    )
    p.add_argument("--quick", action="store_true", help="same as --profile quick (CI smoke)")
    p.add_argument("--full", action="store_true", help="same as --profile full")
    p.add_argument("--workloads", nargs="+", metavar="PATTERN", help="labels containing any")
    p.add_argument("--providers", nargs="+", choices=PROVIDER_NAMES, metavar="NAME")
    p.add_argument("--modes", nargs="+", choices=tuple(MODES), metavar="MODE")
    p.add_argument("--kind", default="l1l2", choices=KINDS)
    p.add_argument("--groups", default="filters", type=_parse_groups, help='e.g. "filters"')
    p.add_argument("--alpha", type=float, default=0.5, help="sparse_group_lasso's alpha")
    p.add_argument("--strength", type=float, default=1e-4, help="in-place gradient scale")
    p.add_argument("--llama-layers", type=int, help="Llama-7B layers (default: what fits)")
    p.add_argument(
        "--step-optimizer",
        choices=tuple(STEP_LRS),
        default="sgd",
        help="the prox_step mode's optimizer (SGD with momentum, or AdamW)",
    )
    p.add_argument(
        "--llama-dtype",
        choices=("bf16", "fp32"),
        default="bf16",
        help="the Llama stack's weights: bf16 with fp32 gradients, or fp32 (prox_step)",
    )
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--warmup", type=int)
    p.add_argument("--min-repeats", type=int)
    p.add_argument("--max-repeats", type=int)
    p.add_argument("--target-seconds", type=float, help="timed seconds per case (approx.)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--tag", help="appended to the output file names")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help="start no case after this many seconds (the rest is recorded as skipped)",
    )
    p.add_argument(
        "--allow-interpreter",
        action="store_true",
        help="run the Triton provider on CPU under TRITON_INTERPRET=1 (slow; smoke tests)",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 if a provider failed")
    p.add_argument("--list", action="store_true", help="list workloads, providers and modes")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args.argv = argv
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser().error("--device cuda: CUDA is not available here")
    if sum([args.quick, args.full, args.profile is not None]) > 1:
        parser().error("choose one of --quick, --full and --profile")
    if args.quick:
        args.profile = "quick"
    elif args.full:
        args.profile = "full"
    elif args.profile is None:
        args.profile = "full" if args.device == "cuda" else "cpu"
    return args


def output_stem(run: dict, tag: Optional[str] = None) -> str:
    """<device>-<date>, plus the profile when it is not the device's default, plus the tag."""
    device = run["device"]
    stem = f"{device['slug']}-{run['date']}"
    default = "full" if device["type"] == "cuda" else "cpu"
    if run["config"]["profile"] != default:
        stem += f"-{run['config']['profile']}"
    return f"{stem}-{_slug(tag)}" if tag else stem


def partial_stem(args: argparse.Namespace) -> str:
    """Name of the checkpoint a running harness keeps (removed when the run completes)."""
    return f"running-{args.device}-{args.profile}" + (f"-{_slug(args.tag)}" if args.tag else "")


def write_outputs(run: dict, out_dir: Path, tag: Optional[str] = None, plots: bool = True):
    """Write <stem>.json, <stem>.md, <stem>-*.png and append results.csv; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(run, tag)
    files = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md"}
    files["csv"] = report.append_csv(run, out_dir / "results.csv")
    if plots:
        try:
            files.update(report.write_plots(run, out_dir, stem))
        except Exception as error:  # plots are a convenience; the data is in the JSON
            run["plots_error"] = _short(error)
    run["files"] = {k: Path(v).name for k, v in files.items()}
    files["markdown"].write_text(report.markdown(run))
    files["json"].write_text(json.dumps(run, indent=1) + "\n")
    return files


def list_everything(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    for profile in PROFILES:
        print(f"profile {profile}:")
        for w in profile_workloads(profile, device, args.llama_layers, _llama_dtype(args)):
            print(f"  {w.label:<28} {w.numel:>13,} elements in {len(w.shapes)} tensor(s)")
    print("providers:")
    for p in all_providers():
        print(f"  {p.name:<22} {p.role:<10} {p.description}")
    print("modes:")
    for m in MODES.values():
        print(f"  {m.name:<12} bytes {m.bytes_model:<13} {m.description}")


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of `python -m benchmarks.run` and `fastsparse bench`; returns the exit code."""
    args = parse_args(argv)
    if args.list:
        list_everything(args)
        return 0
    partial = args.out_dir / f"{partial_stem(args)}.partial.json"

    def checkpoint(run):
        args.out_dir.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(run, indent=1) + "\n")

    run = run_benchmarks(args, checkpoint=checkpoint)
    files = write_outputs(run, args.out_dir, args.tag, plots=not args.no_plots)
    partial.unlink(missing_ok=True)
    print()
    print(report.summary(run))
    for name, path in files.items():
        print(f"wrote {name}: {path}")
    failed = [r for r in run["results"] if r["status"] == "failed"]
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
