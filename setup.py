"""Maps the source directory ``kernels/`` to the subpackage ``fastclip.kernels``.

No top-level ``kernels`` module is installed: that import name belongs to another PyPI package.
Every other subpackage is found under ``fastclip/`` (a hand-kept list once left two out of the
wheel while the editable install, which reads the tree, still worked). Metadata lives in
pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["fastclip", "fastclip.*"]) + ["fastclip.kernels"],
    package_dir={"fastclip": "fastclip", "fastclip.kernels": "kernels"},
    package_data={"fastclip": ["py.typed"]},
)
