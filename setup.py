"""Build script: pure Python by default.

`kernels/` is installed as the subpackage `fastsparse.kernels` (never as a top-level `kernels`
module: that name belongs to another PyPI project). Native extensions (csrc/) are optional and
added by a later change; `pip install .` needs no compiler.
"""

from setuptools import setup

setup(
    packages=["fastsparse", "fastsparse.kernels"],
    package_dir={"fastsparse": "fastsparse", "fastsparse.kernels": "kernels"},
    package_data={"fastsparse": ["data/*.npz", "data/*.LICENSE"]},
    include_package_data=True,
)
