"""fastsparse: fused kernels for structured-sparsity regularization and filter pruning.

Importing this package never imports Triton and never initializes CUDA; kernels load on first use.
The layers, from the bottom: `core` (contract, validators, groups, layout), `backends` (the
resolver, Triton and native kernels), `engine` (every op from a backend's primitives), `ops` (the
torch.library ops) beside `reference` (the oracle), `distributed` (DTensors), `functional` (the
public functions), `pruning`, `methods` and `optim` (the training-loop interfaces), `workflow` and
`integrations`.

    >>> import torch, fastsparse
    >>> w = torch.randn(16, 8, 3, 3, requires_grad=True)
    >>> fastsparse.penalty(w, "l1l2").backward()
"""

from fastsparse.backends import BACKENDS
from fastsparse.core.contract import ACROSS_GROUP_KINDS, GROUPINGS, KINDS, PROX_KINDS
from fastsparse.core.groups import CoupledGroup
from fastsparse.functional import add_penalty_grad_, group_norms, penalty, prox_, scale_groups_
from fastsparse.methods import Regularizer
from fastsparse.optim import Rule, SparseOptimizer
from fastsparse.pruning import (
    PruningError,
    SparsityReport,
    count_macs,
    coupled_groups,
    load_pruned,
    prune,
    sparsity_report,
    threshold_,
    threshold_and_prune,
)

__version__ = "0.1.0"

__all__ = [
    "ACROSS_GROUP_KINDS",
    "BACKENDS",
    "GROUPINGS",
    "KINDS",
    "PROX_KINDS",
    "CoupledGroup",
    "PruningError",
    "Regularizer",
    "Rule",
    "SparseOptimizer",
    "SparsityReport",
    "__version__",
    "add_penalty_grad_",
    "count_macs",
    "coupled_groups",
    "group_norms",
    "load_pruned",
    "penalty",
    "prox_",
    "prune",
    "scale_groups_",
    "sparsity_report",
    "threshold_",
    "threshold_and_prune",
]
