"""Lossless pruning on the models people bring: torchvision classifiers, transformers decoders.

    python -m benchmarks.prune_zoo                  # every model, results/prune-zoo/zoo.{md,json}
    python -m benchmarks.prune_zoo --models resnet18,vit_b_16 --out-dir /tmp/zoo

Each model is built from its constructor or config (no weights are downloaded), in eval mode with
a fixed seed; its BatchNorm statistics and norm affines are randomized a little so that nothing is
trivially zero or one. Then 30% of the channels of each of its coupled groups (`coupled_groups`;
`transformer_groups` for Llama-family decoders) are zeroed **on the producer side only**: the
members sliced along dim 0 (filters and biases, the following BatchNorm's scale and shift, tied
residual producers; q/k/v and gate/up rows), never the consumers' input slices. So a channel is
dead exactly as `fastsparse.prune` defines it, and what it removes must not change the outputs.

Recorded per model: parameters and FLOPs (``torch.utils.flop_counter.FlopCounterMode``: matmuls
and convolutions, attention included) before and after, the relative output difference
max|a - b| / max|a| between the zeroed and the pruned model, the wall time of ``fastsparse.prune``
(tracing, grouping, surgery and its own check), the peak resident memory of the model's process,
the groups left whole with their reasons, or the one-line reason the model is refused.

Every model runs in its own subprocess, under an address-space cap and a timeout, so that the peak
memory is the model's own and a model that blows up cannot take the machine with it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parent / "results" / "prune-zoo"
RATIO = 0.3
SEED = 0
TIMEOUT_S = 300
MEMORY_CAP_GB = 16  # address space; importing torch alone maps ~3.5 GB

# name: (source, constructor keyword arguments)
TORCHVISION = {
    "resnet18": {},
    "resnet50": {},
    "resnext50_32x4d": {},
    "mobilenet_v2": {},
    "mobilenet_v3_small": {},
    "efficientnet_b0": {},
    "densenet121": {},
    "regnet_y_400mf": {},
    "shufflenet_v2_x1_0": {},
    "squeezenet1_0": {},
    "googlenet": {"aux_logits": False, "init_weights": True},
    "convnext_tiny": {},
    "vit_b_16": {},
    "swin_t": {},
}
TRANSFORMERS = ("llama", "gpt2", "bert")
MODELS = tuple(TORCHVISION) + TRANSFORMERS


# ------------------------------------------------------------------------------------- models


def build(name: str) -> Tuple[nn.Module, Any]:
    """The model (eval mode, seeded, norms randomized) and its example inputs."""
    torch.manual_seed(SEED)
    if name in TORCHVISION:
        import torchvision

        model = torchvision.models.get_model(name, weights=None, **TORCHVISION[name])
        inputs: Any = torch.randn(1, 3, 224, 224)
    elif name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=256,
            hidden_size=128,
            intermediate_size=344,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=64,
        )
        model = LlamaForCausalLM(config)
        inputs = torch.randint(0, config.vocab_size, (1, 16))
    elif name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=256, n_positions=64, n_embd=128, n_layer=2, n_head=4)
        model = GPT2LMHeadModel(config)
        # Without the cache: its concatenations have no channel count the graph can infer.
        inputs = {"input_ids": torch.randint(0, config.vocab_size, (1, 16)), "use_cache": False}
    elif name == "bert":
        from transformers import BertConfig, BertModel

        config = BertConfig(
            vocab_size=256,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=64,
        )
        model = BertModel(config)
        inputs = torch.randint(0, config.vocab_size, (1, 16))
    else:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    model.eval()
    randomize_norms_(model)
    return model, inputs


@torch.no_grad()
def randomize_norms_(model: nn.Module) -> None:
    """BatchNorm statistics and every norm's affine a little away from 0 and 1; weights that
    start at zero (ViT's head) or near it (ConvNeXt's layer scales) drawn, so that every layer
    reaches the output and a change anywhere would show in it."""
    for name, p in model.named_parameters():
        if p.dim() >= 2 and not p.any():
            p.normal_(0.0, 0.02)
        elif name.endswith("layer_scale"):
            p.uniform_(0.5, 1.5)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
        weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
        is_norm = isinstance(
            m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
        ) or type(m).__name__.endswith("RMSNorm")
        if not is_norm:
            continue
        if isinstance(weight, torch.Tensor):
            weight.uniform_(0.5, 1.5)
        if isinstance(bias, torch.Tensor):
            bias.normal_(0.0, 0.1)


def producer_groups(model: nn.Module, inputs: Any):
    """The coupled groups whose producers the benchmark zeroes (those `prune` reads)."""
    from fastsparse.pruning import coupled_groups

    return coupled_groups(model, inputs)


@torch.no_grad()
def zero_producers_(groups, ratio: float = RATIO, seed: int = SEED) -> int:
    """Zero `ratio` of each group's channels in its producer members (dim 0) only."""
    generator = torch.Generator().manual_seed(seed)
    count = 0
    for cg in groups:
        k = int(ratio * cg.num_groups)
        if k == 0:
            continue
        dead = torch.zeros(cg.num_groups, dtype=torch.bool)
        dead[torch.randperm(cg.num_groups, generator=generator)[:k]] = True
        for m in cg.members:
            if m.dim != 0:  # a consumer's input slice: left as it is
                continue
            rows = m.index[dead[m.group]]
            m.param.index_fill_(0, rows.to(m.param.device), 0.0)
        count += k
    return count


def flops(model: nn.Module, inputs: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from fastsparse.pruning.common import eval_forward

    counter = FlopCounterMode(display=False)
    with counter:
        eval_forward(model, inputs)
    return int(counter.get_total_flops())


def first_output(model: nn.Module, inputs: Any) -> torch.Tensor:
    from fastsparse.pruning.common import eval_forward, output_tensors

    return output_tensors(eval_forward(model, inputs))[0]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def run_one(name: str, ratio: float = RATIO) -> Dict[str, Any]:
    """Build, zero, prune and measure one model in this process."""
    import warnings

    import fastsparse as fs
    from fastsparse.pruning import PruningError
    from fastsparse.pruning.common import LeftWholeWarning

    row: Dict[str, Any] = {"model": name, "rss_start_mb": _rss_mb()}
    model, inputs = build(name)
    row["params"] = _params(model)
    row["flops"] = flops(model, inputs)
    try:
        groups = producer_groups(model, inputs)
    except PruningError as e:
        row.update(status="refused", reason=_one_line(e), rss_mb=_rss_mb())
        return row
    row["groups"] = len(groups)
    row["channels_zeroed"] = zero_producers_(groups, ratio)
    reference = first_output(model, inputs)
    row["rss_before_prune_mb"] = _rss_mb()
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pruned = fs.prune(model, inputs)
    except PruningError as e:
        row.update(status="refused", reason=_one_line(e), rss_mb=_rss_mb())
        row["prune_s"] = time.perf_counter() - start
        return row
    row["prune_s"] = time.perf_counter() - start
    row["left_whole"] = [
        list(pair)
        for w in caught
        if isinstance(w.message, LeftWholeWarning)
        for pair in w.message.skipped
    ]
    got = first_output(pruned, inputs)
    scale = reference.abs().max().item()
    row["rel_diff"] = (reference - got).abs().max().item() / scale if scale else 0.0
    row["params_after"] = _params(pruned)
    row["flops_after"] = flops(pruned, inputs)
    row["status"] = "pruned" if row["params_after"] < row["params"] else "unchanged"
    row["rss_mb"] = _rss_mb()
    return row


# ----------------------------------------------------------------------------------- isolation


def run_isolated(
    name: str,
    ratio: float = RATIO,
    timeout_s: float = TIMEOUT_S,
    memory_cap_gb: float = MEMORY_CAP_GB,
) -> Dict[str, Any]:
    """`run_one` in a subprocess under an address-space cap and a timeout; its peak RSS."""
    cap = int(memory_cap_gb * 2**30)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    cmd = [sys.executable, "-m", "benchmarks.prune_zoo", "--child", name, "--ratio", str(ratio)]
    root = Path(__file__).resolve().parent.parent
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limit, text=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        timed_out = True
    # The child is reaped by communicate; its own peak RSS comes back in its JSON line.
    wall = time.perf_counter() - start
    row: Optional[Dict[str, Any]] = None
    for line in stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
    if row is None:
        tail = " ".join(stderr.strip().splitlines()[-1:]) if stderr.strip() else ""
        if timed_out:
            reason = f"killed after the {timeout_s:.0f} s timeout"
        elif proc.returncode < 0:
            reason = f"killed by signal {-proc.returncode}"
        else:
            reason = f"crashed (exit {proc.returncode})"
        if "MemoryError" in stderr or "std::bad_alloc" in stderr:
            reason += f": out of memory under the {memory_cap_gb:g} GB cap"
        elif tail:
            reason += f": {tail}"
        row = {"model": name, "status": "failed", "reason": reason}
    row["process_s"] = wall
    return row


# ------------------------------------------------------------------------------------- output


def environment() -> Dict[str, Any]:
    import platform

    from benchmarks.run import _cpu_model, _git, _version

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": _version("torchvision"),
            "torch_pruning": _version("torch-pruning"),
            "transformers": _version("transformers"),
            "fastsparse": _version("fastsparse"),
        },
        "git": _git(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "settings": {
            "ratio": RATIO,
            "seed": SEED,
            "timeout_s": TIMEOUT_S,
            "memory_cap_gb": MEMORY_CAP_GB,
            "image_inputs": "1x3x224x224",
            "token_inputs": "1x16",
        },
    }


def _millions(n: Optional[int]) -> str:
    return "" if n is None else f"{n / 1e6:.2f}M"


def _giga(n: Optional[int]) -> str:
    return "" if n is None else f"{n / 1e9:.2f}G"


def _change(before: Optional[int], after: Optional[int], fmt) -> str:
    if before is None:
        return ""
    if after is None:
        return fmt(before)
    return f"{fmt(before)} → {fmt(after)} ({100 * (after - before) / before:+.0f}%)"


# Short names of the reasons a group is left whole, by a phrase of the full reason (kept in
# zoo.json), for the table's notes.
_SHORT = (
    ("normalizes across channels", "norm across channels"),
    ("MultiheadAttention", "nn.MultiheadAttention"),
    ("splits a dimension", "reshape splits channels (heads)"),
    ("indices", "index budget (misread reshapes)"),
    ("not supported", "unsupported layer"),
)


def _reasons(row: Dict[str, Any]) -> str:
    if row.get("reason"):
        return row["reason"]
    counts: Dict[str, int] = {}
    for _, why in row.get("left_whole") or []:
        short = next((label for phrase, label in _SHORT if phrase in why), why)
        kind = re.search(r"(\w+) layer\(s\)", why)
        if short == "unsupported layer" and kind:
            short = f"unsupported {kind.group(1)}"
        counts[short] = counts.get(short, 0) + 1
    if not counts:
        return ""
    return "left whole: " + ", ".join(f"{n} × {label}" for label, n in counts.items())


def table(rows: List[Dict[str, Any]]) -> str:
    lines = [
        "| model | result | params | FLOPs | rel. diff | prune time | peak RSS | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rel = f"{r['rel_diff']:.1e}" if "rel_diff" in r else ""
        prune_s = f"{r['prune_s']:.1f} s" if "prune_s" in r else ""
        rss = f"{r['rss_mb'] / 1024:.1f} GB" if "rss_mb" in r else ""
        notes = _reasons(r).replace("|", "\\|")
        params = _change(r.get("params"), r.get("params_after"), _millions)
        flop = _change(r.get("flops"), r.get("flops_after"), _giga)
        lines.append(
            f"| {r['model']} | {r['status']} | {params} | {flop} | {rel} | {prune_s} | {rss}"
            f" | {notes} |"
        )
    return "\n".join(lines)


def _load(env: Dict[str, Any]) -> str:
    before, after = env.get("load_average"), env.get("load_average_after")
    if not before or not after:
        return ""
    return f", load average {before[0]:.1f} before and {after[0]:.1f} after (1 min)"


def _imports_gb(rows: List[Dict[str, Any]]) -> str:
    starts = [r["rss_start_mb"] for r in rows if "rss_start_mb" in r]
    return f"{min(starts) / 1024:.1f}" if starts else "?"


def markdown(result: Dict[str, Any]) -> str:
    env = result["environment"]
    v = env["versions"]
    git = env["git"]
    return "\n".join(
        [
            "# Pruning zoo",
            "",
            "Written by `python -m benchmarks.prune_zoo`; not edited by hand. 30% of each coupled"
            " group's channels zeroed on the producer side, then `fastsparse.prune(model, x)`;"
            " FLOPs by `torch.utils.flop_counter`, rel. diff = max|a - b| / max|a| of the first"
            " output (zeroed vs pruned, fp32, eval), prune time = the `fastsparse.prune` call,"
            " peak RSS = the model's subprocess (its imports alone:"
            f" {_imports_gb(result['models'])} GB); the full reasons are in zoo.json.",
            "",
            f"{env['date']}, {env['cpu']} ({env['cpu_count']} cores), torch {v['torch']},"
            f" torchvision {v['torchvision']}, torch-pruning {v['torch_pruning']}, transformers"
            f" {v['transformers']}, commit {git['commit'][:12]}"
            f"{' (dirty)' if git.get('dirty') else ''}{_load(env)}.",
            "",
            table(result["models"]),
            "",
        ]
    )


README = Path(__file__).resolve().parent.parent / "README.md"
README_START = "<!-- prune-zoo table: written by python -m benchmarks.prune_zoo --readme -->"
README_END = "<!-- prune-zoo table: end -->"


def write_readme_table(markdown_table: str, path: Path = README) -> None:
    """Replace the table between the README's zoo markers with `markdown_table`."""
    text = path.read_text()
    start, end = text.index(README_START), text.index(README_END)
    text = text[: start + len(README_START)] + "\n\n" + markdown_table + "\n\n" + text[end:]
    path.write_text(text)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names")
    parser.add_argument("--ratio", type=float, default=RATIO)
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S)
    parser.add_argument("--memory-cap-gb", type=float, default=MEMORY_CAP_GB)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--readme", action="store_true", help="also write the table into README.md")
    parser.add_argument(
        "--from-json", type=Path, help="render a saved zoo.json (tables, --readme) without running"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one model, JSON on stdout
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(args.child, args.ratio)), flush=True)
        return 0
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        (args.from_json.parent / "zoo.md").write_text(markdown(result))
        if args.readme:
            write_readme_table(table(result["models"]))
        return 0
    names = [n for n in args.models.split(",") if n]
    for n in names:
        if n not in MODELS:
            parser.error(f"unknown model {n!r}; known: {', '.join(MODELS)}")
    env = environment()  # the commit and versions the models run with
    rows = []
    for n in names:
        row = run_isolated(n, args.ratio, args.timeout, args.memory_cap_gb)
        print(json.dumps(row), flush=True)
        rows.append(row)
    env["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    result = {"environment": env, "models": rows}
    result["environment"]["settings"].update(
        ratio=args.ratio, timeout_s=args.timeout, memory_cap_gb=args.memory_cap_gb
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "zoo.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out_dir / "zoo.md").write_text(markdown(result))
    if args.readme:
        write_readme_table(table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
