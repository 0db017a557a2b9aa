"""What every pruning module shares: the error, the layer kinds, running a model on its example
inputs and reading its outputs."""

from __future__ import annotations

from typing import Any, List

import torch
from torch import nn

CONV = nn.modules.conv._ConvNd
BATCHNORM = nn.modules.batchnorm._BatchNorm
SUPPORTED = "Conv1d/2d/3d (groups=1 or depthwise), Linear, BatchNorm1d/2d/3d"


class PruningError(RuntimeError):
    """A model cannot be traced or pruned; the message names the layer when there is one."""


# ------------------------------------------------------------------------------------ helpers


def run_model(model: nn.Module, example_inputs: Any):
    """Call the model: a dict is passed as keywords, a tuple/list as positional arguments."""
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def output_tensors(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in output_tensors(o)]
    return []


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a ``torch.compile`` wrapper (the model itself otherwise)."""
    return getattr(model, "_orig_mod", model)


def is_depthwise(conv: nn.Module) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def eval_forward(model: nn.Module, example_inputs: Any):
    """Forward in eval mode without grad, restoring every module's training flag."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return run_model(model, example_inputs)
    finally:
        for m, training in modes:
            m.train(training)
