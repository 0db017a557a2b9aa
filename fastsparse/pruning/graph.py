"""Coupled groups of a model, traced with Torch-Pruning's dependency graph.

Removing out-channel c of a layer also removes its bias, the following BatchNorm's scale, shift
and running statistics, the in-channel slice c of every consumer (several Linear columns after a
flatten), the depthwise filter that carries c, and, through residual additions, channel c of
every layer added to it. `coupled_groups` traces these with Torch-Pruning's ``DependencyGraph``
and returns them as :class:`fastsparse.CoupledGroup` (one per root layer, G groups each).

**Supported layers.** ``nn.Conv1d/2d/3d`` (plain, depthwise, or grouped: as many channels go
from each conv group), ``nn.Linear``, ``nn.BatchNorm1d/2d/3d`` and parameter-free ops
(activations, pooling, flatten, add, cat, ...). A coupled group touching any other layer with
parameters (LayerNorm, GroupNorm and RMSNorm normalize across channels; transposed convs,
``nn.MultiheadAttention``, raw ``nn.Parameter`` s...), passing through a reshape that splits a
dimension (attention heads, channel shuffles), or whose indices blow up in the graph
(`INDEX_BUDGET`) is left whole, with the reason, naming the layer, in `Traced.skipped` (and the
sparsity report, and `prune`'s LeftWholeWarning); the rest of the model is still pruned.
Removing the channels of a traced group is `fastsparse.pruning.surgery`'s.
"""

from __future__ import annotations

import copy
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from fastsparse.core.groups import CoupledGroup, CoupledMember
from fastsparse.pruning.common import (
    BATCHNORM,
    CONV,
    SUPPORTED,
    PruningError,
    is_depthwise,
    is_grouped,
    normalizes_across_channels,
    output_tensors,
    run_model,
)
from fastsparse.pruning.structure import Structure, structure_of
from fastsparse.pruning.transformer import block_groups, blocks_named


@dataclass
class Traced:
    """A dependency graph built on `model` (a private copy) and its coupled groups."""

    model: nn.Module
    graph: Any  # torch_pruning.DependencyGraph
    groups: List[CoupledGroup]
    roots: List[nn.Module]  # root module of each group
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (root layer, why), left whole
    # Per group, the grouped convolutions its channels enter or leave: (conv group of each
    # channel [G], -1 where the channel is not one of that conv's; number of conv groups).
    balance: List[List[Tuple[torch.Tensor, int]]] = field(default_factory=list)


def trace(model: nn.Module, example_inputs: Any, strict: bool = False) -> Traced:
    """Build Torch-Pruning's dependency graph on `model` (modified: use a copy) and its groups.

    A group that touches a layer whose channels cannot be removed losslessly is left whole and
    listed in `skipped` with the reason (`strict`: raise PruningError instead). Whether the model
    is small enough to trace is the caller's to check, before it copies the model
    (`fastsparse.pruning.structure.structure_of`)."""
    import torch_pruning as tp

    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            raise PruningError(
                f"layer {name!r} ({type(module).__name__}) is parametrized "
                f"({', '.join(module.parametrizations)}); remove the parametrization first "
                "(torch.nn.utils.parametrize.remove_parametrizations) to prune it"
            )
    outputs: List[Any] = []

    def forward_fn(m, x):
        out = run_model(m, x)
        outputs.append(out)
        # Only the output tensors: a transformers ModelOutput also holds caches and other
        # objects the dependency graph cannot follow.
        return tuple(output_tensors(out))

    for p in model.parameters():  # tracing follows autograd: frozen layers must be seen too
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs, forward_fn=forward_fn, verbose=False
            )
    except Exception as e:
        if any(
            frame.name == "update_reshape_index_mapping"
            for frame in traceback.extract_tb(e.__traceback__)
        ):
            raise PruningError(
                f"cannot trace {type(model).__name__}: the dependency graph cannot follow its "
                "channels through a reshape that moves them to another dimension (such as a "
                f"channel shuffle: view, transpose, view) ({type(e).__name__}: {e})"
            ) from e
        raise PruningError(
            f"cannot trace {type(model).__name__} with the example inputs ({type(e).__name__}: {e})"
        ) from e
    output_fns = {t.grad_fn for out in outputs for t in output_tensors(out)}
    output_fns.discard(None)
    if not output_fns:
        raise PruningError(
            f"cannot trace {type(model).__name__}: no output depends on its parameters"
        )

    module_names = {id(m): n for n, m in model.named_modules()}
    param_names = {id(p): n for n, p in model.named_parameters()}
    layers = [n for n, m in model.named_modules() if isinstance(m, (CONV, nn.Linear))]
    found, skipped = [], []
    for root, tp_group, why in _root_groups(graph, (CONV, nn.Linear)):
        if tp_group is None:
            if strict:
                raise PruningError(why)
            skipped.append((module_names.get(id(root), type(root).__name__), why))
            continue
        try:
            translated = _coupled_group(
                graph, tp_group, module_names, param_names, output_fns, layers
            )
        except PruningError as e:
            if strict:
                raise
            skipped.append((module_names.get(id(root), type(root).__name__), str(e)))
            continue
        if translated is not None:
            found.append((*translated, root))
    found.sort(key=lambda entry: layers.index(entry[0].root))  # in module order
    skipped.sort(key=lambda pair: layers.index(pair[0]) if pair[0] in layers else len(layers))
    skipped += _foreign_layers(model, [g for g, _, _ in found])
    return Traced(
        model,
        graph,
        [g for g, _, _ in found],
        [r for _, _, r in found],
        skipped,
        [b for _, b, _ in found],
    )


def _foreign_layers(model: nn.Module, groups: List[CoupledGroup]) -> List[Tuple[str, str]]:
    """(first layer, why) per type of layer (a weight matrix of its own, or attention) that no
    group touches and that is not a layer kind fastsparse slices (transformers' Conv1D in GPT-2,
    say): without this, a model made of them would come back unchanged without a word."""
    touched = {m.name for g in groups for m in g.members}
    known = (CONV, nn.Linear, BATCHNORM, nn.Embedding)
    seen: Dict[str, List[str]] = {}
    for name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        weight = params.get("weight")
        layer_like = isinstance(module, nn.MultiheadAttention) or (
            weight is not None and weight.dim() >= 2
        )
        if not layer_like or isinstance(module, known) or normalizes_across_channels(module):
            continue
        own = [f"{name}.{n}" if name else n for n in params]
        if any(p in touched for p in own):
            continue
        seen.setdefault(type(module).__name__, []).append(name)
    return [
        (
            names[0],
            _attention_reason(names[0])
            if kind == "MultiheadAttention"
            else f"{len(names)} {kind} layer(s) ({names[0]!r}, ...) are not supported: "
            f"fastsparse removes channels of {SUPPORTED} only",
        )
        for kind, names in seen.items()
    ]


def _attention_reason(name: str) -> str:
    return (
        f"nn.MultiheadAttention {name!r} cannot be pruned: its embed_dim is its "
        "input, its output and, divided by num_heads, its heads' width at once, so neither a "
        "channel nor a head can be removed from it"
    )


# How many channel indices following one layer's out-channels through the graph may produce
# before the group is given up. A flatten into a classifier makes channels x positions indices
# (VGG: 512 x 49); reshapes the graph misreads as flattens (Swin's window partitions) multiply
# them at every block: tens of GB and minutes in Torch-Pruning's grouping (Swin-T, 224x224).
INDEX_BUDGET = 2_000_000


def _root_groups(graph, root_types):
    """(root layer, Torch-Pruning group, None), or (root, None, why) for a layer whose channels
    cannot be followed within INDEX_BUDGET, for every layer of `root_types` whose out-channels
    are not in an earlier group."""
    visited = set()
    for module in list(graph.module2node):
        if not isinstance(module, root_types) or id(module) in visited:
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        if not _fits(graph, module, INDEX_BUDGET):
            visited.add(id(module))
            yield (
                module,
                None,
                "following this layer's channels through the dependency graph exceeds "
                f"{INDEX_BUDGET:,} indices: reshapes the dependency graph misreads (window "
                "partitions, heads) multiply them, and the group would be wrong anyway",
            )
            continue
        channels = list(range(pruner.get_out_channels(module)))
        group = graph.get_pruning_group(module, pruner.prune_out_channels, channels)
        for item in group:
            if graph.is_out_channel_pruning_fn(item.dep.handler):
                visited.add(id(item.dep.target.module))
        yield module, group, None


def _fits(graph, root, budget: int) -> bool:
    """Whether following `root`'s out-channels through the graph's dependencies (as grouping
    does: each dependency maps the indices on) stays within `budget` indices in all."""
    from torch_pruning import _helpers

    pruner = graph.get_pruner_of_module(root)
    start = [_helpers._HybridIndex(idx=i, root_idx=i) for i in range(pruner.get_out_channels(root))]
    stack = [(graph.module2node[root], pruner.prune_out_channels, start)]
    seen: Dict[Tuple[int, Any], set] = {}
    spent = 0
    while stack:
        node, fn, idxs = stack.pop()
        for dep in node.dependencies:
            if not dep.is_triggered_by(fn):
                continue
            new = idxs
            for mapping in dep.index_mapping:
                if mapping is None:
                    continue
                # A flatten mapping makes `stride` indices of each: count before making them.
                growth = getattr(mapping, "_stride", 1) if not getattr(mapping, "reverse", 1) else 1
                if spent + len(new) * growth > budget:
                    return False
                new = mapping(new)
            spent += len(new)
            if spent > budget:
                return False
            key = (id(dep.target), dep.handler)
            plain = {i.idx for i in new}
            done = seen.setdefault(key, set())
            if not new or plain <= done:
                continue
            done |= plain
            stack.append((dep.target, dep.handler, new))
    return True


def _coupled_group(
    graph, tp_group, module_names, param_names, output_fns, layer_names
) -> Optional[Tuple[CoupledGroup, List[Tuple[torch.Tensor, int]]]]:
    """Translate one Torch-Pruning group into a CoupledGroup and its grouped-conv constraints
    (None when it is not prunable)."""
    from torch_pruning import ops

    dummy = (
        ops.OPTYPE.ELEMENTWISE,
        ops.OPTYPE.CONCAT,
        ops.OPTYPE.SPLIT,
        ops.OPTYPE.RESHAPE,
        ops.OPTYPE.UNBIND,
        ops.OPTYPE.EXPAND,
        ops.OPTYPE.SLICE,
        ops.OPTYPE.OUTPUT,
    )
    root = tp_group[0].dep.target.module
    num_groups = graph.get_out_channels(root)
    # (id(param), dim) -> (name, param, dim, {slice index: group id})
    slices: Dict[Tuple[int, int], Tuple[str, torch.Tensor, int, Dict[int, int]]] = {}
    # (id(conv), out side?) -> (conv group of each channel, number of conv groups)
    balance: Dict[Tuple[int, bool], Tuple[torch.Tensor, int]] = {}
    for item in tp_group:
        if isinstance(item.dep.target.module, nn.MultiheadAttention):
            name = module_names.get(id(item.dep.target.module), "MultiheadAttention")
            raise PruningError(_attention_reason(name))
    for item in tp_group:
        node, handler = item.dep.target, item.dep.handler
        module = node.module
        changes_out = graph.is_out_channel_pruning_fn(handler)
        changes_in = graph.is_in_channel_pruning_fn(handler)
        if node.type == ops.OPTYPE.OUTPUT or (changes_out and node.grad_fn in output_fns):
            return None  # the channels are model outputs
        if node.type == ops.OPTYPE.RESHAPE:
            split = _split_by_reshape(node.grad_fn)
            if split is not None:
                raise PruningError(
                    f"a reshape from {split[0]} to {split[1]} splits a dimension of these "
                    "channels' tensor (attention heads, a channel shuffle, windows): the "
                    "dependency graph does not follow channels through it"
                )
        if node.type in dummy:
            continue
        if changes_in and not node.inputs and isinstance(module, (CONV, nn.Linear, BATCHNORM)):
            return None  # the channels are the model's input channels
        if isinstance(module, nn.Parameter):
            raise PruningError(
                f"parameter {param_names.get(id(module), tuple(module.shape))!r} is used outside "
                f"a supported layer ({SUPPORTED}); it cannot be pruned"
            )
        name = module_names.get(id(module), type(module).__name__)
        if isinstance(module, CONV):
            if module.transposed or (
                module.groups == module.out_channels > 1 and not is_depthwise(module)
            ):
                raise PruningError(
                    f"layer {name!r} ({module}) is not supported: transposed convolutions and "
                    f"grouped ones with one out-channel per group cannot be pruned yet "
                    f"(supported: {SUPPORTED})"
                )
            if is_grouped(module):
                # Each conv group must keep as many channels as the others; which channel is in
                # which conv group is recorded for `balanced_channels`.
                channels = module.out_channels if changes_out else module.in_channels
                size = channels // module.groups
                blocks = balance.setdefault(
                    (id(module), changes_out),
                    (torch.full((num_groups,), -1, dtype=torch.int64), module.groups),
                )[0]
                for idx, root_idx in zip(item.idxs, item.root_idxs):
                    blocks[int(root_idx)] = int(idx) // size
                if not changes_out:
                    # Its in-channel c is read by the rows of one conv group only, a slice a
                    # member (a whole column of the weight) cannot express; it is removed with
                    # the channel all the same (`remove_channels`).
                    continue
            out_rows = changes_out or is_depthwise(module)
            dims = {"weight": 0, "bias": 0} if out_rows else {"weight": 1}
        elif isinstance(module, nn.Linear):
            dims = {"weight": 0, "bias": 0} if changes_out else {"weight": 1}
        elif isinstance(module, BATCHNORM):
            dims = {"weight": 0, "bias": 0}
        elif normalizes_across_channels(module):
            raise PruningError(
                f"layer {name!r} ({type(module).__name__}) normalizes across channels: removing "
                "one, even an all-zero one, changes the mean and variance the others are "
                "normalized by, so it is not lossless"
            )
        else:
            raise PruningError(
                f"layer {name!r} ({type(module).__name__}) is not supported: removing a channel "
                f"from it is not lossless or not implemented (supported: {SUPPORTED})"
            )
        for attr, dim in dims.items():
            param = getattr(module, attr, None)
            if not isinstance(param, torch.Tensor):
                continue
            entry = (param_names[id(param)], param, dim, {})
            mapping = slices.setdefault((id(param), dim), entry)[3]
            for idx, root_idx in zip(item.idxs, item.root_idxs):
                mapping.setdefault(int(idx), int(root_idx))
    # Members in parameter (module) order; the root is the first conv/linear whose out-channels
    # are in the group, so that group g is its out-channel g.
    order = {name: i for i, name in enumerate(param_names.values())}
    members = []
    for name, param, dim, mapping in sorted(slices.values(), key=lambda e: (order[e[0]], e[2])):
        index = sorted(mapping)
        members.append(
            CoupledMember(
                name,
                param,
                dim,
                torch.tensor(index, dtype=torch.int64),
                torch.tensor([mapping[i] for i in index], dtype=torch.int64),
            )
        )
    root_name = module_names[id(root)]
    for m in members:
        layer, _, attr = m.name.rpartition(".")
        is_out_rows = attr == "weight" and m.dim == 0 and layer in layer_names
        if is_out_rows and len(m.index) == num_groups and torch.equal(m.index, m.group):
            root_name = layer
            break
    return CoupledGroup(root_name, num_groups, tuple(members)), list(balance.values())


def _split_by_reshape(grad_fn) -> Optional[Tuple[List[int], List[int]]]:
    """(shape before, shape after) when a view/reshape splits one of its input's dimensions
    into several (heads, groups), None when it only merges dimensions (a flatten) or its shapes
    are not recorded."""
    before = getattr(grad_fn, "_saved_self_sym_sizes", None)
    meta = getattr(grad_fn, "_input_metadata", None)
    if before is None or not meta:
        return None
    shape_in = [int(d) for d in before]
    shape_out = [int(d) for d in meta[0].shape]
    a, b = [d for d in shape_in if d != 1], [d for d in shape_out if d != 1]
    i = j = 0
    while i < len(a) and j < len(b):
        # the smallest runs a[i:i2], b[j:j2] with equal products: one block of the reshape
        pa, pb, i2, j2 = a[i], b[j], i + 1, j + 1
        while pa != pb:
            if pa < pb and i2 < len(a):
                pa, i2 = pa * a[i2], i2 + 1
            elif pb < pa and j2 < len(b):
                pb, j2 = pb * b[j2], j2 + 1
            else:
                return None
        if j2 - j > 1:  # one run of input dims becomes several output dims
            return shape_in, shape_out
        i, j = i2, j2
    return None


def coupled_groups(
    model: nn.Module, example_inputs: Any, *, strict: bool = False
) -> List[CoupledGroup]:
    """Trace which parameter slices must be zeroed or removed together, channel by channel.

    One :class:`~fastsparse.CoupledGroup` per root layer (a conv or linear layer whose
    out-channels can go), with G = its out-channels. Member m of group g: the slices
    ``m.param.select(m.dim, m.index[j])`` with ``m.group[j] == g``; the members' tensors are the
    model's own parameters, so penalties and prox steps on the groups act on the model.

    The model is traced on a copy: its parameters, modes and hooks are left as they are.
    For a decoder transformer (blocks with ``self_attn`` and ``mlp``: the Llama family), the
    groups are its attention (key/value) groups and MLP neurons, block by block
    (`fastsparse.pruning.transformer`), which `prune` removes.

    Excluded: groups whose channels are model outputs (the classifier's out-features) or model
    inputs, and groups that touch a layer whose channels cannot be removed losslessly (see the
    module docstring for the supported layers): those layers are left whole, and
    `sparsity_report` lists them with the reason.

    Args:
        model: the network.
        example_inputs: a tensor (``model(x)``), a tuple/list (``model(*x)``) or a dict
            (``model(**x)``); a batch of one is enough.
        strict: raise PruningError on the first group that touches an unsupported layer
            instead of leaving it out.

    Returns:
        A list of CoupledGroup (an empty list when nothing is prunable).

    Raises:
        PruningError: the model cannot be traced (or, with `strict`, a group touches an
            unsupported layer).

    Example::

        >>> from fastsparse.workflow.models import LeNet5
        >>> groups = coupled_groups(LeNet5(), torch.randn(1, 1, 28, 28))
        >>> [(g.root, g.num_groups) for g in groups]
        [('features.0', 20), ('features.3', 50), ('classifier.0', 500)]
        >>> groups[1]
        CoupledGroup(root='features.3', num_groups=50, members=[features.3.weight[dim 0], \
features.3.bias[dim 0], classifier.0.weight[dim 1]])
    """
    return coupled_groups_as(structure_of(model), model, example_inputs, strict=strict)


def coupled_groups_as(
    structure: Structure, model: nn.Module, example_inputs: Any, *, strict: bool = False
) -> List[CoupledGroup]:
    """`coupled_groups` of a model whose `structure_of` the caller has decided."""
    if structure.is_decoder:  # their channels mix across the residual stream: heads, neurons
        groups = block_groups(blocks_named(model, structure.block_names))
        return groups["heads"] + groups["neurons"]
    traced = trace(copy.deepcopy(model), example_inputs, strict)
    params = dict(model.named_parameters())
    return [
        CoupledGroup(
            g.root,
            g.num_groups,
            tuple(
                CoupledMember(m.name, params[m.name], m.dim, m.index, m.group) for m in g.members
            ),
        )
        for g in traced.groups
    ]
