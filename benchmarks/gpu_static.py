"""The Triton kernels compiled for GPUs without a GPU: registers, spills and code features.

    python -m benchmarks.gpu_static                   # every path x shape, sm_80 and sm_90
    python -m benchmarks.gpu_static --quick           # a bounded subset (CI)
    python -m benchmarks.gpu_static --out-dir DIR     # where the table goes

The launchers of fastsparse.backends.triton run on CPU tensors of GPU-user shapes (LLM projections,
512x512x3x3 filters, ResNet-50 and VGG-16), every kernel path in turn (penalty value and
gradient, in place, across-group kinds, group norms, prox, group scaling, the fused optimizer
steps); each launch is recorded instead of run, then compiled ahead of time with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`. `cuobjdump -res-usage`
(shipped with triton) gives registers, stack and local memory per thread (spills land there),
and the PTX the vector loads and stores, 64-bit divisions and approximate sqrt / division.

The specializations are what these launchers choose; Triton's own specialization of integer
arguments (equal to 1, divisible by 16) is not reproduced: integers compile as i32 / i64.
Must run without TRITON_INTERPRET (the kernels are then real JIT functions). Writes
`gpu-static-<date>[-quick].{json,md}` as the tool computed them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ARCHS = (80, 90)
_POINTER_TYPES = {
    torch.float32: "*fp32",
    torch.float64: "*fp64",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.int64: "*i64",
    torch.int32: "*i32",
    torch.bool: "*i1",
}
# Shapes GPU users train; (name, shapes).
SHAPES = {
    "llm.mlp_up": [(11008, 4096)],
    "llm.mlp_down": [(4096, 11008)],
    "llm.mlp_14336": [(14336, 4096)],
    "llm.70b_mlp": [(8192, 28672)],
    "conv.512x512x3x3": [(512, 512, 3, 3)],
    "resnet50": "resnet50",  # every tensor of the model (benchmarks.workloads)
    "vgg16": "vgg16",
}
# One of each tile shape: a group in several tiles (11008, 4608), groups sharing a tile (1x1 convs,
# norm scales).
QUICK_SHAPES = {
    "llm.mlp_down": [(4096, 11008)],
    "conv.512x512x3x3": [(512, 512, 3, 3)],
    "conv.1x1 + norm": [(256, 64, 1, 1), (256,)],
}


@contextmanager
def recorded_launches(launches: list):
    """Every `kernel[grid](...)` of a JIT function is appended to `launches`, not run."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = original


def _paths(tensors: List[torch.Tensor], grouping: str) -> List[tuple]:
    """(path name, callable) for every kernel path on `tensors` with `grouping`."""
    from fastsparse import ops
    from fastsparse.core.contract import AdamStepOptions, SGDStepOptions
    from fastsparse.core.layout import encode_groupings, group_count

    groups = encode_groupings((grouping,))
    grads = [torch.zeros_like(t) for t in tensors]
    total = sum(group_count(t.shape, grouping) for t in tensors)
    factors = torch.ones(total, dtype=torch.float64)
    sgd = SGDStepOptions(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                         first=False)  # fmt: skip
    adam = AdamStepOptions.at_step(10, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                                   decoupled=True)  # fmt: skip

    def penalty(kind):
        return lambda: ops.call(ops.penalty_op, tensors, kind, groups, 0.5, "triton")

    def backward():  # the autograd path: coefficients from the forward, then the gradient
        _, coefs = ops.call(ops.penalty_op, tensors, "l1l2", groups, 0.5, "triton")
        ops.call(ops.penalty_backward_flat_op, tensors, coefs, torch.ones(()), groups, "triton")

    def selective_decay():
        thresholds = torch.zeros(1, dtype=torch.float32)
        ops.call(ops.selective_decay_op, grads, tensors, thresholds, [0] * len(tensors), 1e-4,
                 "taylor", True, "triton")  # fmt: skip

    return [
        ("penalty group_lasso", penalty("group_lasso")),
        ("penalty backward l1l2", backward),
        ("penalty group_l1l2 (across groups)", penalty("group_l1l2")),
        ("in place l1l2", lambda: ops.call(
            ops.add_penalty_grad_op, grads, tensors, "l1l2", groups, 0.5, 1e-4, "triton")),
        ("group norms", lambda: ops.call(ops.group_norms_op, tensors, groups, "triton")),
        ("prox group_lasso", lambda: ops.call(
            ops.prox_op, tensors, groups, "group_lasso", 0.0, 1e-3, "triton")),
        ("prox l0_group_lasso", lambda: ops.call(
            ops.prox_op, tensors, groups, "l0_group_lasso", 1e-4, 1e-3, "triton")),
        ("prox group_l0", lambda: ops.call(
            ops.prox_op, tensors, groups, "group_l0", 0.0, 1e-3, "triton")),
        ("prox l1", lambda: ops.call(ops.prox_op, tensors, groups, "l1", 1e-4, 1e-4, "triton")),
        ("prox l0", lambda: ops.call(ops.prox_op, tensors, groups, "l0", 1e-4, 1e-4, "triton")),
        ("selective decay", selective_decay),
        ("feature flow", lambda: ops.call(  # three maps of the first tensor's shape
            ops.feature_flow_value_and_grads_op, [tensors[0]] * 3, 0.5, 0.25, "triton")),
        ("scale groups", lambda: ops.call(ops.scale_groups_op, tensors, groups, factors, "triton")),
        ("sgd step + prox", lambda: ops.step_prox(
            tensors, grads, [torch.zeros_like(t) for t in tensors], groups, sgd, "group_lasso",
            0.0, 1e-3, "triton")),
        ("sgd step + prox group_l0", lambda: ops.step_prox(
            tensors, grads, [torch.zeros_like(t) for t in tensors], groups, sgd, "group_l0",
            0.0, 1e-3, "triton")),
        ("adamw step + prox", lambda: ops.step_prox(
            tensors, grads, [torch.zeros_like(t) for t in tensors * 2], groups, adam,
            "group_lasso", 0.0, 1e-3, "triton")),
    ]  # fmt: skip


def capture(shapes: dict, dtypes, groupings) -> List[dict]:
    """The launches of every path, shape set, dtype and grouping, without duplicates."""
    seen, out = set(), []
    for name, shape_list in shapes.items():
        if isinstance(shape_list, str):
            from benchmarks.workloads import model_workload

            shape_list = model_workload(shape_list).shapes
        for dtype in dtypes:
            for grouping in groupings:
                if grouping == "kernels" and any(len(s) < 3 for s in shape_list):
                    continue
                # "channels" needs dim >= 2: a model's biases and norm scales go without it
                kept = [s for s in shape_list if grouping != "channels" or len(s) >= 2]
                tensors = [torch.zeros(s, dtype=dtype) for s in kept]
                for path, run in _paths(tensors, grouping):
                    launches: list = []
                    with recorded_launches(launches):
                        try:
                            run()
                        except Exception as error:  # a path a plan does not serve, say
                            out.append(_failed(name, dtype, grouping, path, error))
                            continue
                    for fn, args, kwargs in launches:
                        spec = _specialization(fn, args, kwargs)
                        key = json.dumps(
                            [spec["kernel"], spec["signature"], spec["constexprs"],
                             spec["num_warps"], spec["maxnreg"]], sort_keys=True, default=str,
                        )  # fmt: skip
                        if key in seen:
                            continue
                        seen.add(key)
                        spec.update(workload=name, dtype=str(dtype).replace("torch.", ""),
                                    grouping=str(grouping), path=path, fn=fn)  # fmt: skip
                        out.append(spec)
    return out


def _failed(name, dtype, grouping, path, error) -> dict:
    return {
        "workload": name,
        "dtype": str(dtype).replace("torch.", ""),
        "grouping": str(grouping),
        "path": path,
        "kernel": None,
        "error": f"{type(error).__name__}: {error}"[:300],
    }


def _specialization(fn, args, kwargs) -> dict:
    """ASTSource signature and constexprs of one recorded launch."""
    import triton.language as tl

    params = fn.params
    values = dict(zip((p.name for p in params), args))
    values.update({k: v for k, v in kwargs.items() if k in {p.name for p in params}})
    signature, constexprs = {}, {}
    for p in params:
        value = values[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = _POINTER_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} of type {type(value).__name__}")
    readable = {k: (str(v) if isinstance(v, tl.dtype) else v) for k, v in constexprs.items()}
    return {
        "kernel": fn.__name__,
        "signature": signature,
        "constexprs": readable,
        "raw_constexprs": constexprs,
        "num_warps": int(kwargs.get("num_warps", 4)),
        "maxnreg": kwargs.get("maxnreg"),
    }


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def compile_one(spec: dict, arch: int, workdir: Path) -> dict:
    """Compile a specialization for sm_<arch>; its resources and PTX features."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(
        fn=spec["fn"], signature=spec["signature"], constexprs=spec["raw_constexprs"]
    )
    try:
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": spec["num_warps"], "maxnreg": spec["maxnreg"]},
        )
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
        return {"arch": arch, "error": message if len(message) <= 1200 else message[-1200:]}
    cubin = workdir / f"{spec['kernel']}-{arch}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run(
        [_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True, timeout=60
    ).stdout
    match = _RESOURCES.search(usage)
    ptx = compiled.asm["ptx"]
    registers, stack, shared, local = (int(g) for g in match.groups()) if match else (None,) * 4
    return {
        "arch": arch,
        "registers": registers,
        "stack_bytes": stack,
        "shared_bytes": shared,
        "local_bytes": local,
        # Per-thread stack and local memory: these kernels have no local arrays, so a stack
        # frame or local memory is spilled registers.
        "spills": bool(stack or local),
        "vector_loads": len(re.findall(r"ld\.global(?:\.\w+)*\.v[248]", ptx)),
        "vector_stores": len(re.findall(r"st\.global(?:\.\w+)*\.v[248]", ptx)),
        "div64": len(re.findall(r"\b(?:div|rem)\.[su]64", ptx)),
        "approx_sqrt": len(re.findall(r"sqrt\.approx", ptx)),
        "approx_div": len(re.findall(r"div\.(?:full|approx)\.f32|rcp\.approx", ptx)),
    }


def markdown(run: dict) -> str:
    rows = [r for r in run["rows"] if r.get("kernel")]
    out = [
        f"# Triton kernels compiled ahead of time ({run['date']})",
        "",
        f"triton {run['triton']}, torch {run['torch']}, commit {run['commit']}; "
        f"{len(rows)} specializations x sm_{', sm_'.join(map(str, ARCHS))}. "
        "stack / local = bytes per thread (these kernels have no local arrays: spilled "
        "registers); limit = the launch's maxnreg; vec ld/st = vector "
        "global loads/stores in the PTX; div64 = 64-bit divisions and remainders; approx = "
        "approximate sqrt / division.",
        "",
        "| kernel | path | workload | dtype | grouping | warps | constexprs | arch | "
        "regs / limit | stack / local | vec ld | vec st | div64 | approx sqrt/div |",
        "|---|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        blocks = {k: v for k, v in r["constexprs"].items() if k.startswith("BLOCK")}
        for c in r["compiled"]:
            if "error" in c:
                out.append(f"| {r['kernel']} | {r['path']} | {r['workload']} | {r['dtype']} | "
                           f"{r['grouping']} | {r['num_warps']} | {blocks} | {c['arch']} | "
                           f"compile error: {c['error'][:80]} | | | | | |")  # fmt: skip
                continue
            out.append(
                f"| {r['kernel']} | {r['path']} | {r['workload']} | {r['dtype']} | "
                f"{r['grouping']} | {r['num_warps']} | {blocks} | {c['arch']} | "
                f"{c['registers']} / {r.get('maxnreg') or '-'} | "
                f"{c['stack_bytes']} / {c['local_bytes']} | "
                f"{c['vector_loads']} | {c['vector_stores']} | {c['div64']} | "
                f"{c['approx_sqrt']}/{c['approx_div']} |"
            )
    failed = [r for r in run["rows"] if not r.get("kernel")]
    if failed:
        out += ["", "Paths that did not launch:", ""]
        out += [f"- {r['path']} on {r['workload']} {r['dtype']} {r['grouping']}: {r['error']}"
                for r in failed]  # fmt: skip
    s = run["summary"]
    out += ["", f"Summary: {s['compiled']} compiles, {s['errors']} errors, {s['spilling']} spill, "
            f"{s['with_vector_loads']} with vector loads, {s['with_div64']} with 64-bit "
            f"divisions, {s.get('with_approx', 0)} with approximate sqrt or division.",
            ""]  # fmt: skip
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_static", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a bounded subset (CI)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--fail-on-spill", action="store_true", help="exit 1 if any spills")
    parser.add_argument("--tag", default="", help="suffix of the table's file names")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        print("run without TRITON_INTERPRET: the kernels must be JIT functions", file=sys.stderr)
        return 2
    import tempfile

    import triton

    shapes = QUICK_SHAPES if args.quick else SHAPES
    dtypes = (torch.bfloat16,) if args.quick else (torch.bfloat16, torch.float32)
    groupings = ("filters", "channels", None)
    specs = capture(shapes, dtypes, groupings)
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            if spec.get("kernel"):
                spec["compiled"] = [compile_one(spec, arch, Path(tmp)) for arch in ARCHS]
    for spec in specs:
        spec.pop("fn", None)
        spec.pop("raw_constexprs", None)
    compiled = [c for s in specs for c in s.get("compiled", [])]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    run = {
        "date": datetime.date.today().isoformat(),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "commit": commit,
        "quick": args.quick,
        "rows": specs,
        "summary": {
            "compiled": sum("error" not in c for c in compiled),
            "errors": sum("error" in c for c in compiled),
            "spilling": sum(bool(c.get("spills")) for c in compiled),
            "with_vector_loads": sum(bool(c.get("vector_loads")) for c in compiled),
            "with_div64": sum(bool(c.get("div64")) for c in compiled),
            "with_approx": sum(bool(c.get("approx_sqrt") or c.get("approx_div")) for c in compiled),
        },
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"gpu-static-{run['date']}" + ("-quick" if args.quick else "")
    stem += f"-{args.tag}" if args.tag else ""
    (args.out_dir / f"{stem}.json").write_text(json.dumps(run, indent=1, default=str))
    (args.out_dir / f"{stem}.md").write_text(markdown(run))
    print(json.dumps(run["summary"]))
    failed_paths = [s for s in specs if not s.get("kernel")]
    if run["summary"]["errors"] or failed_paths:
        return 1
    if args.fail_on_spill and run["summary"]["spilling"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
