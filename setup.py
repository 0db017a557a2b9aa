"""Build script: pure Python by default.

`csrc/` is installed as `fastsparse.csrc`: the native sources ship as package data and are
compiled just in time, on first use, by fastsparse/core/native.py (see the README). So
`pip install .` needs no compiler, and nothing here has side effects.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["fastsparse", "fastsparse.*"])
    + ["fastsparse.data", "fastsparse.csrc"],
    package_dir={"fastsparse": "fastsparse", "fastsparse.csrc": "csrc"},
    # The bundled MNIST subset with its licence, and the native sources that
    # fastsparse/core/native.py compiles on first use.
    package_data={
        "fastsparse.data": ["*.npz", "*.LICENSE"],
        "fastsparse.csrc": ["*.h", "*.cpp", "*.cu"],
    },
)
