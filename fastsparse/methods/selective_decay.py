"""Selective weight decay of irrelevant weights, and iterative pruning (Bonetta, Ribero and
Cancelliere, 2022, arXiv 2204.04977, Applied Intelligence 2023).

Plain weight decay shrinks every weight. This method shrinks only the weights that are
*irrelevant* to the loss and gives the relevant ones the plain (loss-only) update; an iterative
pruning schedule then removes the weights that were driven to zero.

**Relevance** (documented choice): r = |dL/dw * w|, the first-order Taylor estimate of the change
of the loss when w is set to zero, L(w) - L(0) ~ g * w. ``relevance="magnitude"`` (|w|) and
``"gradient"`` (|g|) are the alternatives.

**Update.** After ``loss.backward()``, for every weight with relevance r <= tau:

    g <- g + lambda * w          (keep_loss_grad=True, default: an extra decay term)
    g <- lambda * w              (keep_loss_grad=False: the irrelevant weight only decays)

and g is left unchanged for the others; the optimizer step follows. This is the gradient of
lambda/2 * sum_{irrelevant} w^2 with the irrelevant set held fixed. tau is absolute
(``threshold=``) or the ``quantile=`` q of the relevances of the nonzero weights, over all tensors
(``scope="global"``) or per tensor (``scope="tensor"``); exactly floor(q * n) weights are then at
or below it (ties aside).

**Cost.** The fused Triton kernel does the update of a whole list of tensors in one in-place pass
that reads (w, g) and writes g once, with no host sync. A quantile needs a selection
(a sort of the relevances, with every count kept on the device: no host sync either);
:class:`SelectiveWeightDecay` recomputes it every ``refresh`` steps (default 1) and reuses it in
between.

API: :func:`selective_decay_` (functional, in place), :func:`relevance_thresholds`,
:class:`SelectiveWeightDecay` (the regularizer object: ``apply_()`` / ``attach(optimizer)``),
:class:`IterativePruning` (the pruning schedule) and :func:`selective_decay_regularizer` (the study
entry point).
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import nn

from fastsparse import reference
from fastsparse.core.checks import check_real
from fastsparse.functional.selective_decay import (
    Params,
    check_options,
    relevance_thresholds,
    selected_params,
    selective_decay_,
)

__all__ = ["IterativePruning", "SelectiveWeightDecay", "selective_decay_regularizer"]

# --------------------------------------------------------------------------------------------
# The regularizer object
# --------------------------------------------------------------------------------------------


class SelectiveWeightDecay:
    """Selective weight decay of a model's irrelevant weights, step after step.

    Args:
        model_or_params: an ``nn.Module`` (its Conv and Linear weights) or a list of params.
        strength: lambda (may be changed between steps).
        quantile: share of the (nonzero) weights to decay each step (default 0.5), or
        threshold: an absolute relevance threshold instead.
        relevance, scope, keep_loss_grad, backend: as in :func:`selective_decay_`.
        refresh: recompute the quantile threshold every `refresh` steps (1: every step); in
            between, the last thresholds are reused and the step is the fused pass alone.

    Use ``reg.apply_()`` after ``loss.backward()`` and before ``optimizer.step()``, or
    ``reg.attach(optimizer)`` once. ``reg.last_count`` is the number of weights decayed by the
    last step (a tensor).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> reg = SelectiveWeightDecay(model, 1e-2, quantile=0.3, backend="torch")
        >>> handle = reg.attach(opt)
        >>> model(torch.randn(4, 8)).square().mean().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        model_or_params: Params,
        strength: float,
        *,
        quantile: Optional[float] = 0.5,
        threshold: Optional[float] = None,
        relevance: str = "taylor",
        scope: str = "global",
        keep_loss_grad: bool = True,
        refresh: int = 1,
        backend: Optional[str] = "auto",
    ):
        self.params = selected_params(model_or_params)
        self.strength = check_real("strength", strength)
        if threshold is not None:
            quantile = None
            check_real("threshold", threshold, -math.inf)
        elif quantile is None:
            raise ValueError("give quantile or threshold")
        else:
            check_real("quantile", quantile, 0.0, 1.0)
        check_options(relevance, scope)
        if isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 1:
            raise ValueError(f"refresh must be an int >= 1, got {refresh!r}")
        self.quantile, self.threshold = quantile, threshold
        self.relevance, self.scope = relevance, scope
        self.keep_loss_grad, self.refresh, self.backend = keep_loss_grad, refresh, backend
        self.steps = 0
        self.thresholds: Optional[torch.Tensor] = None
        self.last_count: Optional[torch.Tensor] = None

    def apply_(self) -> torch.Tensor:
        """One selective-decay step on the current gradients; returns the count decayed."""
        if self.quantile is not None and (
            self.thresholds is None or self.steps % self.refresh == 0
        ):
            self.thresholds = relevance_thresholds(
                self.params, self.quantile, relevance=self.relevance, scope=self.scope
            )
        threshold = self.thresholds if self.quantile is not None else self.threshold
        self.last_count = selective_decay_(
            self.params,
            self.strength,
            threshold=threshold,
            relevance=self.relevance,
            keep_loss_grad=self.keep_loss_grad,
            backend=self.backend,
        )
        self.steps += 1
        return self.last_count

    def attach(self, optimizer: torch.optim.Optimizer):
        """Call apply_() before every optimizer.step(); returns the hook handle (.remove())."""

        def hook(_optimizer, _args, _kwargs):
            self.apply_()

        return optimizer.register_step_pre_hook(hook)

    def __repr__(self) -> str:
        rule = (
            f"quantile={self.quantile}"
            if self.quantile is not None
            else f"threshold={self.threshold}"
        )
        return (
            f"SelectiveWeightDecay(strength={self.strength}, {rule}, relevance={self.relevance!r}, "
            f"scope={self.scope!r}, params={len(self.params)}, backend={self.backend!r})"
        )


# --------------------------------------------------------------------------------------------
# Iterative pruning schedule
# --------------------------------------------------------------------------------------------

SCHEDULES = ("linear", "cubic")


class IterativePruning:
    """Iterative pruning: rounds of growing sparsity, with training (and selective decay) between.

    The method of Bonetta et al. removes the weights the selective decay drove to (near) zero
    in rounds, retraining in between, and stops when the model gets worse. This scheduler does
    that bookkeeping: every `interval` calls of :meth:`step` (e.g. epochs) after `start`, round
    k of `rounds` zeroes the weights of smallest `criterion` score until the pruned share of all
    the params' weights reaches target_k, with

        linear: target_k = final_sparsity * k / rounds
        cubic:  target_k = final_sparsity * (1 - (1 - k / rounds)^3)   (Zhu & Gupta, 2017)

    Pruned weights stay zero: call :meth:`apply_masks_` after every optimizer step, or
    :meth:`attach` the optimizer once (it also zeroes their gradients before the step).

    With `tolerance`, pass the validation metric (higher is better) to ``step(metric)``: if it
    falls more than `tolerance` below the best metric seen before the last round, that round is
    undone (its weights restored) and the schedule stops (``done``).

    Args:
        model_or_params: an ``nn.Module`` (its Conv and Linear weights) or params.
        final_sparsity: share of weights pruned after the last round, in [0, 1).
        rounds: number of pruning rounds (>= 1).
        interval: steps between rounds (>= 1); start: steps before the first round (>= 0).
        criterion: "magnitude" (|w|, default) or "taylor" (|g * w|, reads ``.grad``).
        scope: "global" (one ranking over all params) or "tensor" (each param to the target).
        schedule: "linear" or "cubic".
        tolerance: allowed drop of the metric, or None (never undo).

    Example:
        >>> model = torch.nn.Linear(10, 10)
        >>> pruner = IterativePruning(model, final_sparsity=0.5, rounds=2, interval=1)
        >>> pruner.step(), round(pruner.sparsity(), 2)
        (True, 0.25)
        >>> pruner.step(), round(pruner.sparsity(), 2), pruner.done
        (True, 0.5, True)
    """

    def __init__(
        self,
        model_or_params: Params,
        final_sparsity: float,
        *,
        rounds: int = 5,
        interval: int = 1,
        start: int = 0,
        criterion: str = "magnitude",
        scope: str = "global",
        schedule: str = "linear",
        tolerance: Optional[float] = None,
    ):
        self.params = selected_params(model_or_params)
        self.final_sparsity = check_real("final_sparsity", final_sparsity, 0.0, 1.0)
        if self.final_sparsity >= 1.0:
            raise ValueError("final_sparsity must be < 1")
        for name, value, low in (
            ("rounds", rounds, 1),
            ("interval", interval, 1),
            ("start", start, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if criterion not in ("magnitude", "taylor"):
            raise ValueError(f"unknown criterion {criterion!r}; valid: 'magnitude', 'taylor'")
        check_options("taylor", scope)
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        if tolerance is not None:
            tolerance = check_real("tolerance", tolerance)
        self.rounds, self.interval, self.start = rounds, interval, start
        self.criterion, self.scope, self.schedule, self.tolerance = (
            criterion,
            scope,
            schedule,
            tolerance,
        )
        self.masks = [torch.ones_like(p, dtype=torch.bool) for p in self.params]
        self.round = 0
        self.steps = 0
        self.done = False
        self.best_metric: Optional[float] = None
        self._undo: Optional[list] = None  # (newly pruned mask, their values) per param

    def target(self, k: int) -> float:
        """Share of pruned weights after round k."""
        x = min(k, self.rounds) / self.rounds
        if self.schedule == "cubic":
            return self.final_sparsity * (1.0 - (1.0 - x) ** 3)
        return self.final_sparsity * x

    def sparsity(self) -> float:
        """Share of the params' weights that are pruned (host sync)."""
        pruned = sum(int((~m).sum()) for m in self.masks)
        return pruned / max(1, sum(m.numel() for m in self.masks))

    def _scores(self) -> List[torch.Tensor]:
        scores = []
        for p, m in zip(self.params, self.masks):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            kind = "magnitude" if self.criterion == "magnitude" else "taylor"
            s = reference.relevance(p.detach(), g, kind)
            scores.append(torch.where(m, s, torch.full_like(s, -1.0)))  # pruned first
        return scores

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        """Prune (zero and mask) the lowest-score weights until `sparsity` of them are pruned."""
        scores = self._scores()
        if self.scope == "global":
            flat = torch.cat([s.flatten().double() for s in scores])
            k = int(math.floor(sparsity * flat.numel() + 1e-9))
            order = torch.argsort(flat, stable=True)
            keep = torch.ones_like(flat, dtype=torch.bool)
            keep[order[:k]] = False
            keeps = torch.split(keep, [s.numel() for s in scores])
        else:
            keeps = []
            for s in scores:
                k = int(math.floor(sparsity * s.numel() + 1e-9))
                keep = torch.ones(s.numel(), dtype=torch.bool, device=s.device)
                keep[torch.argsort(s.flatten().double(), stable=True)[:k]] = False
                keeps.append(keep)
        undo = []
        for p, m, keep in zip(self.params, self.masks, keeps):
            keep = keep.reshape(p.shape) & m
            newly = m & ~keep
            undo.append((newly, p.detach()[newly].clone()))
            m.copy_(keep)
            p.detach().mul_(keep)
        self._undo = undo

    @torch.no_grad()
    def undo(self) -> None:
        """Restore the weights pruned by the last round and stop the schedule."""
        if self._undo is not None:
            for p, m, (newly, values) in zip(self.params, self.masks, self._undo):
                p.detach()[newly] = values
                m |= newly
            self.round -= 1
            self._undo = None
        self.done = True

    def step(self, metric: Optional[float] = None) -> bool:
        """Advance one unit (epoch or step); returns True when a round pruned weights now."""
        if self.done:
            return False
        if metric is not None and self.tolerance is not None:
            if self.best_metric is not None and metric < self.best_metric - self.tolerance:
                self.undo()
                return False
            self.best_metric = metric if self.best_metric is None else max(self.best_metric, metric)
        if self.round >= self.rounds:  # the last round's metric was fine
            self.done = True
            return False
        self.steps += 1
        due = self.steps > self.start and (self.steps - self.start - 1) % self.interval == 0
        if not due:
            return False
        self.round += 1
        self.prune_to(self.target(self.round))
        if self.round >= self.rounds and self.tolerance is None:
            self.done = True
        return True

    @torch.no_grad()
    def apply_masks_(self) -> None:
        """Zero the pruned weights again (after an optimizer step moved them)."""
        for p, m in zip(self.params, self.masks):
            p.detach().mul_(m)

    def attach(self, optimizer: torch.optim.Optimizer):
        """Zero pruned gradients before and pruned weights after every optimizer step.

        Returns the two hook handles.
        """

        def before(*_):
            for p, m in zip(self.params, self.masks):
                if p.grad is not None:
                    p.grad.mul_(m)

        def after(*_):
            self.apply_masks_()

        return optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)

    def state_dict(self) -> dict:
        return {
            "masks": [m.clone() for m in self.masks],
            "round": self.round,
            "steps": self.steps,
            "done": self.done,
            "best_metric": self.best_metric,
        }

    def load_state_dict(self, state: dict) -> None:
        for m, saved in zip(self.masks, state["masks"]):
            m.copy_(saved)
        self.round, self.steps = state["round"], state["steps"]
        self.done, self.best_metric = state["done"], state["best_metric"]
        self._undo = None


# --------------------------------------------------------------------------------------------
# Study entry point
# --------------------------------------------------------------------------------------------


def selective_decay_regularizer(
    model: nn.Module,
    strength: float,
    *,
    quantile: float = 0.5,
    relevance: str = "taylor",
    scope: str = "global",
    keep_loss_grad: bool = True,
    refresh: int = 1,
    backend: Optional[str] = "auto",
) -> SelectiveWeightDecay:
    """Selective weight decay on the Conv and Linear weights of `model` (the study entry point).

    In the training loop: ``loss.backward(); reg.apply_(); optimizer.step()`` (or
    ``reg.attach(optimizer)`` once). Pair it with :class:`IterativePruning` for the paper's
    pruning rounds; filters are removed by ``fastsparse.prune`` when whole coupled groups end
    at zero.

    Example:
        >>> reg = selective_decay_regularizer(torch.nn.Linear(4, 2), 1e-3, backend="torch")
    """
    return SelectiveWeightDecay(
        model,
        strength,
        quantile=quantile,
        relevance=relevance,
        scope=scope,
        keep_loss_grad=keep_loss_grad,
        refresh=refresh,
        backend=backend,
    )
