"""pytest-benchmark suite: small cases, for quick comparisons between commits.

Not collected by the default `pytest` run (testpaths = tests). Run it from the repository root:

    python -m pytest benchmarks/test_pytest_benchmark.py --benchmark-only
    python -m pytest benchmarks/test_pytest_benchmark.py --benchmark-only --benchmark-autosave
    python -m pytest benchmarks/test_pytest_benchmark.py --benchmark-only --benchmark-compare

It runs on CUDA when available (Triton included), else on CPU (Triton skipped). The cases and
providers are those of the harness (benchmarks/run.py); the harness is the one that measures
the large sizes, bandwidth and memory. pytest-benchmark saves to .benchmarks/ (git-ignored).
"""

import pytest
import torch

from benchmarks.providers import Case, all_providers
from benchmarks.run import MODES
from benchmarks.workloads import model_workload, tensor_workload

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
WORKLOADS = {
    "lenet5.conv2-fp32": lambda: tensor_workload("lenet5.conv2", torch.float32),
    "resnet50.conv1x1-bf16": lambda: tensor_workload("resnet50.conv1x1", torch.bfloat16),
    "lenet5-model": lambda: model_workload("lenet5"),
}
PROVIDERS = {p.name: p for p in all_providers() if not p.name.startswith("compile")}


@pytest.fixture(scope="module", params=list(WORKLOADS))
def workload(request):
    return WORKLOADS[request.param]()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("provider_name", list(PROVIDERS))
def test_bench(benchmark, workload, mode, provider_name):
    provider = PROVIDERS[provider_name]
    params, model = workload.build(DEVICE)
    case = Case(workload, params, model, "l1l2", "filters", 0.5, 1e-4, DEVICE)
    reason = provider.unavailable(case) or provider.unsupported(mode, case)
    if reason:
        pytest.skip(reason)
    provider.start(case)
    setup, fn = MODES[mode].build(provider, case)

    def call():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{workload.label} {mode}"
    benchmark.extra_info["bytes"] = MODES[mode].min_bytes(workload, "filters")
    benchmark.pedantic(call, setup=setup, rounds=20, warmup_rounds=2)
    provider.finish()
