"""The Triton backend: kernels and launchers, one module per op. Importing these needs triton."""
