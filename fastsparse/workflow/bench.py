"""`fastsparse bench`: run the benchmark harness of a fastsparse source checkout.

The harness lives in the repository's `benchmarks/` directory (next to the results it writes)
and is not installed with the package. This module finds it and runs ``benchmarks.run`` in a
child Python process, so the package never imports the harness (the harness imports the
package, never the other way round):

1. the directory named by the environment variable FASTSPARSE_BENCHMARKS_DIR, else
2. ``<repository>/benchmarks`` beside this package (an editable install, ``pip install -e .``,
   or running from the checkout).

The child puts that directory's parent first on its import path, so an unrelated module named
``benchmarks`` elsewhere is never picked up, and it keeps the caller's working directory, so
relative paths in the arguments mean what they say. Importing this module imports neither the
harness nor triton, and does not touch CUDA.

    >>> from fastsparse.workflow import bench
    >>> bench.main(["--device", "cpu", "--quick"])  # doctest: +SKIP
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

ENV_VAR = "FASTSPARSE_BENCHMARKS_DIR"

# The child's whole program: the checkout's root goes first on sys.path, then the harness runs.
_CHILD = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from benchmarks.run import main; sys.exit(main(sys.argv[1:]))"
)


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


def main(argv: Optional[List[str]] = None) -> int:
    """Run the harness with command-line arguments `argv`; return its exit code."""
    directory = find_harness()
    if directory is None:
        print(
            "fastsparse bench: fastsparse bench needs the benchmark harness of a source "
            "checkout: clone the "
            "repository and run `pip install -e .` there (or `python -m benchmarks.run` from "
            f"its root), or set {ENV_VAR} to its benchmarks/ directory",
            file=sys.stderr,
        )
        return 2
    argv = list(sys.argv[1:] if argv is None else argv)
    command = [sys.executable, "-c", _CHILD, str(directory.parent), *argv]
    return subprocess.run(command, check=False).returncode
