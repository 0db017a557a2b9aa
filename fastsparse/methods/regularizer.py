"""Regularizer: the one line a training loop adds."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from fastsparse.core.checks import check_coupled, check_kind, check_strength, prepare
from fastsparse.core.contract import Grouping
from fastsparse.core.groups import as_coupled_list, coupled_params, default_layers, is_coupled
from fastsparse.core.step import StepHooks
from fastsparse.functional.penalty import PreparedPenaltyGrad, add_penalty_grad_, penalty
from fastsparse.pruning.graph import coupled_groups


class Regularizer(StepHooks):
    """A structured-sparsity penalty over a model's weights.

    Args:
        model_or_params: an nn.Module (the weights of its Conv and Linear layers except the
            output layer: see `include_output`) or an iterable of parameters. Frozen
            parameters (``requires_grad=False``) are left out; a parameter shared by several
            modules (tied weights) counts once. A parametrized weight (``weight_norm``,
            ``torch.nn.utils.parametrize``) is penalized as the layer uses it: recomputed from
            its leaf parameters at every call, its gradient going to those leaves. Pass the
            model for those: a computed tensor in a list of parameters would go stale.
            None with coupled groups.
        kind, groups, backend, options: as in `fastsparse.penalty`; `groups` may also be
            coupled groups (`fastsparse.coupled_groups(model, x)`: whole prunable channels,
            consumers' input slices included, which `fastsparse.prune` then removes), or
            ``"coupled"`` to trace them here from `example_inputs`.
        example_inputs: with ``groups="coupled"``, a batch to trace the model with.
        include_output: with a model, also regularize its output layer (the last Conv/Linear
            layer in module order, and a transformers model's output embeddings); left out by
            default, as by the CLI: a group penalty there pushes whole classes (tokens) to zero.
        strength: the multiplier of the penalty (>= 0); may be changed between steps for
            warm-up schedules (`reg.strength = ...`).

    Use either the autograd path, ``loss = loss + reg()``, or the in-place path,
    ``reg.apply_()`` after ``loss.backward()`` (or ``reg.attach(optimizer)`` once, which calls
    ``apply_()`` before every optimizer step). As `fastsparse.core.step.StepHooks` (what a
    training loop calls), ``before_step()`` is ``apply_()``. With AMP's GradScaler, ``attach`` is
    right as is (the scaler unscales the gradients before the step); a direct ``apply_()`` before
    ``scaler.step(optimizer)`` must be told the scale: ``reg.apply_(scaler)``.

    Non-finite weights give a non-finite penalty (inf or NaN), as in plain PyTorch; nothing is
    checked per step, which would cost a host sync.

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
        include_output: bool = False,
        example_inputs: Any = None,
        **options,
    ):
        self.kind = kind
        self.strength = check_strength(strength)
        self.backend = backend
        self.options = options
        self._parametrized = []  # (module, name) of parametrized weights
        self._prepared = self._prepared_params = self._prepared_settings = None
        if isinstance(groups, str) and groups == "coupled":
            groups = self._trace(model_or_params, example_inputs)
        if is_coupled(groups):
            self.groups = as_coupled_list(groups)
            if not self.groups:
                raise ValueError("groups is an empty list of coupled groups")
            check_coupled(self.groups, model_or_params)
            check_kind(kind, options)
            self.params = coupled_params(self.groups)
            return
        if model_or_params is None:
            raise ValueError(
                "model_or_params is None: it may only be None with coupled groups "
                "(groups=fastsparse.coupled_groups(model, x))"
            )
        params = []
        if isinstance(model_or_params, nn.Module):
            for module in default_layers(model_or_params, include_output):
                if parametrize.is_parametrized(module, "weight"):
                    self._parametrized.append((module, "weight"))
                else:
                    params.append(module.weight)
        else:
            if isinstance(model_or_params, torch.Tensor):
                model_or_params = [model_or_params]
            params = list(model_or_params)
            for i, p in enumerate(params):
                if isinstance(p, torch.Tensor) and not p.is_leaf:
                    raise ValueError(
                        f"params[{i}] is a computed tensor, not a parameter (a parametrized "
                        "weight?): it would go stale after one step; pass the model instead"
                    )
        self.params = _distinct(p for p in params if not _frozen(p))
        self._parametrized = [
            (m, n) for m, n in self._parametrized if any(p.requires_grad for p in _leaves(m, n))
        ]
        if not self.params and not self._parametrized:
            raise ValueError("no parameters to regularize (none given, or all frozen)")
        # Fail now, not in the first training step.
        prepare(self.params + self._parametrized_weights(), kind, groups, options)
        self.groups = groups

    @staticmethod
    def _trace(model, example_inputs) -> list:
        if not isinstance(model, nn.Module) or example_inputs is None:
            raise ValueError(
                'groups="coupled" traces the model\'s coupled groups: give the model and '
                "example_inputs (a batch the model accepts)"
            )
        return coupled_groups(model, example_inputs)

    @property
    def coupled(self) -> bool:
        """True when the penalty is over coupled groups (whole prunable channels)."""
        return is_coupled(self.groups)

    def _parametrized_weights(self) -> list:
        return [getattr(m, n) for m, n in self._parametrized]

    def _penalty(self, tensors) -> torch.Tensor:
        """R of `tensors` with this regularizer's settings (None: its coupled groups)."""
        return penalty(tensors, self.kind, groups=self.groups, backend=self.backend, **self.options)

    def _all_penalty(self) -> torch.Tensor:
        return self._penalty(None if self.coupled else self.params + self._parametrized_weights())

    def __call__(self) -> torch.Tensor:
        """strength * R(params) as a differentiable loss term."""
        return self.strength * self._all_penalty()

    def value(self) -> torch.Tensor:
        """R(params) without gradient tracking (for logging)."""
        with torch.no_grad():
            return self._all_penalty()

    def apply_(self, scaler=None) -> torch.Tensor:
        """Add strength * dR/dW into the parameters' .grad in place; returns strength * R.

        Args:
            scaler: the ``torch.amp.GradScaler`` whose scale the gradients still carry, when
                called between ``scaler.scale(loss).backward()`` and ``scaler.step()``: the
                penalty gradient is then scaled alike (one host read of the scale). Not needed
                with ``attach`` or after ``scaler.unscale_(optimizer)``.
        """
        strength = self.strength
        if scaler is not None:
            strength = strength * float(scaler.get_scale())
        if self.coupled:
            value = add_penalty_grad_(
                None, self.kind, strength, groups=self.groups, backend=self.backend, **self.options
            )
            return self.strength * value
        value = self._prepared_step(strength, self.strength) if self.params else torch.zeros(())
        for module, name in self._parametrized:  # through autograd into the leaves
            leaves = [p for p in _leaves(module, name) if p.requires_grad]
            with torch.enable_grad():
                term = self._penalty([getattr(module, name)])
                grads = torch.autograd.grad(term * strength, leaves, allow_unused=True)
            for p, g in zip(leaves, grads):
                if g is not None:
                    p.grad = g.detach() if p.grad is None else p.grad.add_(g.to(p.grad.dtype))
            value = value.to(term.device) + self.strength * term.detach()
        return value

    def _prepared_step(self, strength: float, value_scale: float) -> torch.Tensor:
        """add_penalty_grad_ over self.params, validated once (again if the settings change);
        returns value_scale * R."""
        prepared = self._prepared
        if (
            prepared is None
            or self._prepared_params is not self.params
            or self._prepared_settings != (self.kind, self.groups, self.backend, self.options)
        ):
            prepared = self._prepared = PreparedPenaltyGrad(
                self.params, self.kind, groups=self.groups, backend=self.backend, **self.options
            )
            self._prepared_params = self.params
            self._prepared_settings = (self.kind, self.groups, self.backend, self.options)
        return prepared(strength, value_scale=value_scale)

    def before_step(self) -> None:
        """The step protocol's gradient work: ``apply_()``, the in-place path."""
        self.apply_()

    def attach(self, optimizer: torch.optim.Optimizer):
        """Call apply_() before every optimizer.step(); returns the hook handle (.remove())."""

        def hook(_optimizer, _args, _kwargs):
            self.apply_()

        return optimizer.register_step_pre_hook(hook)

    def __repr__(self) -> str:
        if self.coupled:
            return (
                f"Regularizer(kind={self.kind!r}, strength={self.strength}, "
                f"coupled groups={len(self.groups)}, params={len(self.params)}, "
                f"backend={self.backend!r})"
            )
        count = len(self.params) + len(self._parametrized)
        return (
            f"Regularizer(kind={self.kind!r}, strength={self.strength}, groups={self.groups!r}, "
            f"params={count}, backend={self.backend!r})"
        )


def _frozen(p) -> bool:
    return isinstance(p, torch.Tensor) and p.is_leaf and not p.requires_grad


def _distinct(params) -> list:
    """Each tensor once, in order of first appearance (tied weights are one parameter)."""
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _leaves(module: nn.Module, name: str) -> list:
    """The leaf parameters a parametrized tensor is computed from."""
    return list(module.parametrizations[name].parameters())
