"""Regularizer: the one line a training loop adds."""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import nn

from fastsparse.core.checks import check_strength, prepare
from fastsparse.core.contract import Grouping
from fastsparse.core.groups import default_parameters
from fastsparse.functional.penalty import add_penalty_grad_, penalty


class Regularizer:
    """A structured-sparsity penalty over a model's weights.

    Args:
        model_or_params: an nn.Module (its Conv and Linear weights are regularized) or an
            iterable of parameters.
        kind, groups, backend, options: as in `fastsparse.penalty`.
        strength: the multiplier of the penalty (>= 0); may be changed between steps for
            warm-up schedules (`reg.strength = ...`).

    Use either the autograd path, ``loss = loss + reg()``, or the in-place path,
    ``reg.apply_()`` after ``loss.backward()`` (or ``reg.attach(optimizer)`` once, which calls
    ``apply_()`` before every optimizer step).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten())
        >>> reg = Regularizer(model, "l1l2", 1e-3)
        >>> loss = model(torch.randn(2, 1, 5, 5)).sum() + reg()
        >>> loss.backward()
    """

    def __init__(
        self,
        model_or_params: Union[nn.Module, Iterable[torch.Tensor]],
        kind: str,
        strength: float,
        *,
        groups: Grouping = "filters",
        backend: Optional[str] = "auto",
        **options,
    ):
        if isinstance(model_or_params, nn.Module):
            params = default_parameters(model_or_params)
        else:
            params = list(model_or_params)
        if not params:
            raise ValueError("no parameters to regularize")
        prepare(params, kind, groups, options)  # fail now, not in the first training step
        self.params = params
        self.kind = kind
        self.strength = check_strength(strength)
        self.groups = groups
        self.backend = backend
        self.options = options

    def __call__(self) -> torch.Tensor:
        """strength * R(params) as a differentiable loss term."""
        value = penalty(
            self.params, self.kind, groups=self.groups, backend=self.backend, **self.options
        )
        return self.strength * value

    def value(self) -> torch.Tensor:
        """R(params) without gradient tracking (for logging)."""
        with torch.no_grad():
            return penalty(
                self.params, self.kind, groups=self.groups, backend=self.backend, **self.options
            )

    def apply_(self) -> torch.Tensor:
        """Add strength * dR/dW into the parameters' .grad in place; returns strength * R."""
        value = add_penalty_grad_(
            self.params,
            self.kind,
            self.strength,
            groups=self.groups,
            backend=self.backend,
            **self.options,
        )
        return self.strength * value

    def attach(self, optimizer: torch.optim.Optimizer):
        """Call apply_() before every optimizer.step(); returns the hook handle (.remove())."""

        def hook(_optimizer, _args, _kwargs):
            self.apply_()

        return optimizer.register_step_pre_hook(hook)

    def __repr__(self) -> str:
        return (
            f"Regularizer(kind={self.kind!r}, strength={self.strength}, groups={self.groups!r}, "
            f"params={len(self.params)}, backend={self.backend!r})"
        )
