"""Training, evaluation, gradient estimators and diagnostics."""

from lvmkit._lazy import lazy_exports

# name -> submodule; add a line when a module gains a public name.
_EXPORTS: dict[str, str] = {}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
