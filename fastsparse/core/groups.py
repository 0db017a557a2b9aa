"""Groups that are not a plain grouping: coupled groups, their builders, and the engine's view.

A CoupledGroup's group g is made of slices of several parameters (a conv's out-channel g, its
bias, the next BatchNorm's scale and shift, the next layer's in-channel g, ...). The engine sees
them as ordinary segments, one per (parameter, dim) touched (dim 0 is the "filters" grouping,
dim 1 the "channels" grouping), whose groups are slices, plus `slice_groups`, the coupled group
of every slice (-1 for slices in none). Slice statistics are then added per coupled group in a
fixed order (fastsparse/engine.py).

Builders: `fastsparse.coupled_groups` traces a model (fastsparse/pruning/graph.py);
`attention_head_groups` and `mlp_neuron_groups` below build transformer groups from weights.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from fastsparse.core.contract import GROUPING_OF_DIM
from fastsparse.core.layout import encode_specs

# The layers whose weights a model-level regularizer takes by default.
DEFAULT_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


def default_layers(model: nn.Module, include_output: bool = False) -> list:
    """The model's Conv and Linear layers with a weight, in module order: what the Regularizer
    and the CLI regularize by default (the output layer left out), and what selective weight
    decay and the CLI's ``--regularize all`` take (the output layer included).

    Without `include_output`, the output layer is left out (when there are several layers): the
    last of these layers in module order (the classifier of a vision model) and a transformers
    model's output embeddings
    (``get_output_embeddings()``: the lm_head, whose rows are the vocabulary, tied to the input
    embeddings in many models). A group penalty on it would push whole classes or tokens to
    zero, and its outputs, the model's, cannot be pruned.

    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    >>> [type(m).__name__ for m in default_layers(net)]
    ['Conv2d']
    """
    layers = [m for m in model.modules() if isinstance(m, DEFAULT_LAYERS) and m.weight is not None]
    if include_output or len(layers) < 2:  # a single layer is what was asked for
        return layers
    output = {id(layers[-1])}
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output) and get_output() is not None:
        output.add(id(get_output()))
    return [m for m in layers if id(m) not in output]


def default_parameters(model: nn.Module, include_output: bool = False) -> list:
    """The weights of `default_layers(model, include_output)`."""
    return [m.weight for m in default_layers(model, include_output)]


@dataclass(eq=False)
class CoupledMember:
    """One parameter's share of a coupled group: slices of `param` along `dim`.

    Slice j is ``param.select(dim, index[j])``; it belongs to group ``group[j]``. A member never
    lists the same index twice, and `index` is sorted.

    Attributes:
        name: the parameter's name in the model (``model.get_parameter(name) is param``).
        param: the parameter itself (shared with the model, not a copy).
        dim: the dimension the slices are taken along (0: out rows, 1: in columns).
        index: int64 [k], slice indices along `dim`.
        group: int64 [k], the group id in [0, num_groups) of each slice.
    """

    name: str
    param: torch.Tensor
    dim: int
    index: torch.Tensor
    group: torch.Tensor

    @property
    def slice_numel(self) -> int:
        """Elements in one slice: numel(param) / param.shape[dim]."""
        return self.param.numel() // max(self.param.shape[self.dim], 1)

    def __repr__(self) -> str:
        return (
            f"CoupledMember({self.name!r}, shape={tuple(self.param.shape)}, dim={self.dim}, "
            f"slices={self.index.numel()})"
        )


@dataclass(eq=False)
class CoupledGroup:
    """G coupled groups that must be zeroed or removed together, rooted at one layer's outputs.

    Group g (for g in [0, G)) is the union over `members` of the slices mapped to g: for a conv
    root, out-channel g's filter and bias, the following BatchNorm's scale and shift, the next
    layer's in-channel slice (several Linear columns after a flatten), the depthwise filter fed by
    it, and through residual additions the same channel of every layer tied to it. Its statistics
    are s1_g = sum |w| and s2_g = sum w^2 over all those slices.

    Groups of different CoupledGroups may overlap: the element W[o, c] of a conv belongs to group
    o of that conv and to group c of the layer that produces its input channel c.

    Attributes:
        root: name of the root module: the first conv or linear layer (in module order) whose
            out-channels are in the group; group g is its out-channel g.
        num_groups: G, the root's number of output channels.
        members: the parameter slices, in the model's parameter order.
    """

    root: str
    num_groups: int
    members: tuple

    def params(self) -> list:
        """The distinct parameters of the members, in order of first appearance."""
        return distinct_params([self])

    def group_sizes(self) -> torch.Tensor:
        """int64 [G]: number of elements in each group."""
        sizes = torch.zeros(self.num_groups, dtype=torch.int64)
        for m in self.members:
            sizes.index_add_(0, m.group, torch.full_like(m.group, m.slice_numel))
        return sizes

    def __repr__(self) -> str:
        names = ", ".join(f"{m.name}[dim {m.dim}]" for m in self.members)
        return f"CoupledGroup(root={self.root!r}, num_groups={self.num_groups}, members=[{names}])"


def is_coupled(groups) -> bool:
    """True for a CoupledGroup or a list/tuple of them (an empty list counts: no groups)."""
    if isinstance(groups, CoupledGroup):
        return True
    return isinstance(groups, (list, tuple)) and all(isinstance(g, CoupledGroup) for g in groups)


def as_coupled_list(groups) -> list:
    """A CoupledGroup or a sequence of them as a list."""
    return [groups] if isinstance(groups, CoupledGroup) else list(groups)


def distinct_params(groups) -> list:
    """The distinct parameters of coupled groups, in order of first appearance."""
    seen, params = set(), []
    for cg in groups:
        for m in cg.members:
            if id(m.param) not in seen:
                seen.add(id(m.param))
                params.append(m.param)
    return params


def coupled_params(groups) -> list:
    """The distinct parameters of a CoupledGroup or a list of them, in order of first appearance."""
    return distinct_params(as_coupled_list(groups))


# --- transformer groups ------------------------------------------------------------------------


def attention_head_groups(q, k, v, o, num_heads, num_kv_heads=None, names=None) -> CoupledGroup:
    """Attention heads as coupled groups: head h = rows h*d..(h+1)*d of q, k, v, columns of o.

    Args:
        q, k, v: projection weights [num_heads * d, dim] ([num_kv_heads * d, dim] for k, v).
        o: output projection weight [dim, num_heads * d].
        num_heads: H; d = q.shape[0] // H.
        num_kv_heads: with grouped-query attention (fewer k/v heads), a group is one k/v head
            with the num_heads // num_kv_heads query heads that share it (default: H).
        names: four parameter names for messages and reports, e.g. the model's
            ``"layers.0.self_attn.q_proj.weight"``, ... (default ``"attention<n>.q"``, ...,
            with n counting the calls, so that every layer's groups have their own root name).

    Returns:
        A CoupledGroup of num_kv_heads groups, for `groups=` of penalty, add_penalty_grad_,
        group_norms and prox_ (plain or DTensor parameters).

    Example:
        >>> q, k, v = (torch.randn(8, 16) for _ in range(3))
        >>> heads = attention_head_groups(q, k, v, torch.randn(16, 8), num_heads=2)
        >>> [n.shape for n in fastsparse.group_norms(None, groups=heads)]
        [torch.Size([2])]
    """
    kv_heads = num_kv_heads or num_heads
    d = q.shape[0] // num_heads
    per_kv = num_heads // kv_heads
    if q.shape[0] != num_heads * d or k.shape[0] != kv_heads * d or num_heads % kv_heads:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)} do not split into {num_heads} query heads "
            f"and {kv_heads} key/value heads of one size"
        )
    names = names or _default_names("attention", ("q", "k", "v", "o"))
    q_rows = torch.arange(q.shape[0])
    kv_rows = torch.arange(k.shape[0])
    members = (
        CoupledMember(names[0], q, 0, q_rows, q_rows // d // per_kv),
        CoupledMember(names[1], k, 0, kv_rows, kv_rows // d),
        CoupledMember(names[2], v, 0, kv_rows.clone(), kv_rows // d),
        CoupledMember(names[3], o, 1, q_rows.clone(), q_rows // d // per_kv),
    )
    return CoupledGroup(names[0], kv_heads, members)


def mlp_neuron_groups(gate, up, down, names=None) -> CoupledGroup:
    """Gated-MLP neurons as coupled groups: neuron i = row i of gate and up, column i of down.

    Args:
        gate, up: weights [hidden, dim] (up may be None for a plain MLP).
        down: weight [dim, hidden].
        names: parameter names for messages and reports (default ``"mlp<n>.gate"``,
            ``"mlp<n>.up"``, ``"mlp<n>.down"``, with n counting the calls).

    Example:
        >>> gate, up, down = torch.randn(32, 8), torch.randn(32, 8), torch.randn(8, 32)
        >>> mlp_neuron_groups(gate, up, down).num_groups
        32
    """
    names = names or _default_names("mlp", ("gate", "up", "down"))
    hidden = gate.shape[0]
    rows = torch.arange(hidden)
    members = [CoupledMember(names[0], gate, 0, rows, rows)]
    if up is not None:
        members.append(CoupledMember(names[1], up, 0, rows.clone(), rows.clone()))
    members.append(CoupledMember(names[2], down, 1, rows.clone(), rows.clone()))
    return CoupledGroup(names[0], hidden, tuple(members))


_DEFAULT_NAME_COUNTS: dict = {}


def _default_names(kind: str, roles: tuple) -> tuple:
    """("<kind><n>.<role>", ...) with n the number of earlier calls for this kind."""
    n = _DEFAULT_NAME_COUNTS.get(kind, 0)
    _DEFAULT_NAME_COUNTS[kind] = n + 1
    return tuple(f"{kind}{n}.{role}" for role in roles)


# --- the engine's view ---------------------------------------------------------------------------

# Layouts are cached per list of groups, keyed weakly by its first group: nothing is stored on
# the user's objects, and a layout goes when its groups do.
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class CoupledLayout:
    params: list  # distinct parameters, in order of first appearance
    specs: str  # encoded (param index, grouping) per member, for the torch.library ops
    slice_groups: torch.Tensor  # int64 [slices of all specs], coupled group id or -1
    group_counts: list  # number of groups of each CoupledGroup


def coupled_layout(groups: list) -> CoupledLayout:
    """The engine's view of a list of CoupledGroups (cached until the groups are freed); the
    groups are validated (`checks.check_coupled`)."""
    key = tuple((id(cg), tuple(id(m.param) for m in cg.members)) for cg in groups)
    cached = _LAYOUTS.get(groups[0]) if groups else None
    if cached is not None and cached[0] == key:
        return cached[1]
    params, index_of, specs, slices = [], {}, [], []
    offset = 0
    for cg in groups:
        for m in cg.members:
            if id(m.param) not in index_of:
                index_of[id(m.param)] = len(params)
                params.append(m.param)
            specs.append((index_of[id(m.param)], GROUPING_OF_DIM[m.dim], 0))
            ids = torch.full((m.param.shape[m.dim],), -1, dtype=torch.int64)
            ids[m.index.cpu()] = m.group.cpu() + offset
            slices.append(ids)
        offset += cg.num_groups
    slice_groups = torch.cat(slices) if slices else torch.zeros(0, dtype=torch.int64)
    layout = CoupledLayout(
        params, encode_specs(specs), slice_groups, [cg.num_groups for cg in groups]
    )
    if groups:
        _LAYOUTS[groups[0]] = (key, layout)
    return layout
