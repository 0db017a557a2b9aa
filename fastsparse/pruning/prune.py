"""Lossless physical pruning of dead coupled groups (Torch-Pruning does the surgery).

**Dead rule (lossless).** A channel is removable when what produces it is zero (l2 norm <= t over
its producers: the filter and bias, the following BatchNorm's scale *and shift*, depthwise
filters, the producers tied by residual additions; see `importance.producer_norms`): its output
is then zero, and its consumers' in-slices multiply zeros, whatever they hold. A filter whose conv
weight and bias are zero but whose BatchNorm shift is not makes a constant channel: its producers'
norm is > 0, so it stays. `prune` first zeroes the dead channels' whole groups and then removes
them, so in eval mode the pruned model computes what the thresholded unpruned model computes, up
to summation order; it checks this on the example inputs before returning.

**Not prunable (left whole, documented).** Groups that reach the model's outputs (the classifier's
out-features are the outputs) and groups that would change the model's input channels (a
depthwise conv or BatchNorm fed directly by the input). A layer keeps at least one channel: when
all its groups are dead, the one with the largest norm stays (zeroed).

**Saving.** Either ``torch.save(pruned, path)`` and ``torch.load(path, weights_only=False)`` (the
model's class must be importable), or ``torch.save(pruned.state_dict(), path)`` and
``load_pruned(fresh_unpruned_model, torch.load(path))``, which resizes the layers of a freshly built
model to the saved shapes (works with ``weights_only=True``).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Dict

import torch
from torch import nn

from fastsparse.core.checks import check_real
from fastsparse.pruning.common import (
    BATCHNORM,
    CONV,
    LeftWholeWarning,
    PruningError,
    check_outputs_unchanged,
    copy_flags,
    eval_forward,
    is_depthwise,
    output_tensors,
)
from fastsparse.pruning.graph import Traced, trace
from fastsparse.pruning.importance import (
    dead_channels,
    dead_masks,
    producer_norms,
    zero_channels_,
)
from fastsparse.pruning.structure import Structure, structure_of
from fastsparse.pruning.surgery import balanced_channels, remove_channels
from fastsparse.pruning.transformer import prune_blocks


def prune_traced(traced: Traced, example_inputs: Any, threshold: float, verify: bool):
    """Zero the dead groups of the traced copy, remove them, check outputs. Modifies the copy."""
    model, graph = traced.model, traced.graph
    norms = producer_norms(traced.groups)
    dead = dead_channels(traced.groups, threshold, norms)
    # Zero the whole group of every dead channel (the one a layer keeps too): its producers
    # are (nearly) zero already, its consumers' slices then multiply zeros.
    zero_channels_(traced.groups, dead_masks(traced.groups, threshold, norms))
    expected = output_tensors(eval_forward(model, example_inputs)) if verify else []
    balance = traced.balance or [[] for _ in traced.groups]
    for group, root, channels, norm, ties in zip(traced.groups, traced.roots, dead, norms, balance):
        channels = balanced_channels(channels, norm, ties) if ties else channels
        if not channels:
            continue
        try:
            remove_channels(graph, root, channels)
        except Exception as e:
            raise PruningError(
                f"removing channels of layer {group.root!r} failed ({type(e).__name__}: {e})"
            ) from e
    if verify:
        try:
            got = output_tensors(eval_forward(model, example_inputs))
        except Exception as e:
            raise PruningError(
                f"the pruned {type(model).__name__} fails on the example inputs "
                f"({type(e).__name__}: {e}); an operation the dependency graph does not model "
                "probably ties channels"
            ) from e
        hint = "an operation the dependency graph does not model probably mixes channels"
        check_outputs_unchanged(model, expected, got, hint)
    return model


def prune(
    model: nn.Module,
    example_inputs: Any,
    threshold: float = 0.0,
    *,
    verify: bool = True,
    strict: bool = False,
) -> nn.Module:
    """Return a new, physically smaller copy of `model` without its dead coupled groups.

    A channel is dead when the l2 norm of what produces it (filters, biases, BatchNorm scales
    and shifts, residual ties; not the consumers' in-slices) is <= `threshold`. The copy's dead
    channels are zeroed with their whole coupled groups, then removed with Torch-Pruning, so in
    eval mode the result computes what the thresholded model computes (max abs difference ~1e-6
    in fp32, summation order only).

    All or nothing: `model` is never modified; any failure raises and returns nothing.

    Args:
        model: the trained network (any mode, device, dtype).
        example_inputs: as in :func:`coupled_groups`.
        threshold: t >= 0; 0 removes exactly-zero groups only.
        verify: compare outputs on `example_inputs` before and after the removal (eval mode)
            and raise if they differ; keep it on unless the forward is expensive.
        strict: raise PruningError when a group touches an unsupported layer, instead of
            leaving that group whole (with a warning naming it) and pruning the rest.

    Returns:
        The pruned copy, in the same training mode as `model`, with the same ``requires_grad``
        flags.

    Raises:
        ValueError: negative or NaN threshold.
        PruningError: the model cannot be traced, the pruned copy does not reproduce the
            outputs, or (`strict`) a coupled group has an unsupported layer (named).

    Example::

        >>> from fastsparse.workflow.models import LeNet5
        >>> model, x = LeNet5(), torch.randn(1, 1, 28, 28)
        >>> with torch.no_grad():
        ...     model.features[0].weight[:5] = 0
        ...     model.features[0].bias[:5] = 0
        ...     model.features[3].weight[:, :5] = 0
        >>> prune(model, x).features[0]
        Conv2d(1, 15, kernel_size=(5, 5), stride=(1, 1))
    """
    threshold = check_real("threshold", threshold)
    return prune_as(
        structure_of(model), model, example_inputs, threshold, verify=verify, strict=strict
    )


def prune_as(
    structure: Structure,
    model: nn.Module,
    example_inputs: Any,
    threshold: float,
    *,
    verify: bool,
    strict: bool,
) -> nn.Module:
    """`prune` of a model whose `structure_of` the caller has decided (threshold checked)."""
    if structure.is_decoder:  # transformers: heads and neurons (see pruning/transformer.py)
        return prune_blocks(model, structure.block_names, example_inputs, threshold, verify=verify)
    work = copy.deepcopy(model)
    traced = trace(work, example_inputs, strict)
    if traced.skipped:
        where = "; ".join(f"{root!r}: {why}" for root, why in traced.skipped)
        warnings.warn(
            LeftWholeWarning(f"left whole (not prunable): {where}", traced.skipped), stacklevel=3
        )
    prune_traced(traced, example_inputs, threshold, verify)
    copy_flags(work, model)
    return work


def load_pruned(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild a pruned model: resize a freshly built unpruned `model` to `state_dict`'s shapes.

    Returns a new module (``model`` is left as is) whose Conv/Linear/BatchNorm layers have the
    channel counts found in `state_dict`, with `state_dict` loaded (strict).

    Example::

        >>> torch.save(pruned.state_dict(), "pruned.pt")                   # doctest: +SKIP
        >>> model = load_pruned(LeNet5(), torch.load("pruned.pt"))         # doctest: +SKIP
    """
    new = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in new.named_modules():
            prefix = f"{name}." if name else ""
            weight = state_dict.get(prefix + "weight")
            if isinstance(module, CONV) and weight is not None and not module.transposed:
                if is_depthwise(module):
                    module.in_channels = module.out_channels = module.groups = weight.shape[0]
                else:
                    module.out_channels = weight.shape[0]
                    module.in_channels = weight.shape[1] * module.groups
            elif isinstance(module, nn.Linear) and weight is not None:
                module.out_features, module.in_features = weight.shape
            elif isinstance(module, BATCHNORM):
                stats = state_dict.get(prefix + "running_mean")
                source = weight if weight is not None else stats
                if source is None:
                    continue
                module.num_features = source.shape[0]
            else:
                continue
            for key, tensor in list(module.named_parameters(recurse=False)) + list(
                module.named_buffers(recurse=False)
            ):
                saved = state_dict.get(prefix + key)
                if saved is not None and saved.shape != tensor.shape:
                    resized = torch.empty(saved.shape, dtype=tensor.dtype, device=tensor.device)
                    if isinstance(tensor, nn.Parameter):
                        setattr(module, key, nn.Parameter(resized, tensor.requires_grad))
                    else:
                        setattr(module, key, resized)
    new.load_state_dict(state_dict, strict=True)
    return new
