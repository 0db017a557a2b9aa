"""Feature flow regularization (Wu, Lan, Zhang and Xiang, 2021, arXiv 2106.02914).

The features F_0 .. F_{L-1} of consecutive same-shape layers (for example the blocks of a ResNet
stage) form a trajectory, the *feature flow*. FFR penalizes its gradient and its curvature:

    R = a * sum_{l=0}^{L-2} ||F_{l+1} - F_l||^2
      + b * sum_{l=1}^{L-2} ||F_{l+1} - 2 F_l + F_{l-1}||^2

with a = gradient_weight / M and b = curvature_weight / M, M = numel(F_l) for ``reduction="mean"``
(default: a mean over the elements of one map, independent of batch size and resolution) or 1 for
``"sum"``. Short, straight flows leave redundant filters idle, which raises structured sparsity.
The penalty acts on activations, not weights; the filters are removed afterwards by the usual
threshold + `fastsparse.prune`.

Gradient: dR/dF_l = 2a (D_{l-1} - D_l) + 2b (C_{l-1} - 2 C_l + C_{l+1}), with D_k = F_{k+1} - F_k,
C_k = F_{k+1} - 2 F_k + F_{k-1}, and D, C = 0 outside their ranges.

API:
- :func:`feature_flow_penalty`: differentiable value of a list of maps (fused Triton kernel: one
  pass for the value, one for the gradient in backward).
- :func:`feature_flow_value_and_grads`: value and every gradient in one fused pass, no graph.
- :class:`FeatureFlow`: forward hooks on given modules; ``flow()`` is the penalty of the current
  forward (autograd path), ``flow.backward(loss)`` the fused path (value and gradients in one pass,
  injected into the same ``torch.autograd.backward`` call as the loss).
- :func:`flow_sequences`: finds runs of same-shape block (or activation) outputs in a model.
- :func:`feature_flow_regularizer`: the study entry point (all of the above for a model).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

import torch
from torch import nn

from fastsparse.core.checks import check_real
from fastsparse.functional.feature_flow import (
    REDUCTIONS,
    feature_flow_penalty,
    feature_flow_value_and_grads,
)

__all__ = [
    "FeatureFlow",
    "feature_flow_regularizer",
    "flow_sequences",
]

# --------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------

ModuleSequences = Union[Sequence[nn.Module], Sequence[Sequence[nn.Module]], nn.Sequential]


def _is_container(s) -> bool:
    return isinstance(s, (nn.Sequential, nn.ModuleList, list, tuple))


def _as_flows(sequences) -> List[List[nn.Module]]:
    """One list of modules per flow (an nn.Sequential / nn.ModuleList stands for its children)."""
    if isinstance(sequences, (nn.Sequential, nn.ModuleList)):
        return [list(sequences)]
    sequences = list(sequences)
    if all(not _is_container(s) for s in sequences):
        return [sequences]
    if all(_is_container(s) for s in sequences):
        return [list(s) for s in sequences]
    raise TypeError("give one sequence of modules or a sequence of sequences, not a mix")


class FeatureFlow:
    """Feature flow regularization of a model, through forward hooks on the layers of each flow.

    Args:
        sequences: the modules whose outputs form a flow, in order: a list of modules, an
            ``nn.Sequential`` (its children, e.g. ``model.stages[1]``: the blocks of a ResNet
            stage), or a list of such flows (one penalty each, summed). Within a flow, the
            outputs of one forward must have one shape. A module called twice in one forward
            counts with its last output.
        strength: multiplier of the penalty (>= 0); may be changed between steps.
        gradient_weight, curvature_weight, reduction, backend: as in :func:`feature_flow_penalty`.

    Each forward of the model records the flows' outputs (references, no copies). Then either

    - ``loss = loss + flow()``: the autograd path (the penalty of the last forward), or
    - ``flow.backward(loss)`` instead of ``loss.backward()``: the fused path; the value and all
      the maps' gradients come from one kernel pass and enter the same backward as the loss.

    Both return strength * R and release the recorded maps. ``flow.remove()`` (or leaving a
    ``with FeatureFlow(...) as flow:`` block) removes the hooks.

    Example:
        >>> from fastsparse.workflow.models import ResNetCIFAR
        >>> model = ResNetCIFAR((3, 3), (8, 16))
        >>> flow = FeatureFlow([model.stages[0], model.stages[1]], strength=1e-2, backend="torch")
        >>> loss = model(torch.randn(2, 3, 16, 16)).square().mean()
        >>> value = flow.backward(loss)  # or: (loss + flow()).backward()
    """

    def __init__(
        self,
        sequences: ModuleSequences,
        strength: float = 1.0,
        *,
        gradient_weight: float = 1.0,
        curvature_weight: float = 1.0,
        reduction: str = "mean",
        backend: Optional[str] = "auto",
    ):
        self.flows = _as_flows(sequences)
        if not self.flows or any(len(f) == 0 for f in self.flows):
            raise ValueError("every flow needs at least one module")
        for flow in self.flows:
            for m in flow:
                if not isinstance(m, nn.Module):
                    raise TypeError(f"expected nn.Module in a flow, got {type(m).__name__}")
        self.strength = check_real("strength", strength)
        self.gradient_weight = check_real("gradient_weight", gradient_weight)
        self.curvature_weight = check_real("curvature_weight", curvature_weight)
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
        self.reduction = reduction
        self.backend = backend
        self._captured: List[List[Optional[torch.Tensor]]] = [[None] * len(f) for f in self.flows]
        self._handles = []
        for i, flow in enumerate(self.flows):
            for j, module in enumerate(flow):
                self._handles.append(module.register_forward_hook(self._hook(i, j)))

    def _hook(self, i: int, j: int):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"FeatureFlow: {type(module).__name__} returned {type(output).__name__}; "
                    "hook modules that return one tensor"
                )
            self._captured[i][j] = output

        return hook

    def features(self) -> List[List[torch.Tensor]]:
        """The maps recorded by the last forward, one list per flow."""
        for i, maps in enumerate(self._captured):
            missing = [j for j, f in enumerate(maps) if f is None]
            if missing:
                raise RuntimeError(
                    f"FeatureFlow: flow {i} has no output recorded for its module(s) {missing}; "
                    "run a forward of the model first (the maps are released after each penalty)"
                )
        return [list(maps) for maps in self._captured]

    def clear(self) -> None:
        """Release the recorded maps."""
        self._captured = [[None] * len(f) for f in self.flows]

    def _options(self, scale: float) -> dict:
        return dict(
            gradient_weight=self.gradient_weight * scale,
            curvature_weight=self.curvature_weight * scale,
            reduction=self.reduction,
            backend=self.backend,
        )

    def __call__(self) -> torch.Tensor:
        """strength * R of the last forward, differentiable (the autograd path)."""
        flows = self.features()
        self.clear()
        total = None
        for maps in flows:
            value = feature_flow_penalty(maps, **self._options(self.strength))
            total = value if total is None else total + value
        return total

    def value(self) -> torch.Tensor:
        """R (not multiplied by strength) of the last forward, without gradient; keeps the maps."""
        with torch.no_grad():
            values = [feature_flow_penalty(m, **self._options(1.0)) for m in self.features()]
        return torch.stack(values).sum()

    def backward(self, loss: torch.Tensor, **backward_kwargs) -> torch.Tensor:
        """Backward of ``loss + strength * R`` with R's gradients from one fused pass.

        Equivalent to ``(loss + flow()).backward()``: the gradients of the maps are computed with
        no autograd graph (every map read once, every gradient written once) and seeded into the
        same ``torch.autograd.backward`` call as `loss`. Returns strength * R (detached).
        `backward_kwargs` (e.g. ``retain_graph``) go to ``torch.autograd.backward``.
        """
        flows = self.features()
        self.clear()
        roots, seeds, values = [loss], [torch.ones_like(loss)], []
        for maps in flows:
            value, grads = feature_flow_value_and_grads(maps, **self._options(self.strength))
            values.append(value)
            for f, g in zip(maps, grads):
                if f.requires_grad:
                    roots.append(f)
                    seeds.append(g.to(f.dtype))
        torch.autograd.backward(roots, seeds, **backward_kwargs)
        return torch.stack(values).sum()

    def remove(self) -> None:
        """Remove the hooks and release the maps."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> FeatureFlow:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        lengths = [len(f) for f in self.flows]
        return (
            f"FeatureFlow(flows={lengths}, strength={self.strength}, gradient_weight="
            f"{self.gradient_weight}, curvature_weight={self.curvature_weight}, reduction="
            f"{self.reduction!r}, backend={self.backend!r})"
        )


# --------------------------------------------------------------------------------------------
# Finding flows in a model, and the study entry point
# --------------------------------------------------------------------------------------------

_BLOCK_NAMES = ("BasicBlock", "Bottleneck")


def _default_types(model: nn.Module) -> tuple:
    """Residual blocks if the model has any (fastsparse.workflow.models, torchvision), else
    ReLUs."""
    blocks = tuple({type(m) for m in model.modules() if type(m).__name__ in _BLOCK_NAMES})
    return blocks or (nn.ReLU,)


def flow_sequences(
    model: nn.Module,
    example_inputs: Any,
    module_types: Optional[tuple] = None,
    min_length: int = 2,
) -> List[List[nn.Module]]:
    """The flows of a model: maximal runs of consecutive same-shape outputs of `module_types`.

    One eval forward of `example_inputs` (without grad; the model's modes are restored) records,
    in call order, the output shape of every module of `module_types` (default: the residual
    blocks, ``BasicBlock``/``Bottleneck``, if the model has any, else the ``nn.ReLU`` modules);
    consecutive modules with the same output shape form a flow. Runs shorter than `min_length`
    are dropped. For a CIFAR ResNet this gives one flow per stage (its blocks); for VGG, the
    activations of each stage with two or more convolutions.

    Example:
        >>> from fastsparse.workflow.models import ResNetCIFAR
        >>> flows = flow_sequences(ResNetCIFAR((3, 3), (8, 16)), torch.randn(1, 3, 16, 16))
        >>> [len(f) for f in flows]
        [3, 3]
    """
    types = module_types or _default_types(model)
    calls: List[tuple] = []
    handles = [
        m.register_forward_hook(lambda mod, i, out: calls.append((mod, tuple(out.shape))))
        for m in model.modules()
        if isinstance(m, types)
    ]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(example_inputs, dict):
                model(**example_inputs)
            elif isinstance(example_inputs, (tuple, list)):
                model(*example_inputs)
            else:
                model(example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.train(training)
    flows: List[List[nn.Module]] = []
    run: List[nn.Module] = []
    shape = None
    for module, out_shape in calls:
        if out_shape != shape or module in run:
            if len(run) >= min_length:
                flows.append(run)
            run, shape = [], out_shape
        run.append(module)
    if len(run) >= min_length:
        flows.append(run)
    return flows


def feature_flow_regularizer(
    model: nn.Module,
    example_inputs: Any,
    strength: float,
    *,
    gradient_weight: float = 1.0,
    curvature_weight: float = 1.0,
    reduction: str = "mean",
    module_types: Optional[tuple] = None,
    backend: Optional[str] = "auto",
) -> FeatureFlow:
    """Feature flow regularization of `model` on all its flows (:func:`flow_sequences`).

    The study entry point: returns a :class:`FeatureFlow` whose hooks are live. In the training
    loop, after ``out = model(x)``: ``loss = criterion(out, y) + reg()`` (or
    ``reg.backward(criterion(out, y))``). Raises ValueError when the model has no flow (e.g.
    LeNet-5: no two consecutive same-shape activations).

    Example:
        >>> from fastsparse.workflow.models import ResNetCIFAR
        >>> model, x = ResNetCIFAR((2, 2), (8, 16)), torch.randn(2, 3, 16, 16)
        >>> reg = feature_flow_regularizer(model, x[:1], 1e-2, backend="torch")
        >>> (model(x).square().mean() + reg()).backward()
    """
    flows = flow_sequences(model, example_inputs, module_types)
    if not flows:
        raise ValueError(
            f"{type(model).__name__} has no flow: no two consecutive modules of "
            f"{[t.__name__ for t in (module_types or _default_types(model))]} with one output shape"
        )
    return FeatureFlow(
        flows,
        strength,
        gradient_weight=gradient_weight,
        curvature_weight=curvature_weight,
        reduction=reduction,
        backend=backend,
    )
