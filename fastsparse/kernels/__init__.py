"""Triton kernels of fastsparse, installed as `fastsparse.kernels`. Importing this needs triton."""
