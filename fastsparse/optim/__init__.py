"""Sparsity in the optimizer step: `SparseOptimizer` wraps any torch optimizer and applies
`Rule`s (penalties before the step, proximal steps and target sparsities after it, healing).

    >>> import torch
    >>> from torch import nn
    >>> from fastsparse.optim import Rule, SparseOptimizer
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> opt = SparseOptimizer(
    ...     torch.optim.AdamW(model.parameters(), lr=1e-3),
    ...     model,
    ...     [Rule(prox="group_lasso", strength=1e-2)],
    ... )
"""

from fastsparse.optim.optimizer import SparseOptimizer
from fastsparse.optim.rules import RULE_GROUPINGS, RULE_PROX_KINDS, Rule
from fastsparse.optim.sparsifier import Sparsifier

__all__ = ["RULE_GROUPINGS", "RULE_PROX_KINDS", "Rule", "SparseOptimizer", "Sparsifier"]
