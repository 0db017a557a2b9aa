"""Checks that run inside a group of gloo processes (tests/distributed/test_dtensor.py spawns them
once).

Each check builds the same full tensors on every rank (same seed), shards them into DTensors
without communication, runs fastsparse on the shards and compares with the single-process run
of the same backend on the full tensors: the value must be the single-process value and each
rank's gradient shard the matching slice of the single-process gradient.

`run` is the entry point of a spawned process; it writes {check name: None or traceback} to
<out_dir>/rank<r>.json. Run by hand for debugging:

    python tests/distributed/distributed_checks.py parity-shard0-native coupled-shard1-torch
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist

from fastsparse.core.contract import KINDS

GROUPINGS = ("filters", "channels", "kernels", None, ("filters", "channels"))
PLACEMENTS = ("shard0", "shard1", "replicate", "mixed")
# On a 2 x 2 mesh: HSDP (replicated over dim 0, sharded over dim 1), rows on one mesh dim and
# columns on the other (a group split one way and spread the other: two rounds), rows twice.
PLACEMENTS_2D = ("hsdp", "rows-cols", "cols-rows", "rows-rows")
COLUMN_SHARDED = ("shard1", "rows-cols", "cols-rows")  # every tensor needs a dim 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHECKS = {}  # run by 2 processes on a 1-D mesh
CHECKS_2D = {}  # run by 4 processes on a 2 x 2 mesh


def check(name, registry=CHECKS):
    def register(fn):
        registry[name] = fn
        return fn

    return register


# --- sharding without communication ---------------------------------------------------------


def placements_for(which: str, index: int, dims: int):
    from torch.distributed.tensor import Replicate, Shard

    two_d = {
        "hsdp": [Replicate(), Shard(0)],
        "rows-cols": [Shard(0), Shard(1)],
        "cols-rows": [Shard(1), Shard(0)],
        "rows-rows": [Shard(0), Shard(0)],
    }
    if which in two_d:
        return two_d[which]
    if which == "shard0":
        return [Shard(0)]
    if which == "shard1":
        return [Shard(1)]
    if which == "replicate":
        return [Replicate()]
    # mixed: one call with row-sharded, column-sharded and replicated tensors
    choice = [Shard(0), Shard(1), Replicate()][index % 3]
    return [Shard(0)] if dims < 2 and choice == Shard(1) else [choice]


def local_slice(full: torch.Tensor, mesh, placements) -> torch.Tensor:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(full.shape, mesh, placements)
    return full[tuple(slice(o, o + s) for o, s in zip(offset, shape))]


def shard(full: torch.Tensor, mesh, placements) -> torch.nn.Parameter:
    """A DTensor parameter holding this rank's slice of `full` (no communication)."""
    from torch.distributed.tensor import DTensor

    local = local_slice(full, mesh, placements).clone()
    dt = DTensor.from_local(local, mesh, placements, shape=full.shape, stride=full.stride())
    return torch.nn.Parameter(dt)


def tensors_for(grouping, seed: int = 0) -> list[torch.Tensor]:
    """Odd shapes: uneven shards (5 rows on 2 ranks), an empty shard (1 row), a bias."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 6, 2, 3), (7, 5), (1, 4), (5,)]
    need = (
        3
        if grouping == "kernels"
        else 2
        if grouping in ("channels", ("filters", "channels"))
        else 1
    )
    fulls = [torch.randn(s, generator=gen) for s in shapes if len(s) >= need]
    fulls[0][1].zero_()  # a zero group: gradient 0, never NaN
    return fulls


def close(actual, expected, what, rtol=1e-5, atol=1e-6):
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if not torch.allclose(actual, expected, rtol=rtol, atol=atol * scale):
        error = (actual - expected).abs().max().item() if actual.numel() else 0.0
        raise AssertionError(f"{what}: max error {error:.3e}\n{actual}\n{expected}")


# --- parity of penalty, backward, in-place gradient and group norms ------------------------


def compare_call(mesh, fulls, which, kind, grouping, backend) -> None:
    from torch.distributed.tensor import DTensor

    import fastsparse as fs

    placements = [placements_for(which, i, f.dim()) for i, f in enumerate(fulls)]
    dts = [shard(f, mesh, p) for f, p in zip(fulls, placements)]
    refs = [f.clone().requires_grad_(True) for f in fulls]
    expected = fs.penalty(refs, kind, groups=grouping, backend=backend)
    expected.backward()

    value = fs.penalty(dts, kind, groups=grouping, backend=backend)
    assert type(value) is torch.Tensor and value.dim() == 0 and value.dtype == torch.float32
    close(value, expected, "value")
    value.backward()
    for i, (d, r, p) in enumerate(zip(dts, refs, placements)):
        assert isinstance(d.grad, DTensor) and list(d.grad.placements) == p, d.grad
        close(d.grad.to_local(), local_slice(r.grad, mesh, p), f"grad[{i}]", rtol=1e-4)

    for d, f, p in zip(dts, fulls, placements):
        d.grad = shard(torch.full_like(f, 0.25), mesh, p).detach()
    inplace_value = fs.add_penalty_grad_(dts, kind, 0.5, groups=grouping, backend=backend)
    close(inplace_value, expected, "add_penalty_grad_ value")
    for i, (d, r, p) in enumerate(zip(dts, refs, placements)):
        want = 0.25 + 0.5 * local_slice(r.grad, mesh, p)
        close(d.grad.to_local(), want, f"in-place grad[{i}]", rtol=1e-4)

    if not isinstance(grouping, tuple):
        norms = fs.group_norms(dts, groups=grouping, backend=backend)
        expected_norms = fs.group_norms(fulls, groups=grouping, backend=backend)
        for i, (n, e) in enumerate(zip(norms, expected_norms)):
            assert isinstance(n, DTensor), type(n)
            close(n.to_local(), local_slice(e, mesh, n.placements), f"norms[{i}] local")
            close(n.full_tensor(), e, f"norms[{i}]")


def parity(mesh, which, backend, kinds=KINDS, groupings=GROUPINGS) -> None:
    failures = []
    for grouping in groupings:
        fulls = tensors_for(grouping)
        if which in COLUMN_SHARDED:
            fulls = [f for f in fulls if f.dim() >= 2]
        for kind in kinds:
            try:
                compare_call(mesh, fulls, which, kind, grouping, backend)
            except AssertionError as error:
                failures.append(f"{kind} groups={grouping!r}: {error}")
    assert not failures, "\n".join(failures)


def between_norms(norms: list) -> float:
    """A threshold halfway between the two middle group norms: about half the groups die,
    and no norm sits on the threshold (where rounding would decide)."""
    values = torch.cat(norms).sort().values
    middle = len(values) // 2
    return 0.5 * (values[middle - 1] + values[middle]).item()


def prox_parity(mesh, which, backend) -> None:
    """fastsparse.distributed.prox_ equals fastsparse.prox_ on the full tensors, slice by slice."""
    import fastsparse as fs
    from fastsparse.distributed import prox_

    failures = []
    for grouping in ("filters", "channels", "kernels", None):
        fulls = tensors_for(grouping, seed=5)
        if which in COLUMN_SHARDED:
            fulls = [f for f in fulls if f.dim() >= 2]
        median = between_norms(fs.group_norms(fulls, groups=grouping))
        for kind, threshold in (
            ("l1", 0.5),
            ("l0", 0.5),
            ("group_lasso", median),
            ("group_l0", median),
            ("l0_group_lasso", (0.5, median)),
        ):
            placements = [placements_for(which, i, f.dim()) for i, f in enumerate(fulls)]
            dts = [shard(f, mesh, p) for f, p in zip(fulls, placements)]
            expected = [f.clone() for f in fulls]
            try:
                masks = prox_(dts, kind, threshold, grouping, backend)
                expected_masks = fs.prox_(expected, kind, threshold, groups=grouping)
                for i, (d, e, p) in enumerate(zip(dts, expected, placements)):
                    close(d.to_local(), local_slice(e, mesh, p), f"tensor {i}")
                for i, (m, e) in enumerate(zip(masks, expected_masks)):
                    assert torch.equal(m.full_tensor(), e), f"mask {i}: {m.full_tensor()} {e}"
            except AssertionError as error:
                failures.append(f"{kind} groups={grouping!r}: {error}")
    assert not failures, "\n".join(failures)


for _which in PLACEMENTS:
    for _backend in ("native", "torch"):
        check(f"prox-{_which}-{_backend}")(
            lambda mesh, w=_which, b=_backend: prox_parity(mesh, w, b)
        )

for _which in PLACEMENTS:
    for _backend in ("native", "torch"):
        check(f"parity-{_which}-{_backend}")(lambda mesh, w=_which, b=_backend: parity(mesh, w, b))

for _which in PLACEMENTS_2D:
    check(f"mesh2d-parity-{_which}", CHECKS_2D)(
        lambda mesh, w=_which: parity(
            mesh, w, "native", kinds=("l1l2", "group_lasso", "group_l1l2", "group_hoyer_square")
        )
    )

check("parity-shard1-triton")(
    lambda mesh: parity(
        mesh, "shard1", "triton", kinds=("l1l2", "group_hoyer_square"), groupings=("channels",)
    )
)


# --- coupled groups: attention heads and MLP neurons ----------------------------------------


def llama_block_weights(seed=1, dim=8, heads=2, head_dim=3, hidden=5) -> dict:
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "q": (heads * head_dim, dim),
        "k": (heads * head_dim, dim),
        "v": (heads * head_dim, dim),
        "o": (dim, heads * head_dim),
        "gate": (hidden, dim),
        "up": (hidden, dim),
        "down": (dim, hidden),
    }
    return {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}


def block_groups(w: dict, heads=2):
    from fastsparse.core.groups import attention_head_groups, mlp_neuron_groups

    return [
        attention_head_groups(w["q"], w["k"], w["v"], w["o"], heads),
        mlp_neuron_groups(w["gate"], w["up"], w["down"]),
    ]


def coupled_placements(which: str, name: str):
    from torch.distributed.tensor import Replicate, Shard

    if which == "tp":  # Megatron: q, k, v, gate, up column-parallel; o, down row-parallel
        return [Shard(1)] if name in ("o", "down") else [Shard(0)]
    if which == "hsdp":
        return [Replicate(), Shard(0)]
    if which == "fsdp+tp":  # FSDP over mesh dim 0 (rows), Megatron tensor parallel over dim 1
        return [Shard(0), Shard(1) if name in ("o", "down") else Shard(0)]
    return {"shard0": [Shard(0)], "shard1": [Shard(1)], "replicate": [Replicate()]}[which]


def coupled_parity(mesh, which, backend) -> None:
    import fastsparse as fs

    failures = []
    fulls = llama_block_weights()
    fulls["gate"][2].zero_()  # a neuron whose gate row is zero (the group is not)
    for kind in KINDS:
        placements = {n: coupled_placements(which, n) for n in fulls}
        dts = {n: shard(f, mesh, placements[n]) for n, f in fulls.items()}
        refs = {n: f.clone().requires_grad_(True) for n, f in fulls.items()}
        try:
            expected = fs.penalty(None, kind, groups=block_groups(refs), backend=backend)
            expected.backward()
            groups = block_groups(dts)
            value = fs.penalty(list(dts.values()), kind, groups=groups, backend=backend)
            close(value, expected, "value")
            value.backward()
            for n in fulls:
                want = local_slice(refs[n].grad, mesh, placements[n])
                close(dts[n].grad.to_local(), want, f"grad {n}", rtol=1e-4)
                dts[n].grad = None
            inplace_value = fs.add_penalty_grad_(None, kind, 2.0, groups=groups, backend=backend)
            close(inplace_value, expected, "in-place value")
            for n in fulls:
                want = 2.0 * local_slice(refs[n].grad, mesh, placements[n])
                close(dts[n].grad.to_local(), want, f"in-place grad {n}", rtol=1e-4)
            norms = fs.group_norms(None, groups=groups, backend=backend)
            expected_norms = fs.group_norms(None, groups=block_groups(fulls), backend=backend)
            for i, (got, e) in enumerate(zip(norms, expected_norms)):
                close(got.full_tensor(), e, f"norms {i}")
        except AssertionError as error:
            failures.append(f"{kind}: {error}")
    assert not failures, "\n".join(failures)


def coupled_prox_parity(mesh, which) -> None:
    import fastsparse as fs
    from fastsparse.distributed import coupled_prox_

    failures = []
    fulls = llama_block_weights(seed=6)
    median = between_norms(fs.group_norms(None, groups=block_groups(fulls)))
    for kind, threshold in (
        ("l1", 0.5),
        ("l0", 0.5),
        ("group_lasso", median),
        ("group_l0", median),
        ("l0_group_lasso", (0.5, median)),
    ):
        placements = {n: coupled_placements(which, n) for n in fulls}
        dts = {n: shard(f, mesh, placements[n]) for n, f in fulls.items()}
        expected = {n: f.clone() for n, f in fulls.items()}
        try:
            masks = coupled_prox_(block_groups(dts), kind, threshold, "auto")
            expected_masks = fs.prox_(None, kind, threshold, groups=block_groups(expected))
            for n in fulls:
                want = local_slice(expected[n], mesh, placements[n])
                close(dts[n].to_local(), want, f"tensor {n}")
            for i, (m, e) in enumerate(zip(masks, expected_masks)):
                assert torch.equal(m.full_tensor(), e), f"mask {i}: {m.full_tensor()} {e}"
        except AssertionError as error:
            failures.append(f"{kind}: {error}")
    assert not failures, "\n".join(failures)


for _which in ("shard0", "shard1", "tp", "replicate"):
    check(f"coupled-prox-{_which}")(lambda mesh, w=_which: coupled_prox_parity(mesh, w))
check("mesh2d-coupled-prox-hsdp", CHECKS_2D)(lambda mesh: coupled_prox_parity(mesh, "hsdp"))
check("mesh2d-prox-rows-cols", CHECKS_2D)(lambda mesh: prox_parity(mesh, "rows-cols", "native"))

for _which in ("shard0", "shard1", "tp", "replicate"):
    for _backend in ("native", "torch"):
        check(f"coupled-{_which}-{_backend}")(
            lambda mesh, w=_which, b=_backend: coupled_parity(mesh, w, b)
        )
for _which in ("hsdp", "fsdp+tp"):
    check(f"mesh2d-coupled-{_which}", CHECKS_2D)(
        lambda mesh, w=_which: coupled_parity(mesh, w, "native")
    )


# --- FSDP2 -------------------------------------------------------------------------------------


class TinyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(6, 9)
        self.down = torch.nn.Linear(9, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def fsdp_model(mesh, seed=0, mp_policy=None):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(seed)
    reference_model = TinyMLP()
    model = TinyMLP()
    model.load_state_dict(reference_model.state_dict())
    policy = mp_policy or MixedPrecisionPolicy()
    fully_shard(model.up, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model, reference_model


def data(rank=None, seed=3):
    """The full batch (8 rows), or rank r's share of it."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 4, generator=gen)
    if rank is None:
        return x, y
    n = 8 // dist.get_world_size()
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def regularize(model, backend, weights=None):
    """A loss term over plain groupings and coupled groups (the MLP's hidden neurons), of the
    given weights (up, down) or of the module's current ones."""
    import fastsparse as fs
    from fastsparse.core.groups import mlp_neuron_groups

    weights = weights or [model.up.weight, model.down.weight]
    neurons = mlp_neuron_groups(weights[0], None, weights[1])
    return (
        fs.penalty(weights, "l1l2", groups="filters", backend=backend)  # local groups
        + fs.penalty(weights, "group_hoyer_square", groups="channels", backend=backend)
        + fs.penalty(None, "group_lasso", groups=neurons, backend=backend)
    )


@check("fsdp2-penalty-grads")
def fsdp_penalty_grads(mesh) -> None:
    """Penalty-only backward on the sharded parameters of fully_shard."""
    model, ref = fsdp_model(mesh)
    for backend in ("native", "torch"):
        value = regularize(model, backend)
        value.backward()
        expected = regularize(ref, backend)
        expected.backward()
        close(value, expected, f"{backend} value")
        for n, p in ref.named_parameters():
            sharded = model.get_parameter(n)
            if p.grad is None:  # biases
                assert sharded.grad is None, n
                continue
            want = local_slice(p.grad, mesh, sharded.placements)
            close(sharded.grad.to_local(), want, f"{backend} grad {n}", rtol=1e-4)
        model.zero_grad()
        ref.zero_grad()


def _fsdp_steps(mesh, backend, inplace, mp_policy=None, steps=2, hold=True):
    """Train the FSDP2 model (each rank its share of the batch) and a single-process copy (the
    full batch). hold: regularize the sharded weights taken after fully_shard (else the module's
    attributes at loss time: FSDP2 has unsharded the root's into plain tensors then)."""
    import fastsparse as fs
    from fastsparse.core.groups import mlp_neuron_groups

    rank = dist.get_rank()
    model, ref = fsdp_model(mesh, mp_policy=mp_policy)
    held = {id(m): [m.up.weight, m.down.weight] if hold else None for m in (model, ref)}
    runs = [(model, data(rank)), (ref, data())]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m, _ in runs]
    for step in range(steps):
        for (m, (x, y)), opt in zip(runs, opts):
            loss = torch.nn.functional.mse_loss(m(x + step), y)
            if inplace:  # after backward (FSDP2 has reduce-scattered the gradients)
                loss.backward()
                weights = [m.up.weight, m.down.weight]
                fs.add_penalty_grad_(weights, "l1l2", 0.05, groups="filters", backend=backend)
                neurons = mlp_neuron_groups(m.up.weight, None, m.down.weight)
                fs.add_penalty_grad_(None, "group_lasso", 0.05, groups=neurons, backend=backend)
            else:
                (loss + 0.05 * regularize(m, backend, held[id(m)])).backward()
            if m is model:
                for p in model.parameters():
                    assert p.grad.dtype == torch.float32, p.grad.dtype
            opt.step()
            opt.zero_grad()
    return model, ref


@check("fsdp2-train-steps")
def fsdp_train_steps(mesh) -> None:
    """Two SGD steps with the penalty in the loss (of the held sharded weights, or of the
    module's weights, partly unsharded plain tensors), then with the in-place path: the sharded
    parameters equal the slices of the single-process parameters."""
    for inplace, hold in ((False, True), (False, False), (True, True)):
        model, ref = _fsdp_steps(mesh, "native", inplace, hold=hold)
        for n, p in ref.named_parameters():
            sharded = model.get_parameter(n)
            want = local_slice(p.detach(), mesh, sharded.placements)
            close(sharded.to_local(), want, f"inplace={inplace} hold={hold} {n}", rtol=1e-4)


check("mesh2d-hsdp-train-steps", CHECKS_2D)(fsdp_train_steps)


@check("fsdp2-mixed-precision")
def fsdp_mixed_precision(mesh) -> None:
    """bf16 compute, fp32 sharded (master) parameters and fp32 gradient reduction: the penalty
    gradients land in fp32, exact for the penalty alone; a training step stays close."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model, ref = fsdp_model(mesh, mp_policy=policy)
    value = regularize(model, "native")
    value.backward()
    expected = regularize(ref, "native")
    expected.backward()
    close(value, expected, "value")
    for n, p in ref.named_parameters():
        sharded = model.get_parameter(n)
        if p.grad is None:  # biases
            continue
        assert sharded.dtype == torch.float32 and sharded.grad.dtype == torch.float32
        want = local_slice(p.grad, mesh, sharded.placements)
        close(sharded.grad.to_local(), want, f"grad {n}", rtol=1e-4)
    for inplace in (False, True):
        model, ref = _fsdp_steps(mesh, "native", inplace, mp_policy=policy)
        for n, p in ref.named_parameters():
            sharded = model.get_parameter(n)
            want = local_slice(p.detach(), mesh, sharded.placements)
            close(sharded.to_local(), want, f"inplace={inplace} {n}", rtol=2e-2, atol=2e-2)


# --- DDP -------------------------------------------------------------------------------------


def _ddp_runs() -> tuple:
    """[(DDP module, its module, this rank's batch), (single-process copy, itself, full batch)]."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    ref = TinyMLP()
    model = TinyMLP()
    model.load_state_dict(ref.state_dict())
    ddp = DistributedDataParallel(model)
    return [(ddp, model, data(dist.get_rank())), (ref, ref, data())]


def _assert_ddp_ranks_agree(model, ref, what: str) -> None:
    """Bitwise identical parameters on every rank, close to the single-process run's."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    for other in gathered[1:]:
        assert torch.equal(other, gathered[0]), f"{what}: ranks differ"
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        close(p, q, f"{what} {n}", rtol=1e-5, atol=1e-6)


def _ddp_run(backend, inplace, steps=3):
    import fastsparse as fs

    runs = _ddp_runs()
    model, ref = runs[0][1], runs[1][0]
    for step in range(steps):
        for m, inner, (x, y) in runs:
            opt = torch.optim.SGD(m.parameters(), lr=0.1)  # stateless: fine to recreate
            loss = torch.nn.functional.mse_loss(m(x + step), y)
            weights = [inner.up.weight, inner.down.weight]
            if inplace:
                loss.backward()  # returns after DDP's gradient all-reduce
                fs.add_penalty_grad_(
                    weights, "group_l1l2", 0.05, groups="channels", backend=backend
                )
            else:
                loss = loss + 0.05 * fs.penalty(
                    weights, "group_l1l2", groups="channels", backend=backend
                )
                loss.backward()
            opt.step()
            opt.zero_grad()
    return model, ref


@check("ddp-identical-parameters")
def ddp_identical_parameters(mesh) -> None:
    """Every rank ends with bitwise identical parameters, equal to the single-process run on
    the full batch, for the in-place path (after backward) and for the autograd path."""
    for inplace in (True, False):
        model, ref = _ddp_run("native", inplace)
        _assert_ddp_ranks_agree(model, ref, f"inplace={inplace}")


# --- SparseOptimizer ----------------------------------------------------------------------


def _sparse_rules():
    """A prox (filters), a layer target (channels) and a penalty, healing from step 2."""
    from fastsparse.optim import Rule

    return [
        Rule("up.weight", prox="group_lasso", strength=2.0),
        Rule("down.weight", target=0.5, groups="channels"),
        Rule("down.bias", penalty="l1", strength=0.1, groups=None),
    ]


def _sparse_steps(runs, make_opt, steps=4):
    """SparseOptimizer steps on each (model, module, batch): the same rules everywhere."""
    from fastsparse.optim import SparseOptimizer

    opts = [
        SparseOptimizer(make_opt(m.parameters()), inner, _sparse_rules(), heal_from=2)
        for m, inner, _ in runs
    ]
    for step in range(steps):
        for (m, _, (x, y)), opt in zip(runs, opts):
            torch.nn.functional.mse_loss(m(x + step), y).backward()
            opt.step()
            opt.zero_grad()
    return opts


@check("fsdp2-sparse-optimizer")
def fsdp_sparse_optimizer(mesh) -> None:
    """SparseOptimizer on FSDP2's sharded parameters (prox, target, penalty, healing): every
    shard equals the slice of the single-process run; the target holds exactly."""
    rank = dist.get_rank()
    model, ref = fsdp_model(mesh)
    make = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)  # noqa: E731
    sharded, single = _sparse_steps([(model, model, data(rank)), (ref, ref, data())], make)
    for n, p in ref.named_parameters():
        shard = model.get_parameter(n)
        want = local_slice(p.detach(), mesh, shard.placements)
        close(shard.to_local(), want, f"fsdp2 {n}", rtol=1e-5, atol=1e-6)
    report, expected = sharded.sparsity(), single.sparsity()
    assert report == expected, (report, expected)
    assert report["down.weight"] == 4 / 9 and 0 < report["up.weight"] < 1, report  # 5 of 9 kept


@check("ddp-sparse-optimizer")
def ddp_sparse_optimizer(mesh) -> None:
    """SparseOptimizer (AdamW) under DDP: identical parameters on every rank, equal to the
    single-process run on the full batch."""
    runs = _ddp_runs()
    _sparse_steps(runs, lambda ps: torch.optim.AdamW(ps, lr=0.05))
    _assert_ddp_ranks_agree(runs[0][1], runs[1][0], "SparseOptimizer")


# --- validation: the public functions check DTensor calls, before anything is written -------


@check("refused-before-writing")
def refused_before_writing(mesh) -> None:
    """A gradient placed unlike its parameter and a Partial parameter are refused by the
    `fastsparse` functions (fastsparse.distributed trusts what they pass), leaving every
    tensor as it was."""
    import pytest
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    import fastsparse as fs

    full = torch.randn(4, 3, generator=torch.Generator().manual_seed(11))
    w = shard(full, mesh, [Shard(0)])
    w.grad = DTensor.from_local(torch.ones(4, 3), mesh, [Replicate()])
    before = (w.to_local().clone(), w.grad.to_local().clone())
    with pytest.raises(ValueError, match=r"tensors\[0\]\.grad is .*Replicate.*placed like"):
        fs.add_penalty_grad_([w], "group_lasso", 0.1)
    assert torch.equal(w.to_local(), before[0]) and torch.equal(w.grad.to_local(), before[1])

    partial = torch.nn.Parameter(DTensor.from_local(full.clone(), mesh, [Partial()]))
    calls = (
        lambda: fs.penalty([partial], "l1"),
        lambda: fs.group_norms([partial]),
        lambda: fs.prox_([partial], "group_lasso", 0.1),
        lambda: fs.scale_groups_([partial], [torch.zeros(4)]),
    )
    for call in calls:
        with pytest.raises(NotImplementedError, match=r"tensors\[0\] has placement .*Partial"):
            call()
        assert torch.equal(partial.to_local(), full)


# --- the process entry point ---------------------------------------------------------------


def run(rank: int, world: int, port: int, out_dir: str, names: list) -> None:
    """Entry point of a spawned process: 2 processes run CHECKS, 4 run CHECKS_2D."""
    os.environ["OMP_NUM_THREADS"] = "1"  # processes share the cores: no oversubscription
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    from torch.distributed.device_mesh import init_device_mesh

    if world == 2:
        mesh = init_device_mesh("cpu", (world,))
    else:  # FSDP2's HSDP needs named mesh dims
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    checks = CHECKS if world == 2 else CHECKS_2D
    results = {}
    try:
        for name in names:
            try:
                checks[name](mesh)
                results[name] = None
            except Exception:  # reported per check by the test
                results[name] = traceback.format_exc()
            dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


if __name__ == "__main__":
    import tempfile

    import torch.multiprocessing as mp

    chosen = sys.argv[1:] or list(CHECKS)
    world = 4 if all(name in CHECKS_2D for name in chosen) else 2
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(run, args=(world, free_port(), out, chosen), nprocs=world)
        for r in range(world):
            with open(os.path.join(out, f"rank{r}.json")) as f:
                for name, error in json.load(f).items():
                    print(f"rank {r} {name}: {'ok' if error is None else error}")
