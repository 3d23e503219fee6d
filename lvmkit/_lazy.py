"""Lazy attribute loading for the package namespaces.

Subpackages expose their public names through a table ``{name: module}`` so that
``import lvmkit`` stays cheap and a user who needs only the models never imports the
estimators (or ArviZ).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, table: dict[str, str]) -> tuple[Callable, Callable]:
    """Return ``(__getattr__, __dir__)`` for a package whose names live in submodules."""

    def __getattr__(name: str):
        try:
            module = table[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        return getattr(importlib.import_module(module, package), name)

    def __dir__() -> list[str]:
        return sorted(table)

    return __getattr__, __dir__
