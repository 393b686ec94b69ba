"""Maps the source directory ``kernels/`` to the subpackage ``fastclip.kernels``.

No top-level ``kernels`` module is installed: that import name belongs to another PyPI package.
Metadata lives in pyproject.toml.
"""

from setuptools import setup

setup(
    packages=[
        "fastclip",
        "fastclip.ops",
        "fastclip.models",
        "fastclip.train",
        "fastclip.bench",
        "fastclip.kernels",
    ],
    package_dir={"fastclip": "fastclip", "fastclip.kernels": "kernels"},
    package_data={"fastclip": ["py.typed"]},
)
