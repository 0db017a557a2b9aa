"""Attention heads and MLP neurons of decoder transformers (Llama; Mistral and Qwen2 with
grouped-query attention), found from the modules' structure and removed for real.

A decoder block is a module with ``self_attn`` (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``
and ``head_dim``) and ``mlp`` (``gate_proj``, ``up_proj``, ``down_proj``), as transformers'
Llama-family models are built; nothing of transformers is imported. Their channels mix across the
residual stream, so the dependency graph of `fastsparse.pruning.graph` is not used: the groups are
the ones of `attention_head_groups` and `mlp_neuron_groups`, the same the penalty trains. Whether a
model is one is decided once per call (`fastsparse.pruning.structure`); the functions below that
take `names` (its blocks' module names) are given that decision.

Dead rule (lossless, as for filters: what produces the channel is zero). A key/value group (one
k/v head with the query heads that share it) is dead when its q, k and v rows (and biases) are
zero: its value rows are zero, so its heads output zero whatever the attention weights, and the
o_proj columns multiply zeros. A neuron is dead when its gate and up rows are zero (SiLU(0) * 0).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from fastsparse import reference
from fastsparse.core.checks import check_real
from fastsparse.core.groups import (
    CoupledGroup,
    CoupledMember,
    attention_head_groups,
    mlp_neuron_groups,
)
from fastsparse.pruning.common import (
    PruningError,
    check_outputs_unchanged,
    copy_flags,
    eval_forward,
    output_tensors,
)
from fastsparse.pruning.importance import producer_norms, removable_masks, zero_channels_

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def decoder_blocks(model: nn.Module) -> List[Tuple[str, nn.Module, nn.Module]]:
    """(block name, attention module, MLP module) of every decoder block, in module order."""
    blocks = []
    for name, module in model.named_modules():
        attn, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
        if (
            isinstance(attn, nn.Module)
            and isinstance(mlp, nn.Module)
            and all(isinstance(getattr(attn, p, None), nn.Linear) for p in _ATTENTION)
            and all(isinstance(getattr(mlp, p, None), nn.Linear) for p in _MLP)
            and isinstance(getattr(attn, "head_dim", None), int)
        ):
            blocks.append((name, attn, mlp))
    return blocks


def blocks_named(model: nn.Module, names) -> List[Tuple[str, nn.Module, nn.Module]]:
    """(block name, attention module, MLP module) of the blocks `names` of `model` (the names
    `decoder_blocks` found on it or on a model it was copied from)."""
    return [(n, model.get_submodule(n).self_attn, model.get_submodule(n).mlp) for n in names]


def _heads(attn: nn.Module) -> Tuple[int, int]:
    d = attn.head_dim
    return attn.q_proj.out_features // d, attn.k_proj.out_features // d


def transformer_groups(model: nn.Module) -> Dict[str, List[CoupledGroup]]:
    """The coupled groups of every decoder block: ``{"heads": [...], "neurons": [...]}``.

    One CoupledGroup of key/value groups per block (GQA: a k/v head with its query heads; plain
    multi-head attention: one head) and one of MLP neurons per block, named after the model's
    parameters. Use them as `groups=` of the penalty, `group_norms` and `prox_`; `prune` removes
    the dead ones.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM  # doctest: +SKIP
        >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2))  # +SKIP
        >>> groups = transformer_groups(model)  # doctest: +SKIP
        >>> fastsparse.penalty(None, "group_lasso", groups=groups["heads"])  # doctest: +SKIP
    """
    return block_groups(decoder_blocks(model))


def block_groups(blocks) -> Dict[str, List[CoupledGroup]]:
    """`transformer_groups` of the `blocks` given ((name, attention, MLP), as `decoder_blocks`
    lists them)."""
    heads, neurons = [], []
    for name, attn, mlp in blocks:
        prefix = f"{name}." if name else ""
        num_heads, num_kv = _heads(attn)
        names = tuple(f"{prefix}self_attn.{p}.weight" for p in _ATTENTION)
        group = attention_head_groups(
            *(getattr(attn, p).weight for p in _ATTENTION), num_heads, num_kv, names
        )
        extra = []  # biases of q, k, v (Qwen2) go with their rows
        for member, proj in zip(group.members[:3], _ATTENTION[:3]):
            bias = getattr(attn, proj).bias
            if bias is not None:
                extra.append(
                    CoupledMember(
                        f"{prefix}self_attn.{proj}.bias", bias, 0, member.index, member.group
                    )
                )
        heads.append(CoupledGroup(group.root, group.num_groups, group.members + tuple(extra)))
        names = tuple(f"{prefix}mlp.{p}.weight" for p in _MLP)
        neurons.append(mlp_neuron_groups(*(getattr(mlp, p).weight for p in _MLP), names))
    return {"heads": heads, "neurons": neurons}


def neuron_norms(groups: List[CoupledGroup]) -> List[torch.Tensor]:
    """Per MLP neuron group, the [G] norms that say whether a neuron is dead: the smaller of its
    gate and up rows' l2 norms. A neuron outputs silu(gate x) * (up x): zero when either row is
    zero (silu(0) = 0), whatever the other row and its down_proj column hold."""
    out = []
    for cg in groups:
        rows = [m for m in cg.members if m.dim == 0]
        if len(rows) != 2:  # not a gated MLP: its producers together
            out.append(producer_norms([cg])[0])
            continue
        gate, up = reference.coupled_group_norms(
            [CoupledGroup(cg.root, cg.num_groups, (m,)) for m in rows]
        )
        out.append(torch.minimum(gate, up))
    return out


def removal_norms(groups: Dict[str, List[CoupledGroup]]) -> Dict[str, List[torch.Tensor]]:
    """Per kind of `block_groups`, the [G] norms that say whether a group is dead: the producers'
    norm of each key/value group (q, k, v rows and biases), `neuron_norms` of each neuron."""
    return {"heads": producer_norms(groups["heads"]), "neurons": neuron_norms(groups["neurons"])}


def _sliced(layer: nn.Linear, rows=None, columns=None) -> nn.Linear:
    weight = layer.weight.detach()
    bias = None if layer.bias is None else layer.bias.detach()
    if rows is not None:
        weight = weight[rows]
        bias = None if bias is None else bias[rows]
    if columns is not None:
        weight = weight[:, columns]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    new = new.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def prune_transformer(
    model: nn.Module, example_inputs: Any = None, threshold: float = 0.0, *, verify: bool = True
) -> nn.Module:
    """A copy of a decoder transformer without its dead attention groups and MLP neurons.

    Each block's key/value groups (GQA: whole groups, so the query-per-key ratio holds) whose
    q/k/v rows' l2 norm is <= `threshold`, and neurons whose gate or up row's norm is (see
    `neuron_norms`), are removed: q/k/v rows and o_proj
    columns, gate/up rows and down_proj columns, the per-module head and size attributes updated.
    Every block keeps at least one of each. `model` is not modified; `forward` and `generate`
    work on the result. With `example_inputs`, the outputs are checked (eval mode) before it is
    returned. Save it with ``torch.save(pruned)``, or its state dict and
    ``fastsparse.load_pruned(fresh_model, state_dict)``.
    """
    threshold = check_real("threshold", threshold)
    names = tuple(name for name, _, _ in decoder_blocks(model))
    if not names:
        raise PruningError(f"{type(model).__name__} has no decoder block with self_attn and mlp")
    return prune_blocks(model, names, example_inputs, threshold, verify=verify)


def prune_blocks(
    model: nn.Module, names, example_inputs: Any, threshold: float, *, verify: bool
) -> nn.Module:
    """`prune_transformer` of the decoder blocks `names` of `model` (threshold checked)."""
    work = copy.deepcopy(model)
    blocks = blocks_named(work, names)
    groups = block_groups(blocks)
    norms = removal_norms(groups)
    removed = {kind: removable_masks(norms[kind], threshold) for kind in groups}
    expected = None
    if verify and example_inputs is not None:
        # What the pruned model must compute: the model with its dead groups zeroed. Zeroed in
        # the working copy itself (one copy of the model, not two): the slicing below removes
        # exactly the zeroed rows and columns and copies the others unchanged.
        for kind in groups:
            zero_channels_(groups[kind], removed[kind])
        expected = output_tensors(eval_forward(work, example_inputs))
    with torch.no_grad():
        for (_, attn, mlp), heads, neurons in zip(blocks, removed["heads"], removed["neurons"]):
            d = attn.head_dim
            num_heads, num_kv = _heads(attn)
            per_kv = num_heads // num_kv
            kept_kv = torch.nonzero(~heads).flatten()
            kv_rows = (kept_kv[:, None] * d + torch.arange(d)).flatten()
            q_heads = (kept_kv[:, None] * per_kv + torch.arange(per_kv)).flatten()
            q_rows = (q_heads[:, None] * d + torch.arange(d)).flatten()
            attn.q_proj = _sliced(attn.q_proj, rows=q_rows)
            attn.k_proj = _sliced(attn.k_proj, rows=kv_rows)
            attn.v_proj = _sliced(attn.v_proj, rows=kv_rows)
            attn.o_proj = _sliced(attn.o_proj, columns=q_rows)
            for attr, value in (("num_heads", len(q_heads)), ("num_key_value_heads", len(kept_kv))):
                if hasattr(attn, attr):  # older transformers read these in forward
                    setattr(attn, attr, value)
            kept = torch.nonzero(~neurons).flatten()
            mlp.gate_proj = _sliced(mlp.gate_proj, rows=kept)
            mlp.up_proj = _sliced(mlp.up_proj, rows=kept)
            mlp.down_proj = _sliced(mlp.down_proj, columns=kept)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = len(kept)
    copy_flags(work, model)
    if expected is not None:
        got = output_tensors(eval_forward(work, example_inputs))
        hint = "a layer the head and neuron groups do not cover probably mixes their channels"
        check_outputs_unchanged(model, expected, got, hint)
    return work
