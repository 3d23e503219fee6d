"""Sphinx configuration for lvmkit's documentation (``make docs``)."""

from __future__ import annotations

import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import lvmkit  # noqa: E402

project = "lvmkit"
author = "lvmkit developers"
copyright = "2026, lvmkit developers"
release = lvmkit.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
    "myst_nb",
]

# The tutorials are rendered from their committed outputs, never re-executed here.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"
# Pyro's and torch's own signatures are documented elsewhere; do not fail on their
# cross-references.
nitpicky = False
intersphinx_mapping = {}

exclude_patterns = ["_build", "**.ipynb_checkpoints"]
html_theme = "sphinx_rtd_theme"
html_title = f"lvmkit {release}"


def _copy_tutorials() -> None:
    """Sphinx reads only files under docs/: copy the committed notebooks in."""
    source = os.path.join(ROOT, "tutorials")
    target = os.path.join(os.path.dirname(__file__), "tutorials")
    os.makedirs(target, exist_ok=True)
    for name in sorted(os.listdir(source)):
        if name.endswith(".ipynb"):
            shutil.copy2(os.path.join(source, name), os.path.join(target, name))


_copy_tutorials()
