"""The Triton backend as fastsparse/engine.py sees it: its plans and primitives."""

from fastsparse.kernels.penalty import apply, fused, plans, rule, stats
from fastsparse.kernels.prox import prox

__all__ = ["apply", "fused", "plans", "prox", "rule", "stats"]
