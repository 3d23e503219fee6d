"""What the README, pyproject, LICENSE, CITATION.cff and CHANGELOG claim agrees."""

import re
import sys
import tomllib
from pathlib import Path

import lvmkit

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_python_version_claims_agree_and_hold():
    minimum = re.fullmatch(r">=(\d+)\.(\d+)", PYPROJECT["requires-python"])
    assert minimum, PYPROJECT["requires-python"]
    major, minor = map(int, minimum.groups())
    assert f"Python {major}.{minor} or newer" in (ROOT / "README.md").read_text()
    assert sys.version_info[:2] >= (major, minor)
    listed = {c.rsplit(" ", 1)[-1] for c in PYPROJECT["classifiers"]
              if c.startswith("Programming Language :: Python :: 3.")}
    assert f"{major}.{minor}" in listed


def test_version_license_and_citation_agree():
    version = PYPROJECT["version"]
    assert lvmkit.__version__ == version
    assert re.search(rf"^version: {re.escape(version)}$", (ROOT / "CITATION.cff").read_text(),
                     re.M)
    assert f"## {version}" in (ROOT / "CHANGELOG.md").read_text()
    assert PYPROJECT["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
