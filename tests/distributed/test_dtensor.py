"""DTensor (FSDP2, tensor parallel) and DDP on 2 gloo processes; the FSDP2 example.

The checks themselves live in tests/distributed/distributed_checks.py: one spawn of 2 processes
runs them all (starting processes costs most of the time on a small machine), and each test here
reports one check's result on both ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastsparse as fs
from fastsparse.core.groups import attention_head_groups, mlp_neuron_groups
from tests.distributed import distributed_checks

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed/gloo"
)

TIMEOUT = 240  # seconds for one spawned run of checks
ROOT = Path(__file__).resolve().parents[2]


def spawn_checks(world: int, names: list, out: Path) -> dict:
    """{check name: [traceback or None per rank]} of one spawned run of `names`."""
    context = mp.start_processes(
        distributed_checks.run,
        args=(world, distributed_checks.free_port(), str(out), names),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the distributed checks did not finish in {TIMEOUT} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    ranks = []
    for rank in range(world):
        with open(out / f"rank{rank}.json") as f:
            ranks.append(json.load(f))
    return {name: [r.get(name, "not run") for r in ranks] for name in names}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Every 1-D check, run once by 2 processes."""
    return spawn_checks(2, list(distributed_checks.CHECKS), tmp_path_factory.mktemp("mesh1d"))


@pytest.fixture(scope="module")
def results_2d(tmp_path_factory) -> dict:
    """Every 2 x 2 mesh check (HSDP, FSDP + tensor parallel), run once by 4 processes."""
    return spawn_checks(4, list(distributed_checks.CHECKS_2D), tmp_path_factory.mktemp("mesh2d"))


def assert_ok(errors_per_rank: list) -> None:
    errors = [f"rank {r}:\n{e}" for r, e in enumerate(errors_per_rank) if e is not None]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name", list(distributed_checks.CHECKS))
def test_distributed(results, name):
    assert_ok(results[name])


@pytest.mark.parametrize("name", list(distributed_checks.CHECKS_2D))
def test_distributed_2d_mesh(results_2d, name):
    assert_ok(results_2d[name])


def run_example(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "fsdp_llm.py"), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
    )


def test_fsdp_example_trains_a_few_steps_on_cpu():
    result = run_example("--steps", "3", "--log-every", "1", "--device", "cpu", "--nproc", "2")
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("step")]
    assert len(lines) == 3, result.stdout
    assert "neurons < 0.05 max:" in lines[-1]
    assert "zeroed" in result.stdout.splitlines()[-1], result.stdout


@pytest.mark.gpu
def test_fsdp_example_on_gpu():
    result = run_example("--steps", "5", "--log-every", "1", "--path", "inplace")
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("step")]
    assert len(lines) == 5, result.stdout


def test_attention_head_and_mlp_neuron_groups():
    """Head groups (grouped-query: one k/v head with the query heads sharing it) and neuron
    groups match norms computed by hand, on plain tensors."""
    d, heads, kv_heads, dim = 3, 4, 2, 5
    q, o = torch.randn(heads * d, dim), torch.randn(dim, heads * d)
    k, v = torch.randn(kv_heads * d, dim), torch.randn(kv_heads * d, dim)
    group = attention_head_groups(q, k, v, o, heads, kv_heads)
    assert group.num_groups == kv_heads
    (norms,) = fs.group_norms(None, groups=group, backend="torch")
    for j in range(kv_heads):
        rows = slice(2 * j * d, 2 * (j + 1) * d)  # query heads 2j and 2j + 1
        kv = slice(j * d, (j + 1) * d)
        parts = [q[rows], k[kv], v[kv], o[:, rows]]
        expected = torch.sqrt(sum(p.square().sum() for p in parts))
        torch.testing.assert_close(norms[j], expected)

    gate, up, down = torch.randn(7, dim), torch.randn(7, dim), torch.randn(dim, 7)
    (norms,) = fs.group_norms(None, groups=mlp_neuron_groups(gate, up, down), backend="native")
    expected = torch.sqrt(gate.square().sum(1) + up.square().sum(1) + down.square().sum(0))
    torch.testing.assert_close(norms, expected)
    with pytest.raises(ValueError, match="do not split"):
        attention_head_groups(q, k, v, o, 5)
