"""Sparse training, thresholding and pruning: the workflow behind ``fastsparse demo/train/study``.

One run (:func:`run`) is::

    data  = load_dataset(...)                          # bundled MNIST subset by default
    model = get_model(...)                             # LeNet-5 by default
    reg   = make_regularizer(model, x, kind, strength) # the prunable layers' weights, per filter
    train(model, data, config, reg)                    # SGD, strength warm-up, optional AMP
    result = threshold_and_prune(model, x, threshold)  # zero weak filters' coupled groups, prune

Thresholding rule: a filter (one output row of a prunable conv or linear layer) is *weak* when the
l2 norm of its weights is <= ``threshold`` times the largest filter norm of its layer
(``threshold_mode="relative"``, the default, comparable across penalties of any scale) or <=
``threshold`` (``"absolute"``). The whole coupled group of a weak filter (its weights and bias,
the next layer's input slice, a following BatchNorm) is set to zero, and
:func:`fastsparse.prune` then removes the zero groups; the pruned model computes exactly what the
thresholded model computes, so its accuracy is the accuracy after thresholding.

On the CPU, training runs with denormal floats flushed to zero (:func:`flush_denormals`): the
sparsity penalties drive many weights towards zero, and arithmetic on denormals made LeNet-5
epochs up to 4x slower on the machines we measured.

Example::

    >>> from fastsparse.workflow.train import RunConfig, run
    >>> result = run(RunConfig(kind="group_l1l2", epochs=1, train_samples=256))  # doctest: +SKIP
    >>> result.accuracy_after, result.report.macs_after                         # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastsparse.pruning.common import unwrap
from fastsparse.pruning.threshold import PruneResult, prunable_weights, threshold_and_prune
from fastsparse.workflow.config import (
    DEFAULT_LRS,
    DEFAULT_STRENGTHS,
    MODES,
    SCHEDULES,
    ConfigError,
    RunConfig,
)
from fastsparse.workflow.datasets import Dataset, load_dataset
from fastsparse.workflow.models import get_model

__all__ = [
    "DEFAULT_LRS",
    "DEFAULT_STRENGTHS",
    "MODES",
    "SCHEDULES",
    "ConfigError",
    "ProgressBar",
    "PruneResult",
    "RunConfig",
    "RunResult",
    "TrainStats",
    "best_fused_backend",
    "evaluate",
    "flush_denormals",
    "check_method",
    "make_method",
    "make_regularizer",
    "measure_inference",
    "prunable_weights",
    "regularizer_cost",
    "run",
    "scheduled_strength",
    "seed_everything",
    "threshold_and_prune",
    "train",
    "unwrap",
]

# --------------------------------------------------------------------------- small utilities


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (CPU and CUDA)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def flush_denormals(device: torch.device):
    """On the CPU, flush denormal floats to zero inside the block (off again afterwards)."""
    enabled = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if enabled:
            torch.set_flush_denormal(False)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median(values: Sequence[float]) -> float:
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
    return [_median(t) for t in times], [spread(t) for t in times]


def scheduled_strength(strength: float, schedule: str, progress: float, warmup: float) -> float:
    """The strength at `progress` (fraction of the training steps done, in [0, 1]).

    ``"constant"``: `strength` throughout. ``"linear"``/``"cosine"``: ramps from 0 to `strength`
    over the first `warmup` fraction of the steps (linearly, or along a half cosine), then stays.

    >>> scheduled_strength(1e-3, "linear", 0.1, 0.2)
    0.0005
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if schedule == "constant" or warmup <= 0:
        return strength
    ramp = min(1.0, max(0.0, progress) / warmup)
    if schedule == "linear":
        return strength * ramp
    return strength * 0.5 * (1.0 - math.cos(math.pi * ramp))


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


# --------------------------------------------------------------------------- regularizer


def make_regularizer(
    model: nn.Module,
    example_inputs: Any,
    kind: str,
    strength: float,
    *,
    groups: Any = "filters",
    regularize: str = "prunable",
    backend: str = "auto",
    alpha: Optional[float] = None,
):
    """A :class:`fastsparse.Regularizer` over the prunable layers' weights (or all of them).

    The classifier is left out by default: a group penalty across its rows would push whole
    classes to zero, and its outputs cannot be pruned anyway.
    """
    from fastsparse.core.groups import default_parameters
    from fastsparse.methods.regularizer import Regularizer

    if regularize == "prunable":
        params = [w for _, w in prunable_weights(model, example_inputs)]
    else:
        params = default_parameters(unwrap(model), include_output=True)
    options = {} if alpha is None else {"alpha": alpha}
    return Regularizer(params, kind, strength, groups=groups, backend=backend, **options)


# Methods whose builders take inplace=True (the in-place gradient instead of a loss term).
_INPLACE_METHODS = ("oicsr", "slimming")


def make_method(model: nn.Module, example_inputs: Any, config: RunConfig):
    """The config's method (:func:`fastsparse.methods.build_method`), or None for a penalty.

    The config's backend, and ``mode == "inplace"`` for the methods that have it, are passed
    on unless ``config.method_options`` sets them. A method that cannot apply to the model
    (feature flow without same-shape feature maps, slimming without BatchNorm) raises
    :class:`ConfigError` naming the model.
    """
    from fastsparse.methods import build_method

    if config.method is None:
        return None
    options = {"backend": config.backend, **config.method_options}
    if config.method in _INPLACE_METHODS and config.mode == "inplace":
        options.setdefault("inplace", True)
    try:
        return build_method(
            config.method, model, example_inputs, config.resolved_strength, **options
        )
    except TypeError as e:  # an option the method does not take
        raise ConfigError(f"method {config.method!r}: {e}") from e
    except ValueError as e:
        raise ConfigError(f"method {config.method!r} on model {config.model!r}: {e}") from e


def check_method(config: RunConfig, data: Dataset) -> None:
    """Raise ConfigError now if the config's method cannot run on its model (cheap, no data)."""
    if config.method is None:
        return
    model = build_model(config, data)
    method = make_method(model, data.test_images[:1], config)
    method.close()


def best_fused_backend(device: torch.device) -> Tuple[Optional[str], str]:
    """The fastest fused penalty backend that runs on `device`, or None and why not.

    Candidates: Triton then native on CUDA; native on the CPU (Triton's CPU interpreter is for
    tests only). Candidates that this version of fastsparse does not know are skipped.

    Returns:
        (name, "") or (None, reason).
    """
    from fastsparse.backends import BACKENDS, resolve_backend

    candidates = ("triton", "native") if device.type == "cuda" else ("native",)
    reasons = []
    for name in candidates:
        if name not in BACKENDS:
            reasons.append(f"this fastsparse has no {name!r} backend")
            continue
        try:
            return resolve_backend(name, device), ""
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
    from fastsparse.functional import add_penalty_grad_, penalty

    params = list(params)
    saved = [p.grad for p in params]
    device = params[0].device
    times = []
    try:
        for i in range(warmup + repeats):
            for p in params:
                p.grad = torch.zeros_like(p)
            _sync(device)
            start = time.perf_counter()
            if mode == "autograd":
                (1e-3 * penalty(params, kind, groups=groups, backend=backend)).backward()
            else:
                add_penalty_grad_(params, kind, 1e-3, groups=groups, backend=backend)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return _median(times)


# --------------------------------------------------------------------------- train / evaluate


@dataclass
class TrainStats:
    """What :func:`train` measured.

    Attributes:
        epochs: one dict per epoch (loss, accuracy on the training batches, penalty value,
            strength at the end of the epoch, seconds).
        steps: optimizer steps taken.
        seconds: wall time of the whole training.
        step_seconds: median wall time of one training step (timed steps only; the median
            ignores the first steps' one-time costs and other processes' interference).
        regularizer_seconds: median wall time of the regularizer's part of a step.
        share: median over the timed steps of the regularizer's share of its step (both
            measured in the same step, so a load that comes and goes cancels out).
        step_spread: p80 / p20 of the step times (about 1 on a quiet machine).
        backend: the penalty backend that ran ("" without a regularizer).
    """

    epochs: List[Dict[str, float]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    step_seconds: float = 0.0
    regularizer_seconds: float = 0.0
    share: float = 0.0
    step_spread: float = 1.0
    backend: str = ""

    @property
    def regularizer_share(self) -> float:
        """The regularizer's share of a training step, in [0, 1]."""
        return self.share


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def train(
    model: nn.Module,
    data: Dataset,
    config: RunConfig,
    regularizer=None,
    *,
    method=None,
    progress: bool = True,
    stream: Optional[TextIO] = None,
    on_epoch_end: Optional[Callable[[int, nn.Module, torch.optim.Optimizer], None]] = None,
    checkpoint: Optional[Callable[[dict], None]] = None,
    checkpoint_every: Optional[int] = None,
    resume: Optional[dict] = None,
) -> TrainStats:
    """Train `model` in place with SGD and cross-entropy (plus `regularizer`, if given).

    `model` may be ``torch.compile``'d and must already be on the config's device. The
    regularizer's strength follows ``config.schedule`` up to its initial ``strength``; it runs
    through autograd (``config.mode == "autograd"``: the penalty's own backward, which is the
    same as adding it to the loss) or in place (``reg.apply_()`` after the loss's backward). Its
    time is measured separately in every step (every 10th step on CUDA, with synchronization).

    Args:
        model: the network (in training mode afterwards).
        data: the data set; ``config.train_samples`` limits the images used.
        config: the run's settings (epochs, batch_size, lr, momentum, weight_decay, lr_schedule,
            schedule, warmup, mode, amp, seed).
        regularizer: a :class:`fastsparse.Regularizer`, or None.
        method: a :class:`fastsparse.methods.Method` (instead of a regularizer), or None: its
            ``loss()`` is added to the loss (one backward for both), ``before_step()`` and
            ``after_step()`` run around the optimizer step, ``end_epoch()`` gets the epoch's
            training accuracy. Its strength is not scheduled. Its measured time covers
            ``loss()`` and the step hooks, not its share of the backward.
        progress: draw a progress bar per epoch on `stream` (stderr by default).
        on_epoch_end: called as ``on_epoch_end(epoch, model, optimizer)`` after each epoch.
        checkpoint: called with the training state (a dict for ``torch.save``) after every
            epoch and, with `checkpoint_every`, every that many optimizer steps.
        resume: a state `checkpoint` was given: training continues from it exactly (weights,
            optimizer and AMP state, data order, random state, the records so far), so the
            final weights equal those of an uninterrupted run. Not with a `method`, whose own
            state (masks, schedules) is not saved.

    Returns:
        A :class:`TrainStats`.
    """
    device = next(unwrap(model).parameters()).device
    images, labels = data.train_images, data.train_labels
    if config.train_samples is not None:
        images, labels = images[: config.train_samples], labels[: config.train_samples]
    images, labels = images.to(device), labels.to(device)
    n = len(labels)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer = torch.optim.SGD(
        unwrap(model).parameters(),
        lr=config.resolved_lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    use_scaler = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    target_strength = regularizer.strength if regularizer is not None else 0.0
    generator = torch.Generator().manual_seed(config.seed)
    timing_every = 10 if device.type == "cuda" else 1
    stats = TrainStats()
    if regularizer is not None and method is not None:
        raise ValueError("give a regularizer or a method, not both")
    if resume is not None and method is not None:
        raise ValueError(f"resuming a run of method {method.name!r} is not supported")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    first_epoch, first_step = 0, 0
    if resume is not None:
        unwrap(model).load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if scaler is not None and resume.get("scaler") is not None:
            scaler.load_state_dict(resume["scaler"])
        first_epoch, first_step = resume["epoch"], resume["step_in_epoch"]
        generator.set_state(resume["generator"])
        torch.set_rng_state(resume["rng"])
        stats.epochs = list(resume["epochs"])
    if regularizer is not None:
        from fastsparse.backends import resolve_backend

        stats.backend = resolve_backend(regularizer.backend, device)
    if method is not None:
        stats.backend = config.backend  # as configured: the methods pick their own kernels
    step_times: List[float] = []
    reg_times: List[float] = []
    model.train()
    start = time.perf_counter()

    def state(epoch: int, step_in_epoch: int, epoch_generator, loss_sum, correct) -> dict:
        return {
            "format": 1,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "generator": epoch_generator,
            "rng": torch.get_rng_state(),
            # Copies: the live tensors change at the next step, the state must not.
            "model": {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()},
            "optimizer": copy.deepcopy(optimizer.state_dict()),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epochs": list(stats.epochs),
            "loss_sum": loss_sum.detach().cpu(),
            "correct": correct.detach().cpu(),
            "config": config.to_dict(),
        }

    with flush_denormals(device):
        for epoch in range(first_epoch, config.epochs):
            bar = ProgressBar(steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}", stream)
            epoch_start = time.perf_counter()
            epoch_generator = generator.get_state()  # to redraw this epoch's order on resume
            order = torch.randperm(n, generator=generator).to(device)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.int64)
            start_step = 0
            if resume is not None and epoch == first_epoch:
                start_step = first_step
                loss_sum += resume["loss_sum"].to(device)
                correct += resume["correct"].to(device)
                torch.set_rng_state(resume["rng"])
            for i in range(start_step, steps_per_epoch):
                step = epoch * steps_per_epoch + i
                fraction = step / total_steps
                if config.lr_schedule == "cosine":
                    for group in optimizer.param_groups:
                        group["lr"] = (
                            config.resolved_lr * 0.5 * (1.0 + math.cos(math.pi * fraction))
                        )
                timing = step % timing_every == 0
                if timing:
                    _sync(device)
                    t0 = time.perf_counter()
                index = order[i * config.batch_size : (i + 1) * config.batch_size]
                x, y = images[index], labels[index]
                with _autocast(device, config.amp):
                    out = model(x)
                    loss = F.cross_entropy(out.float(), y)
                optimizer.zero_grad(set_to_none=True)
                objective = loss
                if method is not None:
                    if timing:
                        _sync(device)
                    t1 = time.perf_counter()
                    method_term = method.loss()
                    if timing:
                        _sync(device)
                    method_seconds = time.perf_counter() - t1
                    objective = loss + method_term
                (scaler.scale(objective) if scaler else objective).backward()
                if regularizer is not None:
                    regularizer.strength = scheduled_strength(
                        target_strength, config.schedule, fraction, config.warmup
                    )
                    if timing:
                        _sync(device)
                        t1 = time.perf_counter()
                    if config.mode == "autograd":
                        term = regularizer()
                        (scaler.scale(term) if scaler else term).backward()
                    else:
                        if scaler:
                            scaler.unscale_(optimizer)
                        regularizer.apply_()
                    if timing:
                        _sync(device)
                        reg_times.append(time.perf_counter() - t1)
                if method is not None:
                    if timing:
                        _sync(device)
                    t1 = time.perf_counter()
                    if scaler:
                        scaler.unscale_(optimizer)
                    method.before_step()
                    method_seconds += time.perf_counter() - t1
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                if method is not None:
                    t1 = time.perf_counter()
                    method.after_step()
                    if timing:
                        _sync(device)
                        reg_times.append(method_seconds + time.perf_counter() - t1)
                if timing:
                    _sync(device)
                    step_times.append(time.perf_counter() - t0)
                loss_sum += loss.detach() * len(y)
                correct += (out.detach().argmax(1) == y).sum()
                # Every `checkpoint_every` steps; the epoch's end saves its own checkpoint.
                due = checkpoint_every is not None and (step + 1) % checkpoint_every == 0
                if checkpoint is not None and due and i + 1 < steps_per_epoch:
                    checkpoint(state(epoch, i + 1, epoch_generator, loss_sum, correct))
                if progress and (i % 10 == 0 or i == steps_per_epoch - 1):
                    bar.update(i + 1 - bar.count, f"loss {loss.item():.3f}")
            record = {
                "epoch": epoch + 1,
                "loss": loss_sum.item() / n,
                "train_accuracy": correct.item() / n,
                "seconds": time.perf_counter() - epoch_start,
            }
            if regularizer is not None:
                record["penalty"] = regularizer.value().item()
                record["strength"] = regularizer.strength
            if method is not None:
                record["penalty"] = float(method_term.detach())  # the last step's term
                method.end_epoch(metric=record["train_accuracy"])
            stats.epochs.append(record)
            if progress:
                text = f"loss {record['loss']:.3f}  train acc {100 * record['train_accuracy']:.1f}%"
                if "penalty" in record:
                    text += f"  penalty {record['penalty']:.4g}"
                bar.close(text)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, model, optimizer)
            if checkpoint is not None:
                zero = torch.zeros((), device=device)
                checkpoint(state(epoch + 1, 0, generator.get_state(), zero, zero.long()))
    if regularizer is not None:
        regularizer.strength = target_strength
    stats.steps = total_steps
    stats.seconds = time.perf_counter() - start
    stats.step_seconds = _median(step_times)
    stats.regularizer_seconds = _median(reg_times)
    stats.share = _median([r / t for r, t in zip(reg_times, step_times) if t > 0])
    stats.step_spread = spread(step_times)
    return stats


@torch.no_grad()
def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000
) -> float:
    """Top-1 accuracy (in [0, 1]) of `model` in eval mode; its training flag is restored."""
    was_training = model.training
    device = next(unwrap(model).parameters()).device
    model.eval()
    correct = 0
    try:
        with flush_denormals(device):
            for i in range(0, len(labels), batch_size):
                x = images[i : i + batch_size].to(device)
                y = labels[i : i + batch_size].to(device)
                correct += int((model(x).argmax(1) == y).sum())
    finally:
        model.train(was_training)
    return correct / max(len(labels), 1)


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
            _sync(device)

        return call

    try:
        for m, _ in modes:
            m.eval()
        with torch.no_grad(), flush_denormals(device):
            return interleaved_medians([classify(m) for m in models], repeats)
    finally:
        for m, training in modes:
            m.train(training)


# --------------------------------------------------------------------------- a whole run


@dataclass
class RunResult:
    """Everything :func:`run` measured, and the models it made."""

    config: RunConfig
    model: nn.Module
    pruned: nn.Module
    prune: PruneResult
    train: TrainStats
    accuracy_before: float
    accuracy_after: float
    inference_before: float
    inference_after: float
    device: str
    timing_spread: float = 1.0  # p80/p20 of the repeated timings (> ~1.2: a busy machine)

    @property
    def report(self):
        """The sparsity report (filters, parameters, MACs before and after)."""
        return self.prune.report

    def summary(self) -> Dict[str, Any]:
        """One flat row of numbers (the study's CSV row)."""
        report = self.report
        conv = [layer for layer in report.layers if "Conv" in layer.type and layer.prunable]
        conv_total = sum(layer.filters for layer in conv)
        conv_after = sum(layer.filters_after for layer in conv)
        row = {
            "kind": self.config.kind if self.config.regularized else "none",
            "strength": self.config.resolved_strength,
            "threshold": self.config.threshold,
            "accuracy_before": round(100 * self.accuracy_before, 2),
            "accuracy_after": round(100 * self.accuracy_after, 2),
            "conv_filters_removed_pct": round(100 * (1 - conv_after / conv_total), 2)
            if conv_total
            else 0.0,
            "params_removed_pct": round(100 * (1 - report.params_after / report.params), 2),
            "flops_removed_pct": round(100 * (1 - report.macs_after / report.macs), 2),
            "params_after": report.params_after,
            "macs_after": report.macs_after,
        }
        for name, (kept, total) in self.prune.kept.items():
            row[f"kept[{name}]"] = f"{kept}/{total}"
        row.update(
            {
                "inference_ms_before": round(1000 * self.inference_before, 2),
                "inference_ms_after": round(1000 * self.inference_after, 2),
                "timing_spread": round(self.timing_spread, 3),
                "train_seconds": round(self.train.seconds, 1),
                "step_ms": round(1000 * self.train.step_seconds, 3),
                "regularizer_ms": round(1000 * self.train.regularizer_seconds, 3),
                "regularizer_share_pct": round(100 * self.train.regularizer_share, 2),
                "backend": self.train.backend,
            }
        )
        return row


def load_data(config: RunConfig) -> Dataset:
    """The config's data set (ConfigError for a missing or corrupt one), test split limited."""
    try:
        data = load_dataset(config.dataset, config.data_dir, normalize=config.normalize)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from e
    if config.test_samples is not None:
        data = dataclasses.replace(
            data,
            test_images=data.test_images[: config.test_samples],
            test_labels=data.test_labels[: config.test_samples],
        )
    return data


def build_model(config: RunConfig, data: Dataset) -> nn.Module:
    """A freshly initialized model for the data set (seeded by the caller)."""
    kwargs = {}
    if config.model == "lenet5":
        kwargs["image_size"] = data.image_shape[-1]
    return get_model(config.model, data.num_classes, in_channels=data.in_channels, **kwargs)


def run(
    config: RunConfig,
    *,
    data: Optional[Dataset] = None,
    progress: bool = True,
    stream: Optional[TextIO] = None,
    on_epoch_end: Optional[Callable] = None,
    inference_repeats: int = 10,
    checkpoint: Optional[Callable[[dict], None]] = None,
    checkpoint_every: Optional[int] = None,
    resume: Optional[dict] = None,
) -> RunResult:
    """Validate, load, build, train, evaluate, threshold, prune and measure: one whole run.

    Args:
        config: the settings (validated first: errors come before anything is loaded).
        data: an already loaded data set (the study loads it once), else ``load_data(config)``.
        progress, stream, on_epoch_end, checkpoint, checkpoint_every, resume: passed to
            :func:`train` (a resumed run is rebuilt from the same config and seed first).
        inference_repeats: timing repetitions of the inference measurement.
    """
    config.validate()
    if data is None:
        data = load_data(config)
    device = resolve_device(config.device)
    seed_everything(config.seed)
    model = build_model(config, data).to(device)
    example = data.test_images[:1].to(device)
    regularizer = None
    if config.penalty_kind is not None:
        regularizer = make_regularizer(
            model,
            example,
            config.penalty_kind,
            config.resolved_strength,
            groups=config.groups,
            regularize=config.regularize,
            backend=config.backend,
            alpha=config.alpha,
        )
    method = make_method(model, example, config)
    trained = model
    if config.compile:
        backend = config.compile if isinstance(config.compile, str) else "inductor"
        trained = torch.compile(model, backend=backend)
    try:
        stats = train(
            trained,
            data,
            config,
            regularizer,
            method=method,
            progress=progress,
            stream=stream,
            on_epoch_end=on_epoch_end,
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
            resume=resume,
        )
    finally:
        if method is not None:
            method.close()  # hooks off before the model is copied, thresholded and pruned
    accuracy_before = evaluate(model, data.test_images, data.test_labels)
    result = threshold_and_prune(
        model, example, config.threshold, config.threshold_mode, config.prune_criterion
    )
    accuracy_after = evaluate(result.pruned, data.test_images, data.test_labels)
    bench_images = data.test_images[:2000]
    before, after, timing_spread = measure_inference_pair(
        model, result.pruned, bench_images, repeats=inference_repeats
    )
    return RunResult(
        config=config,
        model=model,
        pruned=result.pruned,
        prune=result,
        train=stats,
        accuracy_before=accuracy_before,
        accuracy_after=accuracy_after,
        inference_before=before,
        inference_after=after,
        timing_spread=max(timing_spread, stats.step_spread),
        device=str(device),
    )
