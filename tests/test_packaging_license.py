"""pyproject.toml's license (issue 28 #15): the SPDX string form (PEP 639), so that the install prints no
setuptools deprecation of ``project.license`` as a TOML table, and a build requirement of the first
setuptools that accepts it (77; 68-76 reject a string license)."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import pytest

        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_license_is_an_spdx_string_and_the_build_needs_a_setuptools_that_reads_it():
    data = _pyproject()
    assert data["project"]["license"] == "Apache-2.0"
    (req,) = [r for r in data["build-system"]["requires"] if r.startswith("setuptools")]
    found = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", req.replace(" ", ""))
    assert found and int(found.group(1)) >= 77, req
    assert not any(c.startswith("License ::") for c in data["project"].get("classifiers", [])), (
        "setuptools refuses License classifiers beside an SPDX license expression"
    )
