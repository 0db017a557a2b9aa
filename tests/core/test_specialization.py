"""No value-dependent recompiles: Triton compiles one specialization per kernel for a whole run in
which the float arguments (thresholds, strengths, learning rates, bias corrections) change at
every step, from 0 on.

Triton keys a launch on its arguments: an int argument is typed by its range (i32 or i64) and,
unless the kernel lists it in `do_not_specialize`, specialized on its value (1 becomes a
constant, a multiple of 16 is marked divisible); a tensor on its dtype and 16-byte alignment; a
Python float is "fp32", never specialized. fp64 kernels take their float arguments as the
double's bits in an int (`scalar_arg`), so without `do_not_specialize` and the bit mask, the bits
of a changing threshold would make new keys. The launches are recorded, not run, as the
ahead-of-time compile check does (benchmarks/gpu_static.py), in a process without the Triton
interpreter (whose kernels have no specialization).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch

    from benchmarks.gpu_static import recorded_launches
    from fastsparse import ops
    from fastsparse.core.contract import AdamStepOptions, SGDStepOptions
    from fastsparse.core.layout import encode_groupings

    def key(fn, args, kwargs):
        values = dict(zip((p.name for p in fn.params), args))
        values.update(kwargs)
        parts = []
        for p in fn.params:
            v = values[p.name]
            if p.is_constexpr:
                parts.append(repr(v))
            elif isinstance(v, torch.Tensor):
                parts.append((str(v.dtype), v.data_ptr() % 16 == 0))
            elif isinstance(v, bool):
                parts.append("i1")
            elif isinstance(v, int):
                kind = "i32" if -(2**31) <= v < 2**31 else "i64"
                if not p.do_not_specialize:
                    kind += "=1" if v == 1 else ("D" if v % 16 == 0 else "")
                parts.append(kind)
            else:
                parts.append(type(v).__name__)
        return repr(parts) + repr(sorted((k, repr(v)) for k, v in kwargs.items()
                                         if k not in {p.name for p in fn.params}))

    launches = []
    torch.manual_seed(0)
    with recorded_launches(launches):
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            weights = [torch.randn(64, 32, 3, 3).to(dtype), torch.randn(128, 64).to(dtype)]
            grads = [torch.randn_like(w) for w in weights]
            groups = encode_groupings(("filters",))
            for step in range(20):
                # 0 at the first step (a warmup), then values of every kind: round, odd, tiny.
                x = 0.0 if step == 0 else 0.37 * 1.7**step / 3.0 ** (step % 5)
                sgd = SGDStepOptions(lr=x, momentum=0.9, dampening=0.0, weight_decay=x / 7,
                                     nesterov=False, first=False)
                adam = AdamStepOptions.at_step(step + 1, lr=x, betas=(0.9, 0.999), eps=1e-8,
                                               weight_decay=x / 3, decoupled=True)
                bufs = [torch.zeros_like(w) for w in weights]
                ops.call(ops.add_penalty_grad_op, grads, weights, "l1l2", groups, 0.5, x, "triton")
                ops.call(ops.add_penalty_grad_op, grads, weights, "sparse_group_lasso", groups,
                         min(x, 1.0), x, "triton")
                ops.call(ops.prox_op, weights, groups, "group_lasso", 0.0, x, "triton")
                ops.call(ops.prox_op, weights, groups, "l0_group_lasso", x / 5, x, "triton")
                ops.step_prox(weights, grads, bufs, groups, sgd, "group_lasso", 0.0, x, "triton")
                ops.step_prox(weights, grads, bufs + bufs, groups, adam, "group_lasso", 0.0, x,
                              "triton")
    keys = {}
    for fn, args, kwargs in launches:
        keys.setdefault(fn.__name__, set()).add(key(fn, args, kwargs))
    json.dump({name: len(found) for name, found in keys.items()}, sys.stdout)
    """
)


def test_changing_float_arguments_compile_one_specialization_per_kernel():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real JIT kernels
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"_penalty_grad_kernel", "_prox_kernel", "_step_prox_kernel"} <= set(counts)
    # One key per kernel and (dtype, path) configuration, as with constant arguments: never
    # one more when a value changes.
    assert counts == _configurations(), counts


def _configurations() -> dict:
    """The specializations the run needs with no value-dependent ones, found by running it with
    every float argument the same at every step."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    constant = SCRIPT.replace(
        "x = 0.0 if step == 0 else 0.37 * 1.7**step / 3.0 ** (step % 5)", "x = 0.37"
    )
    assert constant != SCRIPT
    result = subprocess.run(
        [sys.executable, "-c", constant], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
