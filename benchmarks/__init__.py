"""fastsparse's benchmark harness (a source-checkout package, not installed with fastsparse).

Run it with ``python -m benchmarks.run`` from the repository root, or ``fastsparse bench``
(fastsparse.workflow.bench finds this directory and runs it in a child process: the package never
imports the harness). See benchmarks/results/README.md.
"""
