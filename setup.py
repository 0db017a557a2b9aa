"""Build script: pure Python by default.

`kernels/` is installed as the subpackage `fastsparse.kernels` (never as a top-level `kernels`
module: that name belongs to another PyPI project), and `csrc/` as `fastsparse.csrc`: the native
sources ship as package data and are compiled just in time, on first use, by
fastsparse/native.py (see the README). So `pip install .` needs no compiler, and nothing here
has side effects.
"""

from setuptools import setup

setup(
    packages=["fastsparse", "fastsparse.kernels", "fastsparse.data", "fastsparse.csrc"],
    package_dir={
        "fastsparse": "fastsparse",
        "fastsparse.kernels": "kernels",
        "fastsparse.data": "fastsparse/data",
        "fastsparse.csrc": "csrc",
    },
    # The bundled MNIST subset with its licence, and the native sources that
    # fastsparse/native.py compiles on first use.
    package_data={
        "fastsparse.data": ["*.npz", "*.LICENSE"],
        "fastsparse.csrc": ["*.h", "*.cpp", "*.cu"],
    },
)
