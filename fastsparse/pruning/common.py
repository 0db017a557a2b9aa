"""What every pruning module shares: the error, the layer kinds, running a model on its example
inputs and reading its outputs, checking a pruned copy against them."""

from __future__ import annotations

from typing import Any, List, Sequence

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


def copy_flags(work: nn.Module, model: nn.Module) -> None:
    """Give `work` (a pruned copy of `model`, the same modules in the same order) each module's
    training mode and each parameter's ``requires_grad`` of `model`: layers the surgery made
    anew start in training mode and with gradients."""
    for m, original in zip(work.modules(), model.modules()):
        m.train(original.training)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in work.named_parameters():
        p.requires_grad_(flags.get(n, True))


def output_tolerance(dtype: torch.dtype) -> float:
    """How far a pruned model's outputs may be from the unpruned one's, times 1 + the largest
    output: summation order only (removing zero slices changes what is added, not the sum)."""
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 1e-2)


def check_outputs_unchanged(
    model: nn.Module, expected: Sequence[torch.Tensor], got: Sequence[torch.Tensor], hint: str
) -> None:
    """Raise PruningError unless the pruned copy of `model` computed `expected` (eval mode, on
    the example inputs): the same shapes and, for floating outputs, a max abs difference within
    `output_tolerance` times 1 + the largest output. `hint`: the likely cause, for the message.

    Example::

        >>> check_outputs_unchanged(nn.Identity(), [torch.ones(2)], [torch.ones(2)], "")
    """
    for a, b in zip(expected, got):
        if a.shape != b.shape:
            raise PruningError(f"pruning changed an output shape: {a.shape} -> {b.shape}")
        if a.is_floating_point():
            diff = (a - b).abs().max().item() if a.numel() else 0.0
            scale = 1.0 + (a.abs().max().item() if a.numel() else 0.0)
            if not diff <= output_tolerance(a.dtype) * scale:
                raise PruningError(
                    f"pruning {type(model).__name__} is not lossless on the example inputs "
                    f"(max abs difference {diff:.3g}); {hint}"
                )
