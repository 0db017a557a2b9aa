"""Sparsity methods: the Regularizer (any penalty kind) and the methods of the seed papers
(OICSR, feature flow, selective weight decay, network slimming), each behind the `Method`
interface of fastsparse/methods/base.py.
"""

from fastsparse.methods.base import METHODS, Method, build_method
from fastsparse.methods.regularizer import Regularizer

__all__ = ["METHODS", "Method", "Regularizer", "build_method"]
