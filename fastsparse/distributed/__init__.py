"""Sharded parameters (DTensor: FSDP2, tensor parallelism, HSDP): every op on DTensors, exact.

`fastsparse.penalty`, `add_penalty_grad_`, `group_norms` and `prox_` route DTensor inputs here
after validating them; see fastsparse/distributed/dtensor.py for how the statistics of a group's
shards are completed across ranks. This package imports only fastsparse.core and the oracle.
"""

from fastsparse.core.groups import attention_head_groups, mlp_neuron_groups
from fastsparse.distributed.dtensor import (
    add_coupled_penalty_grad_,
    add_penalty_grad_,
    coupled_group_norms,
    coupled_penalty,
    coupled_prox_,
    coupled_scale_groups_,
    group_norms,
    penalty,
    prox_,
    scale_groups_,
)

__all__ = [
    "add_coupled_penalty_grad_",
    "add_penalty_grad_",
    "attention_head_groups",
    "coupled_group_norms",
    "coupled_penalty",
    "coupled_prox_",
    "coupled_scale_groups_",
    "group_norms",
    "mlp_neuron_groups",
    "penalty",
    "prox_",
    "scale_groups_",
]
