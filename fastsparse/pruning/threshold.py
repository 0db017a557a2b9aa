"""Thresholding: the step between training and `prune`, zeroing the coupled groups of weak filters.

Every layer's filters are scored once, on the trained weights, before anything is zeroed (so
zeroing one layer cannot shrink the next layer's scores: no cascade); then the whole coupled group
of each weak filter is zeroed, and `fastsparse.prune` removes exactly those channels.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from fastsparse.core.checks import check_real
from fastsparse.pruning.common import unwrap
from fastsparse.pruning.graph import coupled_groups, coupled_groups_as
from fastsparse.pruning.importance import PRUNE_CRITERIA, filter_scores, zero_channels_
from fastsparse.pruning.prune import prune_as
from fastsparse.pruning.report import sparsity_report_as
from fastsparse.pruning.structure import Structure, structure_of

THRESHOLD_MODES = ("relative", "global", "absolute")


def prunable_weights(model: nn.Module, example_inputs: Any) -> List[Tuple[str, nn.Parameter]]:
    """(name, weight) of every conv/linear layer whose filters `fastsparse.prune` can remove.

    That is the root layer of each coupled group: every conv/linear layer except those whose
    outputs are the model's outputs (the classifier).
    """
    model = unwrap(model)
    return [
        (g.root, model.get_submodule(g.root).weight) for g in coupled_groups(model, example_inputs)
    ]


@dataclass
class PruneResult:
    """What :func:`threshold_and_prune` produced.

    Attributes:
        pruned: the physically smaller model (a new module).
        thresholded: a copy of the input model with the weak filters' coupled groups zeroed.
        report: the :class:`fastsparse.pruning.SparsityReport` of `thresholded`.
        kept: layer name -> (filters kept, filters before) for every prunable layer.
    """

    pruned: nn.Module
    thresholded: nn.Module
    report: Any
    kept: Dict[str, Tuple[int, int]]


def threshold_(
    model: nn.Module,
    example_inputs: Any,
    threshold: float,
    mode: str = "relative",
    criterion: str = "filter_norm",
) -> Dict[str, torch.Tensor]:
    """Zero, in place, the whole coupled group of every weak filter; `prune` then removes them.

    Every filter (output channel of a prunable layer) is scored first, all layers at once, on the
    weights as they are, so zeroing one layer cannot shrink the next layer's scores (no cascade).
    A filter is weak when its score is <= ``threshold`` times its layer's largest score
    (``mode="relative"``, comparable across penalties of any scale), times the largest score of
    all layers (``"global"``), or <= ``threshold`` itself (``"absolute"``). In every layer the
    filter with the highest score stays. Only coupled groups are touched: a BatchNorm shift or a
    classifier bias is never zeroed on its own.

    Args:
        model: the trained model (modified in place).
        example_inputs: a batch the model accepts (for tracing its coupled groups).
        threshold: >= 0.
        mode: one of :data:`THRESHOLD_MODES`.
        criterion: one of :data:`PRUNE_CRITERIA` (see `fastsparse.pruning.importance`).

    Returns:
        Root layer name -> bool mask [filters] of the filters zeroed.

    Example:
        >>> from fastsparse.workflow.models import LeNet5
        >>> model, x = LeNet5(), torch.randn(1, 1, 28, 28)
        >>> zeroed = threshold_(model, x, 0.5)  # relative: half the layer's strongest filter
        >>> small = fastsparse.prune(model, x)  # doctest: +SKIP
    """
    threshold = _checked(threshold, mode, criterion)
    model = unwrap(model)
    return threshold_as_(structure_of(model), model, example_inputs, threshold, mode, criterion)


def _checked(threshold: float, mode: str, criterion: str) -> float:
    """The threshold, checked with the mode and criterion before anything is copied."""
    threshold = check_real("threshold", threshold)
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"unknown threshold mode {mode!r}; valid: {', '.join(THRESHOLD_MODES)}")
    if criterion not in PRUNE_CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; valid: {', '.join(PRUNE_CRITERIA)}")
    return threshold


def threshold_as_(
    structure: Structure,
    model: nn.Module,
    example_inputs: Any,
    threshold: float,
    mode: str,
    criterion: str,
) -> Dict[str, torch.Tensor]:
    """`threshold_` of a model whose `structure_of` the caller has decided (arguments checked)."""
    groups = coupled_groups_as(structure, model, example_inputs)
    scores = filter_scores(groups, model, criterion)
    overall = max((float(s.max()) for s in scores if s.numel()), default=0.0)
    weak = {}
    for g, norms in zip(groups, scores):  # decide all first: zeroing changes the next layer
        if mode == "relative":
            limit = threshold * float(norms.max())
        elif mode == "global":
            limit = threshold * overall
        else:
            limit = threshold
        dead = norms <= limit
        dead[int(norms.argmax())] = False
        weak[g.root] = dead
    zero_channels_(groups, [weak[g.root] for g in groups])
    return weak


def threshold_and_prune(
    model: nn.Module,
    example_inputs: Any,
    threshold: float,
    mode: str = "relative",
    criterion: str = "filter_norm",
) -> PruneResult:
    """`threshold_` on a copy of `model`, then `fastsparse.prune`: the whole step from a trained
    model to a smaller one. `model` is not modified.

    Example:
        >>> from fastsparse.workflow.models import LeNet5
        >>> result = threshold_and_prune(LeNet5(), torch.randn(1, 1, 28, 28), 0.5)
        >>> result.kept["features.0"][1]  # filters before
        20
    """
    threshold = _checked(threshold, mode, criterion)
    model = unwrap(model)
    structure = structure_of(model)  # before the copy: a model too large to trace is refused
    work = copy.deepcopy(model)
    weak = threshold_as_(structure, work, example_inputs, threshold, mode, criterion)
    report = sparsity_report_as(structure, work, example_inputs, 0.0)
    pruned = prune_as(structure, work, example_inputs, 0.0, verify=True, strict=False)
    kept = {root: (int((~dead).sum()), dead.numel()) for root, dead in weak.items()}
    return PruneResult(pruned, work, report, kept)
