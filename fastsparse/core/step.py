"""The step protocol: the four calls a training loop makes on a run's sparsity object.

A `fastsparse.Regularizer`, a method of `fastsparse.methods` and a `fastsparse.optim.Sparsifier`
are all `StepHooks`, so one loop drives any of them::

    for epoch in range(epochs):
        for x, y in loader:
            loss_fn(model(x), y).backward()
            hooks.before_step()      # gradient work: penalties in place, masks
            optimizer.step()
            hooks.after_step()       # weight work: proximal steps, targets, re-zeroing
            optimizer.zero_grad()
        hooks.end_epoch(metric=accuracy)  # schedules (pruning rounds)
    hooks.close()                         # hooks off the model

It lives in core, below `methods` and `optim`, which may not import each other.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["StepHooks"]


class StepHooks:
    """What a training loop calls around each optimizer step; every call does nothing here.

    Example:
        >>> class Counter(StepHooks):
        ...     steps = 0
        ...     def after_step(self):
        ...         self.steps += 1
        >>> hooks = Counter()
        >>> hooks.before_step(); hooks.after_step(); hooks.end_epoch(metric=0.9); hooks.close()
        >>> hooks.steps
        1
    """

    def before_step(self) -> None:
        """After backward (and AMP unscaling, clipping), before optimizer.step(): gradients."""

    def after_step(self) -> None:
        """After optimizer.step(): the updated weights (e.g. keep pruned weights at zero)."""

    def end_epoch(self, metric: Optional[float] = None) -> None:
        """Once per epoch, with the validation metric (higher is better) if there is one."""

    def close(self) -> None:
        """The run is over: remove hooks from the model."""
