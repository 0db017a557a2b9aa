"""Test setup: Triton runs on the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton decorates the kernels (first import of
fastsparse.backends.triton), hence here, before any test module is imported. The test folders
mirror the package (tests/core, tests/functional, ...); they are packages, so shared code is
imported as `from tests.helpers import ...` and these fixtures apply in every folder. On a GPU
machine the same Triton tests run compiled, on CUDA tensors.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The device the Triton backend runs on in this test run.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return TRITON_DEVICE


# The fused backends every kernel test runs on: Triton (compiled on a GPU, interpreted on the
# CPU) and the native C++ kernels (CUDA C++ on a GPU, OpenMP C++ on the CPU).
FUSED_BACKENDS = ["triton", "native"]


@pytest.fixture(params=FUSED_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def nan_outputs(monkeypatch):
    """Fill every uninitialized penalty kernel output with NaN, so an unwritten element fails."""
    from tests.helpers import fill_new_empty_with_nan  # not at the top: after TRITON_INTERPRET

    fill_new_empty_with_nan(
        monkeypatch, "fastsparse.backends.triton.penalty", "fastsparse.backends.native"
    )
