"""fastsparse: fused kernels for structured-sparsity regularization and filter pruning.

Importing this package never imports Triton and never initializes CUDA; kernels load on first use.
"""

from fastsparse.reference import ACROSS_GROUP_KINDS, GROUPINGS, KINDS

__version__ = "0.1.0"

__all__ = ["ACROSS_GROUP_KINDS", "GROUPINGS", "KINDS", "__version__"]
