"""From a sparse model to a smaller one: decide once whether it is a decoder transformer or
traced (structure), trace coupled groups (graph; decoder blocks: transformer), score channels
(importance), zero the weak ones (threshold), remove them for real (prune, surgery), measure
(report).
"""

from fastsparse.pruning.common import LeftWholeWarning, PruningError
from fastsparse.pruning.graph import coupled_groups
from fastsparse.pruning.importance import select_channels, zero_channels_
from fastsparse.pruning.prune import load_pruned, prune
from fastsparse.pruning.report import LayerSparsity, SparsityReport, count_macs, sparsity_report
from fastsparse.pruning.threshold import PruneResult, threshold_, threshold_and_prune
from fastsparse.pruning.transformer import prune_transformer, transformer_groups

__all__ = [
    "LayerSparsity",
    "LeftWholeWarning",
    "PruneResult",
    "PruningError",
    "SparsityReport",
    "count_macs",
    "coupled_groups",
    "load_pruned",
    "prune",
    "select_channels",
    "sparsity_report",
    "threshold_",
    "threshold_and_prune",
    "transformer_groups",
    "prune_transformer",
    "zero_channels_",
]
