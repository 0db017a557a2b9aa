"""Train a small Llama-like transformer under FSDP2 with structured sparsity on attention heads
and MLP neurons, so that whole heads and neurons can be removed afterwards.

    python examples/fsdp_llm.py                      # spawns a process per GPU (nccl), or 2
                                                     # CPU processes (gloo); --device cpu
    torchrun --nproc_per_node 2 examples/fsdp_llm.py

The Hoyer-square ratio of DeepHoyer (`group_hoyer_square`, the default) is scale-invariant: it
drives groups to zero relative to each other while the loss keeps falling. At the end, the
groups below 5% of their block's largest norm are zeroed (a hard group threshold on the shards,
`fastsparse.prox_` with coupled groups), which leaves the loss unchanged (2 CPU processes):

    step   50  loss 0.2848  penalty 92.5298  heads < 0.05 max: 0/8  neurons < 0.05 max: 25/128
    step  100  loss 0.0639  penalty 62.8495  heads < 0.05 max: 0/8  neurons < 0.05 max: 60/128
    step  150  loss 0.0359  penalty 40.5319  heads < 0.05 max: 0/8  neurons < 0.05 max: 89/128
    zeroed 89/136 heads and neurons: loss 0.0372 -> 0.0372

The groups tie together everything a head or a neuron owns:

- attention head h: rows h*d..(h+1)*d of the q, k and v projections and the same columns of the
  output projection (`fastsparse.core.groups.attention_head_groups`; with grouped-query
  attention a group is one k/v head with the query heads that share it);
- MLP neuron i: row i of the gate and up projections and column i of the down projection
  (`fastsparse.core.groups.mlp_neuron_groups`).

FSDP2 shards every weight by rows (Shard(0)), so a head's or neuron's rows sit on one rank while
its columns of o / down are split over all ranks: each rank computes its shards' partial group
statistics with the fused kernels, fastsparse all-reduces them (2 numbers per group), and each
rank writes the gradient of its own shard. The penalty is the single-process penalty.

Two ways to add the penalty (--path): in the loss (autograd), or in place after backward
(`fastsparse.add_penalty_grad_`, once FSDP2 has reduce-scattered the gradients).
"""

from __future__ import annotations

import argparse
import math
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fastsparse as fs
from fastsparse.core.groups import attention_head_groups, mlp_neuron_groups


@dataclass
class Config:
    vocab: int = 64
    dim: int = 32
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    hidden: int = 64  # MLP neurons
    seq: int = 16


# --- the model --------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, cos, sin):
    """Rotary position embedding on x [batch, heads, seq, head_dim]."""
    x1, x2 = x[..., ::2], x[..., 1::2]
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.flatten(-2)


class Attention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.heads, c.kv_heads, c.dim // c.heads
        self.q = nn.Linear(c.dim, c.heads * self.head_dim, bias=False)
        self.k = nn.Linear(c.dim, c.kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(c.dim, c.kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(c.heads * self.head_dim, c.dim, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads
        )
        return self.o(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.gate = nn.Linear(c.dim, c.hidden, bias=False)
        self.up = nn.Linear(c.dim, c.hidden, bias=False)
        self.down = nn.Linear(c.hidden, c.dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(c.dim), Attention(c)
        self.mlp_norm, self.mlp = RMSNorm(c.dim), MLP(c)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.embed = nn.Embedding(c.vocab, c.dim)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.dim)
        self.head = nn.Linear(c.dim, c.vocab, bias=False)
        head_dim = c.dim // c.heads
        freqs = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(c.seq).float(), freqs)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        t = tokens.shape[1]
        for block in self.blocks:
            x = block(x, self.cos[:t], self.sin[:t])
        return self.head(self.norm(x))


def structured_groups(model: Llama, c: Config) -> list:
    """One CoupledGroup of heads and one of MLP neurons per block (parameters as they are now:
    call it right after fully_shard, so that the groups hold the sharded parameters)."""
    groups = []
    for i, block in enumerate(model.blocks):
        a, m = block.attn, block.mlp
        names = tuple(f"blocks.{i}.attn.{n}.weight" for n in ("q", "k", "v", "o"))
        groups.append(
            attention_head_groups(
                a.q.weight, a.k.weight, a.v.weight, a.o.weight, c.heads, c.kv_heads, names
            )
        )
        names = tuple(f"blocks.{i}.mlp.{n}.weight" for n in ("gate", "up", "down"))
        groups.append(mlp_neuron_groups(m.gate.weight, m.up.weight, m.down.weight, names))
    return groups


def batch(c: Config, size: int, generator: torch.Generator, device) -> torch.Tensor:
    """Sequences of a simple rule (next = 5 * token + 3 mod vocab) from random first tokens."""
    tokens = torch.empty(size, c.seq + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, c.vocab, (size,), generator=generator)
    for i in range(c.seq):
        tokens[:, i + 1] = (5 * tokens[:, i] + 3) % c.vocab
    return tokens.to(device)


# --- training ---------------------------------------------------------------------------------


def train(args) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available() and args.device != "cpu":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    mesh = init_device_mesh(device.type, (world,))

    c = Config()
    torch.manual_seed(0)  # the same initial model on every rank
    model = Llama(c).to(device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    groups = structured_groups(model, c)  # holds the sharded DTensor parameters
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    data = torch.Generator().manual_seed(1000 + rank)  # each rank its own batches

    for step in range(1, args.steps + 1):
        tokens = batch(c, args.batch, data, device)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, c.vocab), tokens[:, 1:].reshape(-1))
        if args.path == "autograd":
            penalty = fs.penalty(None, args.kind, groups=groups, backend=args.backend)
            (loss + args.strength * penalty).backward()
        else:
            loss.backward()
            penalty = fs.add_penalty_grad_(
                None, args.kind, args.strength, groups=groups, backend=args.backend
            )
        optimizer.step()
        optimizer.zero_grad()

        if step % args.log_every == 0 or step == args.steps:
            norms = [n.to_local() for n in fs.group_norms(None, groups=groups)]
            heads = torch.cat(norms[0::2])
            neurons = torch.cat(norms[1::2])
            small = lambda n: int((n < args.dead * n.max()).sum())  # noqa: E731
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            if rank == 0:
                print(
                    f"step {step:4d}  loss {mean_loss.item() / world:.4f}  "
                    f"penalty {penalty.item():.4f}  "
                    f"heads < {args.dead:g} max: {small(heads)}/{heads.numel()}  "
                    f"neurons < {args.dead:g} max: {small(neurons)}/{neurons.numel()}",
                    flush=True,
                )
    if not math.isfinite(loss.item()):
        raise RuntimeError("training diverged")

    # Zero every head and neuron whose norm is below `dead` x the largest of its block (a hard
    # group threshold on the shards), and measure the loss before and after.
    tokens = batch(c, 64, torch.Generator().manual_seed(7), device)
    evaluate = (
        lambda: F.cross_entropy(  # noqa: E731
            model(tokens[:, :-1]).reshape(-1, c.vocab), tokens[:, 1:].reshape(-1)
        ).item()
    )
    with torch.no_grad():
        before = evaluate()
        zeroed = 0
        for group, norms in zip(groups, fs.group_norms(None, groups=groups)):
            threshold = args.dead * norms.to_local().max().item()
            kept = fs.prox_(None, "group_l0", threshold, groups=group, backend=args.backend)[0]
            zeroed += int((~kept.to_local()).sum())
        after = evaluate()
    if rank == 0:
        total = sum(g.num_groups for g in groups)
        print(f"zeroed {zeroed}/{total} heads and neurons: loss {before:.4f} -> {after:.4f}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank and step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--kind", default="group_hoyer_square", choices=fs.KINDS)
    parser.add_argument("--strength", type=float, default=0.05)
    parser.add_argument("--path", default="autograd", choices=("autograd", "inplace"))
    parser.add_argument("--backend", default="auto", choices=fs.BACKENDS)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu"))
    parser.add_argument(
        "--nproc", type=int, help="processes to spawn without torchrun (default: GPUs, or 2)"
    )
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--dead", type=float, default=0.05, help="'small' group norm threshold")
    return parser.parse_args(argv)


def process(args) -> None:
    """One process (rank, world size and rendezvous in the environment): train."""
    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        train(args)
        # No rank tears its connections down while another still talks to it (gloo aborts).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawned(rank: int, world: int, port: int, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    process(args)


def main(argv=None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ:  # started by torchrun
        process(args)
        return
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the spawned processes share the cores
    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    nproc = args.nproc or (torch.cuda.device_count() if use_cuda else 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(spawned, args=(nproc, port, args), nprocs=nproc)


if __name__ == "__main__":
    main()
