"""`import fastsparse` is lean: no triton, no CUDA initialization, works without triton."""

import subprocess
import sys
import textwrap


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_import_does_not_load_triton_or_initialize_cuda():
    result = run_python(
        """
        import sys
        import torch
        import fastsparse
        assert "triton" not in sys.modules, "import fastsparse imported triton"
        assert "fastsparse.backends.triton" not in sys.modules
        assert not torch.cuda.is_initialized(), "import fastsparse initialized CUDA"
        w = torch.randn(4, 3, requires_grad=True)
        fastsparse.penalty(w, "l1l2").backward()  # auto backend on CPU: native C++ kernels
        fastsparse.add_penalty_grad_(w, "group_lasso", 1e-3)
        fastsparse.prox_(w.detach(), "group_lasso", 1e-3)
        # Eager calls skip the torch.library dispatcher, whose first call imports torch._dynamo
        # (and, through it, triton): seconds on a CPU-only machine.
        assert "torch._dynamo" not in sys.modules, "a CPU call imported torch._dynamo"
        assert "triton" not in sys.modules, "a CPU call imported triton"
        assert not torch.cuda.is_initialized()
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_import_works_without_triton_installed():
    result = run_python(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` fail as if not installed
        import importlib.util
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "triton" else real(name, *a)
        import torch
        import fastsparse
        w = torch.randn(4, 3)
        assert fastsparse.penalty(w, "group_lasso").item() > 0
        try:
            fastsparse.penalty(w, "l1", backend="triton")
        except RuntimeError as e:
            assert "triton is not installed" in str(e), e
        else:
            raise AssertionError("backend='triton' without triton did not raise")
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_import_and_the_optimizer_load_no_optional_dependency():
    result = run_python(
        """
        import sys
        import torch
        import fastsparse
        optional = ("triton", "torch_pruning", "transformers", "lightning", "matplotlib",
                    "accelerate", "torchao", "fastsparse.integrations")
        loaded = [m for m in optional if m in sys.modules]
        assert not loaded, f"import fastsparse imported {loaded}"
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        # torch's own optimizers import torch._dynamo, and through it triton: not counted
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        before = set(sys.modules)
        opt = fastsparse.SparseOptimizer(
            sgd, model, [fastsparse.Rule(prox="group_lasso", strength=0.1)]
        )
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        new = set(sys.modules) - before
        loaded = [m for m in optional + ("fastsparse.backends.triton",) if m in new]
        assert not loaded, f"a SparseOptimizer step imported {loaded}"
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
