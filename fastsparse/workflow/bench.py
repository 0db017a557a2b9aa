"""`fastsparse bench`: run the benchmark harness of a fastsparse source checkout.

The harness lives in the repository's `benchmarks/` directory (next to the results it writes)
and is not installed with the package. This module finds it and calls
``benchmarks.run.main(argv)``:

1. the directory named by the environment variable FASTSPARSE_BENCHMARKS_DIR, else
2. ``<repository>/benchmarks`` beside this package (an editable install, ``pip install -e .``,
   or running from the checkout).

It is loaded under its package name ``benchmarks`` from that path, whatever sys.path holds, so
an unrelated installed module of that name is never picked up by mistake. Importing this module
imports neither the harness nor triton, and does not touch CUDA.

    >>> from fastsparse.workflow import bench
    >>> bench.main(["--device", "cpu", "--quick"])  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import List, Optional

ENV_VAR = "FASTSPARSE_BENCHMARKS_DIR"


def find_harness() -> Optional[Path]:
    """The benchmarks/ directory to run, or None when there is no source checkout."""
    candidates = []
    if os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]))
    candidates.append(Path(__file__).resolve().parents[2] / "benchmarks")
    for directory in candidates:
        if (directory / "run.py").is_file() and (directory / "__init__.py").is_file():
            return directory.resolve()
    return None


def load_harness() -> ModuleType:
    """Import and return ``benchmarks.run`` from the directory find_harness() gives.

    Raises:
        RuntimeError: no checkout found, or another module named ``benchmarks`` is loaded.
    """
    directory = find_harness()
    if directory is None:
        raise RuntimeError(
            "fastsparse bench needs the benchmark harness of a source checkout: clone the "
            "repository and run `pip install -e .` there (or `python -m benchmarks.run` from "
            f"its root), or set {ENV_VAR} to its benchmarks/ directory"
        )
    loaded = sys.modules.get("benchmarks")
    if loaded is not None:
        where = Path(getattr(loaded, "__file__", "") or "").resolve().parent
        if where != directory:
            raise RuntimeError(
                f"a different module named 'benchmarks' is already imported (from {where}); "
                f"expected {directory}"
            )
    else:
        spec = importlib.util.spec_from_file_location(
            "benchmarks", directory / "__init__.py", submodule_search_locations=[str(directory)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["benchmarks"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["benchmarks"]
            raise
    return importlib.import_module("benchmarks.run")


def main(argv: Optional[List[str]] = None) -> int:
    """Run the harness with command-line arguments `argv`; return its exit code."""
    try:
        harness = load_harness()
    except RuntimeError as error:
        print(f"fastsparse bench: {error}", file=sys.stderr)
        return 2
    return harness.main(argv)
