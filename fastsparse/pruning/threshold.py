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

from fastsparse.pruning.graph import coupled_groups, unwrap
from fastsparse.pruning.importance import PRUNE_CRITERIA, filter_scores
from fastsparse.pruning.prune import prune
from fastsparse.pruning.report import sparsity_report

THRESHOLD_MODES = ("relative", "absolute")


def prunable_weights(model: nn.Module, example_inputs: Any) -> List[Tuple[str, nn.Parameter]]:
    """(name, weight) of every conv/linear layer whose filters `fastsparse.prune` can remove.

    That is the root layer of each coupled group: every conv/linear layer except those whose
    outputs are the model's outputs (the classifier).
    """
    model = unwrap(model)
    return [
        (g.root, model.get_submodule(g.root).weight) for g in coupled_groups(model, example_inputs)
    ]


def filter_norms(model: nn.Module, example_inputs: Any) -> Dict[str, torch.Tensor]:
    """Layer name -> l2 norm of each filter (weight row) of every prunable layer."""
    return {
        name: w.detach().flatten(1).float().norm(dim=1)
        for name, w in prunable_weights(model, example_inputs)
    }


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


def threshold_and_prune(
    model: nn.Module,
    example_inputs: Any,
    threshold: float,
    mode: str = "relative",
    criterion: str = "filter_norm",
) -> PruneResult:
    """Zero the coupled groups of weak filters (see the module docstring), then prune.

    `threshold` is relative to each layer's largest score (``mode="relative"``) or absolute.

    `criterion` (one of :data:`PRUNE_CRITERIA`) scores the filters: ``"filter_norm"`` (the l2
    norm of the filter's weights), ``"bn_scale"`` (the largest |gamma| of the BatchNorms on its
    channel: network slimming), ``"group_norm"`` (the l2 norm of the whole coupled group:
    OICSR). `model` is not modified. In every layer the filter with the highest score stays.
    """
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"unknown threshold mode {mode!r}; valid: {', '.join(THRESHOLD_MODES)}")
    if criterion not in PRUNE_CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; valid: {', '.join(PRUNE_CRITERIA)}")
    work = copy.deepcopy(unwrap(model))
    groups = coupled_groups(work, example_inputs)
    scores = filter_scores(groups, work, criterion)
    weak = {}
    for g, norms in zip(groups, scores):  # decide all first: zeroing changes the next layer
        limit = threshold * float(norms.max()) if mode == "relative" else threshold
        dead = norms <= limit
        dead[int(norms.argmax())] = False
        weak[g.root] = dead
    with torch.no_grad():
        for g in groups:
            for m in g.members:
                index = m.index[weak[g.root][m.group]]
                if index.numel():
                    m.param.index_fill_(m.dim, index.to(m.param.device), 0.0)
    report = sparsity_report(work, example_inputs, threshold=0.0)
    pruned = prune(work, example_inputs, threshold=0.0)
    kept = {root: (int((~dead).sum()), dead.numel()) for root, dead in weak.items()}
    return PruneResult(pruned, work, report, kept)
