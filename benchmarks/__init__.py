"""fastsparse's benchmark harness (a source-checkout package, not installed with fastsparse).

Run it with ``python -m benchmarks.run`` from the repository root, or ``fastsparse bench``
(which finds this directory through fastsparse.workflow.bench). See benchmarks/results/README.md.
"""
