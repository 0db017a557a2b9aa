"""The public functions of every op: validate, then route once (DTensor | fused | oracle).

One module per op, named as in fastsparse/reference and fastsparse.backends.triton.
"""

from fastsparse.functional.feature_flow import feature_flow_penalty, feature_flow_value_and_grads
from fastsparse.functional.penalty import (
    PreparedPenaltyGrad,
    add_penalty_grad_,
    group_norms,
    penalty,
)
from fastsparse.functional.prox import adam_prox_, prox_, scale_groups_, sgd_prox_
from fastsparse.functional.selective_decay import relevance_thresholds, selective_decay_

__all__ = [
    "PreparedPenaltyGrad",
    "adam_prox_",
    "add_penalty_grad_",
    "feature_flow_penalty",
    "feature_flow_value_and_grads",
    "group_norms",
    "penalty",
    "prox_",
    "scale_groups_",
    "sgd_prox_",
    "relevance_thresholds",
    "selective_decay_",
]
