"""The native backend's build machinery, CUDA compilation and cross-backend parity.

Numerical parity of every op, kind, grouping and dtype with the oracle runs in the shared tests
(tests/functional are parametrized over the fused backends, "native" included).
"""

import ctypes
import importlib.resources
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastsparse as fs
from fastsparse.backends import native
from tests.helpers import make


def test_build_is_cached_and_respects_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSPARSE_CACHE_DIR", str(tmp_path))
    first = native.build("cpu")
    assert first.parent == tmp_path / "native" and first.exists()
    stamp = first.stat().st_mtime_ns
    assert native.build("cpu") == first and first.stat().st_mtime_ns == stamp


def test_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(native.NativeBuildError, match="no compiler: '/nonexistent/c\\+\\+'"):
        native.build("cpu")


def test_cuda_arch_list(monkeypatch):
    monkeypatch.setenv("FASTSPARSE_CUDA_ARCH_LIST", "9.0")
    assert native.cuda_arch_flags() == [
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    monkeypatch.setenv("FASTSPARSE_CUDA_ARCH_LIST", " ")
    with pytest.raises(ValueError, match="names no architecture"):
        native.cuda_arch_flags()


@pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "c++") is None, reason="no C++ compiler")
def test_step_option_structs_match_the_header(tmp_path):
    """The ctypes mirrors of SGDStepOptions / AdamStepOptions lay their fields out where the C
    structs fs_sgd_step / fs_adam_step of fastsparse_native.h have them: same names, order,
    offsets and sizes (a field added on one side only fails to compile or to match here)."""
    from fastsparse.core.contract import AdamStepOptions, SGDStepOptions

    header = (
        Path(str(importlib.resources.files("fastsparse.backends.csrc"))) / "fastsparse_native.h"
    )
    structs = {"fs_sgd_step": SGDStepOptions, "fs_adam_step": AdamStepOptions}
    lines, expected = [], []
    for c_name, options in structs.items():
        mirror = native._STEP_STRUCTS[options]
        lines.append(f'printf("%zu\\n", sizeof({c_name}));')
        expected.append(ctypes.sizeof(mirror))
        for field in options._fields:
            lines.append(f'printf("%zu %zu\\n", offsetof({c_name}, {field}), '
                         f"sizeof((({c_name}*)0)->{field}));")  # fmt: skip
            expected.append(f"{getattr(mirror, field).offset} {getattr(mirror, field).size}")
    program = tmp_path / "layout.cpp"
    program.write_text(
        f'#include <cstddef>\n#include <cstdio>\n#include "{header}"\n'
        "int main() {\n" + "\n".join(lines) + "\nreturn 0;\n}\n"
    )
    compiler = os.environ.get("CXX") or "c++"
    built = subprocess.run([compiler, "-std=c++17", str(program), "-o", str(tmp_path / "layout")],
                           capture_output=True, text=True)  # fmt: skip
    assert built.returncode == 0, built.stderr
    printed = subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True).stdout
    assert printed.split("\n")[:-1] == [str(e) for e in expected]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_sources_compile_for_sm90(tmp_path):
    sources = sorted(Path(str(importlib.resources.files("fastsparse.backends.csrc"))).glob("*.cu"))
    assert sources, "no CUDA sources found in fastsparse.backends.csrc"
    for source in sources:
        result = subprocess.run(
            ["nvcc", "-arch=sm_90", "-std=c++17", "-c", str(source), "-o", str(tmp_path / "x.o")],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr


def test_native_matches_triton(device):
    tensors = make([(16, 8, 3, 3), (16,), (10, 24), (2, 20000)], torch.float32, device, seed=21)
    for kind in ("l1l2", "group_hoyer_square", "sparse_group_lasso"):
        results = {}
        for backend in ("native", "triton"):
            leaves = [t.clone().requires_grad_(True) for t in tensors]
            value = fs.penalty(leaves, kind, groups=("filters", None), backend=backend)
            value.backward()
            results[backend] = (value.detach(), [leaf.grad for leaf in leaves])
        torch.testing.assert_close(results["native"][0], results["triton"][0])
        for a, b in zip(results["native"][1], results["triton"][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_results_do_not_depend_on_the_thread_count():
    code = textwrap.dedent(
        """
        import sys, torch, fastsparse as fs
        g = torch.Generator().manual_seed(0)
        ws = [torch.randn(64, 32, 3, 3, generator=g), torch.randn(3, 40000, generator=g)]
        for w in ws:
            w.grad = torch.zeros_like(w)
        v = fs.add_penalty_grad_(ws, "group_l1l2", 0.5, groups=("filters", None),
                                 backend="native")
        torch.save([v] + [w.grad for w in ws], sys.argv[1])
        """
    )
    outputs = []
    for threads in ("1", "2"):
        path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fs_threads_{threads}.pt")
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        subprocess.run([sys.executable, "-c", code, path], check=True, env=env, timeout=120)
        outputs.append(torch.load(path))
    for a, b in zip(*outputs):
        assert torch.equal(a, b)
