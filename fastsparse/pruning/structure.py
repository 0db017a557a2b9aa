"""Which way a model is pruned, decided once per public call.

A decoder transformer (blocks with ``self_attn`` q/k/v/o and ``mlp`` gate/up/down: the Llama
family) is pruned by heads and neurons found from its modules (`fastsparse.pruning.transformer`);
any other model is traced with the dependency graph (`fastsparse.pruning.graph`), which is
refused for models too large to trace in bounded time and memory. The public entry points
(`coupled_groups`, `prune`, `sparsity_report`, `threshold_`, `threshold_and_prune`) call
`structure_of` once and pass the :class:`Structure` down: it is valid for copies of the model,
and pruning keeps it (layers lose channels, blocks stay blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from torch import nn

from fastsparse.pruning.common import PruningError
from fastsparse.pruning.transformer import decoder_blocks

# Tracing and grouping cost time and memory in proportion to the model (ViT-B/16, 86 M parameters:
# about 8 s and 2.3 GB on 2 cores), and pruning copies it first: larger models are refused before
# any copy is made. Raise it to trace larger models on a larger machine.
MAX_TRACED_PARAMETERS = 150_000_000


def check_traceable(model: nn.Module) -> None:
    """Raise PruningError if `model` has more than MAX_TRACED_PARAMETERS parameters."""
    count = sum(p.numel() for p in model.parameters())
    if count > MAX_TRACED_PARAMETERS:
        raise PruningError(
            f"{type(model).__name__} has {count / 1e6:.0f} M parameters, more than the "
            f"{MAX_TRACED_PARAMETERS / 1e6:.0f} M the dependency graph is traced for in bounded "
            "time and memory; prune its blocks one at a time, or raise "
            "fastsparse.pruning.structure.MAX_TRACED_PARAMETERS"
        )


@dataclass(frozen=True)
class Structure:
    """How a model is pruned: by its decoder blocks, or traced (no decoder block).

    Attributes:
        block_names: module names of its decoder blocks, in module order (empty: traced).
    """

    block_names: Tuple[str, ...] = ()

    @property
    def is_decoder(self) -> bool:
        return bool(self.block_names)


def structure_of(model: nn.Module) -> Structure:
    """Decide how `model` is pruned, before anything is copied or traced.

    Raises:
        PruningError: `model` is not a decoder transformer and has more than
            MAX_TRACED_PARAMETERS parameters.

    Example::

        >>> from fastsparse.workflow.models import LeNet5
        >>> structure_of(LeNet5())
        Structure(block_names=())
    """
    names = tuple(name for name, _, _ in decoder_blocks(model))
    if not names:
        check_traceable(model)
    return Structure(names)
