"""The training loop of a run (:func:`train`) and its evaluation (:func:`evaluate`).

The loop drives any sparsity object through the step protocol (`fastsparse.core.step.StepHooks`):
a `fastsparse.Regularizer` (in place: ``apply_()`` before each step), an :class:`AutogradPenalty`
(the same penalty through autograd), a method of `fastsparse.methods` (its ``loss()`` in the
loss, its hooks around the step) or a `fastsparse.optim.Sparsifier` (rules around the step).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, TextIO

import torch
import torch.nn.functional as F
from torch import nn

from fastsparse.backends import resolve_backend
from fastsparse.core.step import StepHooks
from fastsparse.methods.regularizer import Regularizer
from fastsparse.pruning.common import unwrap
from fastsparse.workflow.config import SCHEDULES, RunConfig
from fastsparse.workflow.datasets import Dataset
from fastsparse.workflow.timing import ProgressBar, flush_denormals, median, spread, sync

__all__ = ["AutogradPenalty", "TrainStats", "evaluate", "scheduled_strength", "train"]


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


class AutogradPenalty(StepHooks):
    """A `fastsparse.Regularizer` on the autograd path: before each step, the penalty's own
    backward adds strength * dR/dW to the gradients (the same as ``loss + reg()``, and timed
    apart from the model's backward). A plain Regularizer is the in-place path (``apply_()``).

    Args:
        reg: the regularizer; ``strength``, ``backend`` and ``value()`` are its own.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())
        >>> hooks = AutogradPenalty(Regularizer(model, "l1l2", 1e-3))
        >>> model(torch.randn(2, 1, 5, 5)).sum().backward()
        >>> hooks.before_step()  # the penalty's gradient is in model[0].weight.grad now
    """

    def __init__(self, reg: Regularizer):
        self.reg = reg

    @property
    def strength(self) -> float:
        return self.reg.strength

    @strength.setter
    def strength(self, value: float) -> None:
        self.reg.strength = value

    @property
    def backend(self):
        return self.reg.backend

    def value(self) -> torch.Tensor:
        """R without gradient tracking (for logging)."""
        return self.reg.value()

    def before_step(self) -> None:
        with torch.enable_grad():
            self.reg().backward()


def train(
    model: nn.Module,
    data: Dataset,
    config: RunConfig,
    sparsity: Optional[StepHooks] = None,
    *,
    optimizer: Optional[torch.optim.Optimizer] = None,
    progress: bool = True,
    stream: Optional[TextIO] = None,
    on_epoch_end: Optional[Callable[[int, nn.Module, torch.optim.Optimizer], None]] = None,
    checkpoint: Optional[Callable[[dict], None]] = None,
    checkpoint_every: Optional[int] = None,
    resume: Optional[dict] = None,
) -> TrainStats:
    """Train `model` in place with cross-entropy, driving `sparsity` through the step protocol.

    `model` may be ``torch.compile``'d and must already be on the config's device. Every step:
    forward, backward (of the loss plus ``sparsity.loss()`` where it has one: a method's term,
    one backward for both), AMP unscaling, ``sparsity.before_step()``, the optimizer step,
    ``sparsity.after_step()``; every epoch ``sparsity.end_epoch(metric=training accuracy)``.
    Where the object has a ``strength`` (a penalty), it follows ``config.schedule`` up to its
    initial value. The time of ``loss()`` and the hooks is measured in every step (every 10th
    step on CUDA, with synchronization); a method's share of the backward is not in it.

    Args:
        model: the network (in training mode afterwards).
        data: the data set; ``config.train_samples`` limits the images used.
        config: the run's settings (epochs, batch_size, lr, momentum, weight_decay, lr_schedule,
            schedule, warmup, amp, seed).
        sparsity: a `StepHooks`: a :class:`fastsparse.Regularizer` (the in-place path),
            an :class:`AutogradPenalty`, a :class:`fastsparse.methods.Method`, a
            :class:`fastsparse.optim.Sparsifier` (built on `optimizer`), or None. Not closed
            here: the caller closes it when done with the model.
        optimizer: the optimizer over the model's parameters (default: SGD with the config's
            lr, momentum and weight decay); the config's cosine schedule sets its lr.
        progress: draw a progress bar per epoch on `stream` (stderr by default).
        on_epoch_end: called as ``on_epoch_end(epoch, model, optimizer)`` after each epoch.
        checkpoint: called with the training state (a dict for ``torch.save``) after every
            epoch and, with `checkpoint_every`, every that many optimizer steps.
        resume: a state `checkpoint` was given: training continues from it exactly (weights,
            optimizer and AMP state, data order, random state, the records so far), so the
            final weights equal those of an uninterrupted run. Only without sparsity or with a
            penalty, which keeps no state of its own (a method's masks and schedules, a
            sparsifier's step count are not saved).

    Returns:
        A :class:`TrainStats`.

    Example:
        >>> from fastsparse.workflow.run import build_model, load_data, make_sparsity
        >>> config = RunConfig(epochs=1, train_samples=64, device="cpu")  # doctest: +SKIP
        >>> data = load_data(config)  # doctest: +SKIP
        >>> model = build_model(config, data)  # doctest: +SKIP
        >>> hooks = make_sparsity(model, data.test_images[:1], config)  # doctest: +SKIP
        >>> stats = train(model, data, config, hooks, progress=False)  # doctest: +SKIP
    """
    device = next(unwrap(model).parameters()).device
    images, labels = data.train_images, data.train_labels
    if config.train_samples is not None:
        images, labels = images[: config.train_samples], labels[: config.train_samples]
    images, labels = images.to(device), labels.to(device)
    n = len(labels)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if optimizer is None:
        optimizer = torch.optim.SGD(
            unwrap(model).parameters(),
            lr=config.resolved_lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    use_scaler = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    hooks = StepHooks() if sparsity is None else sparsity
    loss_term = getattr(hooks, "loss", None)  # a method's term
    scheduled = hasattr(hooks, "strength")  # a penalty's strength warms up
    target_strength = hooks.strength if scheduled else 0.0
    generator = torch.Generator().manual_seed(config.seed)
    timing_every = 10 if device.type == "cuda" else 1
    stats = TrainStats()
    stateless = sparsity is None or isinstance(sparsity, (Regularizer, AutogradPenalty))
    if resume is not None and not stateless:
        name = getattr(sparsity, "name", type(sparsity).__name__)
        raise ValueError(f"resuming a run of {name!r} is not supported")
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
    if sparsity is not None:
        backend = getattr(hooks, "backend", None)
        if backend is None:  # a method picks its own kernels: the backend as configured
            stats.backend = config.backend
        else:
            stats.backend = resolve_backend(backend, device)
    step_times: List[float] = []
    hook_times: List[float] = []
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

    term = None
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
                if scheduled:
                    hooks.strength = scheduled_strength(
                        target_strength, config.schedule, fraction, config.warmup
                    )
                timing = step % timing_every == 0
                if timing:
                    sync(device)
                    t0 = time.perf_counter()
                index = order[i * config.batch_size : (i + 1) * config.batch_size]
                x, y = images[index], labels[index]
                with _autocast(device, config.amp):
                    out = model(x)
                    loss = F.cross_entropy(out.float(), y)
                optimizer.zero_grad(set_to_none=True)
                objective = loss
                hook_seconds = 0.0
                if loss_term is not None:
                    if timing:
                        sync(device)
                    t1 = time.perf_counter()
                    term = loss_term()
                    if timing:
                        sync(device)
                    hook_seconds = time.perf_counter() - t1
                    objective = loss + term
                (scaler.scale(objective) if scaler else objective).backward()
                if timing:
                    sync(device)
                t1 = time.perf_counter()
                if scaler:
                    scaler.unscale_(optimizer)
                hooks.before_step()
                if timing:
                    sync(device)
                hook_seconds += time.perf_counter() - t1
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                if timing:
                    sync(device)
                t1 = time.perf_counter()
                hooks.after_step()
                if timing:
                    sync(device)
                    if sparsity is not None:
                        hook_times.append(hook_seconds + time.perf_counter() - t1)
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
            if hasattr(hooks, "value"):  # a penalty: R at the end of the epoch
                record["penalty"] = hooks.value().item()
            elif term is not None:  # a method: the last step's term
                record["penalty"] = float(term.detach())
            if scheduled:
                record["strength"] = hooks.strength
            hooks.end_epoch(metric=record["train_accuracy"])
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
    if scheduled:
        hooks.strength = target_strength
    stats.steps = total_steps
    stats.seconds = time.perf_counter() - start
    stats.step_seconds = median(step_times)
    stats.regularizer_seconds = median(hook_times)
    stats.share = median([r / t for r, t in zip(hook_times, step_times) if t > 0])
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
