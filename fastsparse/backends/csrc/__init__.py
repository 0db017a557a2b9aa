"""Native sources (CPU C++ and CUDA C++), shipped as package data and compiled on first use by
fastsparse/backends/native.py. Nothing to import here."""
