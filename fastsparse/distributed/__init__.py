"""Sharded parameters (DTensor: FSDP2, tensor parallelism, HSDP): every op on DTensors, exact.

`fastsparse.penalty`, `add_penalty_grad_`, `group_norms`, `prox_` and `scale_groups_` validate
their input and route DTensors here: the parameters of FSDP2's `fully_shard` (placement
Shard(0); HSDP: Replicate, Shard(0)), of tensor parallelism (Shard(0) or Shard(1)) or replicated
ones (Replicate), on any device mesh. The result is exact: the value is the single-process
value, on every rank, and each rank's gradient shard is the matching slice of the
single-process gradient; the prox steps apply per-group factors of the complete group norms to
the local shards. The functions here trust their arguments (checked once, in
fastsparse/functional): user code calls the `fastsparse` functions, which take DTensors as
they are.

The modules, by concern: `mesh` (placements, local ranges, the all-reduce), `sharded` (local
shards as segments; how their statistics are completed across ranks), `penalty` and `prox` (the
ops on DTensors). This package imports only the layers below it (the oracle, the ops, the
engine, the backend resolver, core), never fastsparse.functional.

Example (under torchrun; see examples/fsdp_llm.py)::

    model = fully_shard(model)                    # parameters become DTensors, Shard(0)
    params = [p for p in model.parameters() if p.dim() == 2]  # keep the sharded parameters:
    loss = criterion(model(x), y) + 1e-4 * fastsparse.penalty(params, "group_lasso")
    loss.backward()                               # each rank gets its gradient shard

Plain tensors among DTensors count as replicated (the same on every rank): between forward and
backward, FSDP2 leaves the root module's parameters unsharded plain tensors, whose penalty
gradient then goes through FSDP2's reduce-scatter (an average of equal values). Holding the
sharded parameters (taken after `fully_shard`, as the optimizer does) avoids that full-size work.

DDP (`DistributedDataParallel`): parameters are plain tensors, identical on every rank, so
nothing here is needed. The autograd path (penalty in the loss) works as is: its gradient is
all-reduced with the rest, and since it is the same on every rank the average leaves it
unchanged. Call the in-place path after `loss.backward()` returns (DDP's gradient all-reduce has
then completed) and before `optimizer.step()`, on every rank: every rank adds the same gradient
to the same averaged gradient, so the parameters stay identical, with no communication. (Not
before, in a comm hook: a hook sees flattened buckets, not whole tensors, and the across-group
kinds need every tensor's statistics. With gradient accumulation under `no_sync`, call it once
per optimizer step.)
"""

from fastsparse.distributed.penalty import (
    add_coupled_penalty_grad_,
    add_penalty_grad_,
    coupled_group_norms,
    coupled_penalty,
    group_norms,
    penalty,
)
from fastsparse.distributed.prox import coupled_prox_, coupled_scale_groups_, prox_, scale_groups_

__all__ = [
    "add_coupled_penalty_grad_",
    "add_penalty_grad_",
    "coupled_group_norms",
    "coupled_penalty",
    "coupled_prox_",
    "coupled_scale_groups_",
    "group_norms",
    "penalty",
    "prox_",
    "scale_groups_",
]
