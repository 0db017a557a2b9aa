"""Build script: pure Python by default.

The native sources in `fastsparse/backends/csrc/` ship as package data and are compiled just in
time, on first use, by fastsparse/backends/native.py (see the README). So `pip install .` needs
no compiler, and nothing here has side effects.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["fastsparse", "fastsparse.*"]) + ["fastsparse.data"],
    # The bundled MNIST subset with its licence, and the native sources that
    # fastsparse/backends/native.py compiles on first use.
    package_data={
        "fastsparse.data": ["*.npz", "*.LICENSE"],
        "fastsparse.backends.csrc": ["*.h", "*.cpp", "*.cu"],
    },
)
