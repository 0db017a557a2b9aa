"""Native sources (CPU C++ and CUDA C++), shipped as package data and compiled on first use by
fastsparse/core/native.py. Nothing to import here."""
