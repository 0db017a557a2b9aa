"""The oracle: plain PyTorch for every op of the contract, one module per op. Only oracle
functions are exported here; the contract's constants live in fastsparse.core.contract.

Every backend is tested against these functions, and the benchmarks use them as the "eager
oracle" provider; they are imported, never copied.

    >>> import torch
    >>> from fastsparse import reference
    >>> w = torch.randn(8, 3, 3, 3, requires_grad=True)
    >>> reference.penalty(w, "l1l2").backward()
"""

from fastsparse.reference.feature_flow import feature_flow, feature_flow_grad
from fastsparse.reference.penalty import (
    coupled_group_norms,
    coupled_group_stats,
    coupled_matrix,
    coupled_penalty,
    coupled_penalty_grad,
    group_coefficients,
    group_norms,
    group_stats,
    grouped_view,
    penalty,
    penalty_grad,
    rebind,
    tensor_penalty,
)
from fastsparse.reference.prox import (
    adam_prox_,
    prox_,
    prox_thresholds,
    scale_groups_,
    sgd_prox_,
    ungroup,
)
from fastsparse.reference.selective_decay import (
    quantile_threshold,
    relevance,
    relevance_thresholds,
    selective_decay_grad,
    selective_decay_penalty,
)

__all__ = [
    "adam_prox_",
    "coupled_group_norms",
    "coupled_group_stats",
    "coupled_matrix",
    "coupled_penalty",
    "coupled_penalty_grad",
    "feature_flow",
    "feature_flow_grad",
    "group_coefficients",
    "group_norms",
    "group_stats",
    "grouped_view",
    "penalty",
    "penalty_grad",
    "rebind",
    "tensor_penalty",
    "ungroup",
    "prox_",
    "prox_thresholds",
    "scale_groups_",
    "sgd_prox_",
    "quantile_threshold",
    "relevance",
    "relevance_thresholds",
    "selective_decay_grad",
    "selective_decay_penalty",
]
