"""The sparsity methods of the seed papers behind one small interface, for training loops and
`fastsparse study`.

    method = build_method("slimming", model, example_inputs, strength=1e-4)
    method.attach(optimizer)                      # in-place work around optimizer.step()
    for epoch in ...:
        for x, y in loader:
            loss = criterion(model(x), y) + method.loss()
            optimizer.zero_grad(); loss.backward(); optimizer.step()
        method.end_epoch(metric=accuracy)         # schedules (iterative pruning)
    method.before_prune(threshold=t)              # the method's own zeroing rule, if any
    small = fastsparse.prune(model, example_inputs, threshold=t)
    method.close()                                # remove hooks

Per method:

- ``oicsr`` (OICSR, Li et al., 2019): loss() = strength * R over the out-in-channel groups
  (``inplace=True``: added in place before the step instead). before_prune: nothing, the
  coupled groups that ``fastsparse.prune`` thresholds are OICSR's groups.
- ``feature_flow`` (Wu et al., 2021): loss() = strength * R of the features recorded by the last
  forward (hooks). before_prune: nothing.
- ``selective_decay`` (Bonetta et al., 2022): loss() = 0; the decay runs before each step and,
  with ``final_sparsity``, the pruning masks after it; end_epoch advances the pruning rounds.
- ``slimming`` (Liu et al., 2017): loss() = strength * sum |gamma| (``inplace=True``: in place).
  before_prune(threshold=t): ``slim_`` the channels with max |gamma| <= t (or the ``ratio``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from fastsparse.core.step import StepHooks

__all__ = ["METHODS", "Method", "build_method", "method_options"]

METHODS = ("oicsr", "feature_flow", "selective_decay", "slimming")


class Method(StepHooks):
    """A sparsity method as a training loop sees it: the step protocol (`StepHooks`:
    before_step, after_step, end_epoch, close), a loss term and a pruning rule. Subclasses
    override what they use."""

    name = "none"

    def __init__(self, model: nn.Module, example_inputs: Any):
        self.model = model
        self.example_inputs = example_inputs

    def loss(self) -> torch.Tensor:
        """The term to add to the training loss (after the forward, before backward)."""
        p = next(self.model.parameters())
        return torch.zeros((), dtype=torch.float32, device=p.device)

    def attach(self, optimizer: torch.optim.Optimizer):
        """Run before_step / after_step around every optimizer.step(); returns the handles."""

        def before(_optimizer, _args, _kwargs):
            self.before_step()

        def after(_optimizer, _args, _kwargs):
            self.after_step()

        return optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)

    def before_prune(self, threshold: float = 0.0) -> None:
        """Zero, by the method's own rule, what fastsparse.prune should then remove."""


class _OICSRMethod(Method):
    name = "oicsr"

    def __init__(self, model, example_inputs, strength, *, inplace=False, **options):
        from fastsparse.methods.oicsr import oicsr_regularizer

        super().__init__(model, example_inputs)
        self.reg = oicsr_regularizer(model, example_inputs, strength, **options)
        self.inplace = inplace

    def loss(self):
        return super().loss() if self.inplace else self.reg()

    def before_step(self):
        if self.inplace:
            self.reg.before_step()


class _FeatureFlowMethod(Method):
    name = "feature_flow"

    def __init__(self, model, example_inputs, strength, **options):
        from fastsparse.methods.feature_flow import feature_flow_regularizer

        super().__init__(model, example_inputs)
        self.flow = feature_flow_regularizer(model, example_inputs, strength, **options)

    def loss(self):
        return self.flow()

    def close(self):
        self.flow.remove()


class _SelectiveDecayMethod(Method):
    name = "selective_decay"

    def __init__(
        self,
        model,
        example_inputs,
        strength,
        *,
        final_sparsity: Optional[float] = None,
        rounds: int = 5,
        interval: int = 1,
        start: int = 0,
        tolerance: Optional[float] = None,
        **options,
    ):
        from fastsparse.methods.selective_decay import (
            IterativePruning,
            selective_decay_regularizer,
        )

        super().__init__(model, example_inputs)
        self.reg = selective_decay_regularizer(model, strength, **options)
        self.pruner = None
        if final_sparsity is not None:
            self.pruner = IterativePruning(
                self.reg.params,
                final_sparsity,
                rounds=rounds,
                interval=interval,
                start=start,
                tolerance=tolerance,
            )

    def before_step(self):
        if self.pruner is not None:
            for p, m in zip(self.pruner.params, self.pruner.masks):
                if p.grad is not None:
                    p.grad.mul_(m)
        self.reg.apply_()

    def after_step(self):
        if self.pruner is not None:
            self.pruner.apply_masks_()

    def end_epoch(self, metric=None):
        if self.pruner is not None:
            self.pruner.step(metric)


class _SlimmingMethod(Method):
    name = "slimming"

    def __init__(
        self,
        model,
        example_inputs,
        strength,
        *,
        inplace=False,
        ratio: Optional[float] = None,
        backend="auto",
    ):
        from fastsparse.methods.slimming import slimming_regularizer

        super().__init__(model, example_inputs)
        self.reg = slimming_regularizer(model, strength, backend=backend)
        self.inplace, self.ratio = inplace, ratio

    def loss(self):
        return super().loss() if self.inplace else self.reg()

    def before_step(self):
        if self.inplace:
            self.reg.apply_()

    def before_prune(self, threshold=0.0):
        from fastsparse.methods.slimming import slim_

        if self.ratio is not None:
            slim_(self.model, self.example_inputs, ratio=self.ratio)
        else:
            slim_(self.model, self.example_inputs, threshold=threshold)


_BUILDERS = {
    "oicsr": _OICSRMethod,
    "feature_flow": _FeatureFlowMethod,
    "selective_decay": _SelectiveDecayMethod,
    "slimming": _SlimmingMethod,
}


def build_method(
    name: str, model: nn.Module, example_inputs: Any, strength: float, **options
) -> Method:
    """Build one of :data:`METHODS` for `model` (a batch of one is enough as example input).

    Options (all optional):
        oicsr: kind ("group_lasso"), batchnorm (True), inplace (False), backend, alpha.
        feature_flow: gradient_weight, curvature_weight (1.0 each), reduction ("mean"),
            module_types, backend.
        selective_decay: quantile (0.5), relevance ("taylor"), scope ("global"),
            keep_loss_grad (True), refresh (1), backend; final_sparsity (None: no pruning
            rounds), rounds (5), interval (1 epoch), start (0), tolerance (None).
        slimming: inplace (False), ratio (None: before_prune uses the threshold on |gamma|),
            backend.

    Example:
        >>> from fastsparse.workflow.models import ResNetCIFAR
        >>> model, x = ResNetCIFAR((2,), (8,)), torch.randn(1, 3, 8, 8)
        >>> method = build_method("feature_flow", model, x, 1e-2, backend="torch")
        >>> (model(x).sum() + method.loss()).backward()
        >>> method.close()
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    valid = method_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for method {name!r}; "
            f"valid options: {', '.join(valid)}"
        )
    return _BUILDERS[name](model, example_inputs, strength, **options)


def method_options(name: str) -> tuple:
    """The option names `build_method` accepts for a method (from the builders' signatures).

    >>> method_options("slimming")
    ('backend', 'inplace', 'ratio')
    """
    import importlib
    import inspect

    builder = _BUILDERS[name]
    module, function = _REGULARIZERS[name]
    regularizer = getattr(importlib.import_module(module), function)
    names = set()
    for fn, skip in ((builder.__init__, 4), (regularizer, 0)):
        params = list(inspect.signature(fn).parameters.values())[skip:]
        names |= {
            p.name
            for p in params
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not p.empty
        }
    if name == "oicsr":
        names.add("alpha")  # passed on to the penalty (sparse_group_lasso)
    return tuple(sorted(names))


# The function each method's builder hands its remaining options to.
_REGULARIZERS = {
    "oicsr": ("fastsparse.methods.oicsr", "oicsr_regularizer"),
    "feature_flow": ("fastsparse.methods.feature_flow", "feature_flow_regularizer"),
    "selective_decay": ("fastsparse.methods.selective_decay", "selective_decay_regularizer"),
    "slimming": ("fastsparse.methods.slimming", "slimming_regularizer"),
}
