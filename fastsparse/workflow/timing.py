"""Timing for the workflow: synchronized clocks, medians and spreads of repeated timings,
calls timed in turn (`interleaved_medians`), the regularizer's cost per step, inference time and
the progress bar.

On the CPU, training and inference run with denormal floats flushed to zero
(:func:`flush_denormals`): the sparsity penalties drive many weights towards zero, and arithmetic
on denormals made LeNet-5 epochs up to 4x slower on the machines we measured.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Callable, List, Optional, Sequence, TextIO, Tuple

import torch
from torch import nn

from fastsparse import backends
from fastsparse.functional import add_penalty_grad_, penalty
from fastsparse.pruning.common import unwrap

__all__ = [
    "ProgressBar",
    "best_fused_backend",
    "flush_denormals",
    "interleaved_medians",
    "measure_inference",
    "measure_inference_pair",
    "median",
    "regularizer_cost",
    "spread",
    "sync",
]


@contextlib.contextmanager
def flush_denormals(device: torch.device):
    """On the CPU, flush denormal floats to zero inside the block (off again afterwards)."""
    enabled = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if enabled:
            torch.set_flush_denormal(False)


def sync(device: torch.device) -> None:
    """Wait for `device`'s queued work (CUDA; nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: Sequence[float]) -> float:
    """The median of repeated timings (the upper one of an even count; 0 for none)."""
    return sorted(values)[len(values) // 2] if values else 0.0


def spread(values: Sequence[float]) -> float:
    """p80 / p20 of repeated timings: about 1 on a quiet machine, more when it is busy."""
    if len(values) < 5:
        return 1.0
    ordered = sorted(values)
    low, high = ordered[len(ordered) // 5], ordered[(4 * len(ordered)) // 5]
    return high / low if low > 0 else 1.0


def interleaved_medians(calls: Sequence[Callable[[], None]], repeats: int, warmup: int = 1):
    """(median seconds per call, spread per call), the calls timed in turn, round after round:
    a load that comes and goes slows them alike, so their ratios stay fair."""
    times: List[List[float]] = [[] for _ in calls]
    for r in range(warmup + repeats):
        for k, call in enumerate(calls):
            start = time.perf_counter()
            call()
            if r >= warmup:
                times[k].append(time.perf_counter() - start)
    return [median(t) for t in times], [spread(t) for t in times]


class ProgressBar:
    """A minimal progress bar: ``[#####.....] 63/125 loss 0.41`` redrawn on one line.

    On a terminal the line is redrawn at most 10 times a second; otherwise (a file, a pipe, a test)
    only the final state is written, once, when :meth:`close` is called.
    """

    def __init__(
        self, total: int, desc: str = "", stream: Optional[TextIO] = None, width: int = 24
    ):
        self.total = max(int(total), 1)
        self.desc = desc
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.count = 0
        self.info = ""
        self._last = 0.0
        self._shown = 0  # length of the line on screen, to blank out leftovers
        self._start = time.perf_counter()
        self._live = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, n: int = 1, info: str = "") -> None:
        """Advance by `n` steps; `info` is shown after the counter."""
        self.count = min(self.total, self.count + n)
        if info:
            self.info = info
        now = time.perf_counter()
        if self._live and (now - self._last >= 0.1 or self.count == self.total):
            self._last = now
            self._redraw()

    def _redraw(self, end: str = "") -> None:
        line = self._line()
        self.stream.write("\r" + line.ljust(self._shown) + end)
        self.stream.flush()
        self._shown = len(line)

    def _line(self) -> str:
        filled = round(self.width * self.count / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.perf_counter() - self._start
        return f"{self.desc} [{bar}] {self.count}/{self.total} {elapsed:5.1f}s {self.info}".rstrip()

    def close(self, info: str = "") -> None:
        """Write the final line and a newline."""
        if info:
            self.info = info
        if self._live:
            self._redraw("\n")
        else:
            self.stream.write(self._line() + "\n")
            self.stream.flush()


def best_fused_backend(device: torch.device) -> Tuple[Optional[str], str]:
    """The fastest fused penalty backend that runs on `device`, or None and why not.

    Candidates: Triton then native on CUDA; native on the CPU (Triton's CPU interpreter is for
    tests only). Candidates that this version of fastsparse does not know are skipped.

    Returns:
        (name, "") or (None, reason).
    """
    candidates = ("triton", "native") if device.type == "cuda" else ("native",)
    reasons = []
    for name in candidates:
        if name not in backends.BACKENDS:
            reasons.append(f"this fastsparse has no {name!r} backend")
            continue
        try:
            return backends.resolve_backend(name, device), ""
        except (RuntimeError, ImportError, OSError) as e:
            reasons.append(str(e))
    return None, "; ".join(reasons)


def regularizer_cost(
    params: Sequence[torch.Tensor],
    kind: str,
    *,
    groups: Any = "filters",
    backend: str = "auto",
    mode: str = "autograd",
    repeats: int = 50,
    warmup: int = 5,
) -> float:
    """Median seconds of one regularizer step on `params` (gradients land in ``.grad``).

    ``"autograd"``: ``penalty(params).backward()``; ``"inplace"``: ``add_penalty_grad_``. The
    parameters' ``.grad`` are restored afterwards.
    """
    params = list(params)
    saved = [p.grad for p in params]
    device = params[0].device
    times = []
    try:
        for i in range(warmup + repeats):
            for p in params:
                p.grad = torch.zeros_like(p)
            sync(device)
            start = time.perf_counter()
            if mode == "autograd":
                (1e-3 * penalty(params, kind, groups=groups, backend=backend)).backward()
            else:
                add_penalty_grad_(params, kind, 1e-3, groups=groups, backend=backend)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return median(times)


@torch.no_grad()
def measure_inference(
    model: nn.Module, images: torch.Tensor, batch_size: int = 500, repeats: int = 10
) -> float:
    """Median seconds to classify all of `images` in batches (eval mode, no grad, after one
    warm-up)."""
    (median,), _ = _time_inference([model], images, repeats, batch_size)
    return median


def measure_inference_pair(
    model_a: nn.Module, model_b: nn.Module, images: torch.Tensor, repeats: int = 10,
    batch_size: int = 500,
) -> Tuple[float, float, float]:  # fmt: skip
    """(median seconds of a, of b, spread): both classify `images`, timed in turn (eval mode)."""
    (a, b), spreads = _time_inference([model_a, model_b], images, repeats, batch_size)
    return a, b, max(spreads)


def _time_inference(models, images, repeats: int, batch_size: int):
    """interleaved_medians of each model classifying `images` in batches: eval mode, no grad,
    training flags restored."""
    device = next(unwrap(models[0]).parameters()).device
    images = images.to(device)
    modes = [(m, m.training) for m in models]

    def classify(model):
        def call():
            for j in range(0, len(images), batch_size):
                model(images[j : j + batch_size])
            sync(device)

        return call

    try:
        for m, _ in modes:
            m.eval()
        with torch.no_grad(), flush_denormals(device):
            return interleaved_medians([classify(m) for m in models], repeats)
    finally:
        for m, training in modes:
            m.train(training)
