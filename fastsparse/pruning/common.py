"""What every pruning module shares: the error, the layer kinds, running a model on its example
inputs and reading its outputs."""

from __future__ import annotations

from typing import Any, List

import torch
from torch import nn

CONV = nn.modules.conv._ConvNd
BATCHNORM = nn.modules.batchnorm._BatchNorm
SUPPORTED = "Conv1d/2d/3d (not transposed), Linear, BatchNorm1d/2d/3d"


class PruningError(RuntimeError):
    """A model cannot be traced or pruned; the message names the layer when there is one."""


class LeftWholeWarning(UserWarning):
    """`prune` left some coupled groups whole; `skipped` lists (root layer, why) of each."""

    def __init__(self, message: str, skipped):
        super().__init__(message)
        self.skipped = list(skipped)


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


def normalizes_across_channels(module: nn.Module) -> bool:
    """LayerNorm, GroupNorm and RMSNorm (torch's, or a class so named, as transformers' and
    torchvision's are): their statistics are taken over the channels, a zero one included."""
    names = ("LayerNorm", "GroupNorm", "RMSNorm", "LayerNorm2d")
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or any(
        type(module).__name__.endswith(n) for n in names
    )


def is_grouped(conv: nn.Module) -> bool:
    """A grouped convolution that is not depthwise (ResNeXt, RegNet)."""
    return conv.groups > 1 and not is_depthwise(conv)


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
