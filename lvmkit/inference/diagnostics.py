"""Posterior diagnostics for a ``(model, guide)`` pair: ArviZ export, PSIS k-hat, NUTS check.

Every function takes the same ``(model, guide, *args)`` call that training uses. The code
lives in :mod:`lvmkit.inference.arviz_export` (:func:`to_arviz`),
:mod:`lvmkit.inference.psis` (:func:`psis_khat`, :class:`KhatResult`) and
:mod:`lvmkit.inference.nuts` (:func:`compare_with_nuts`, :class:`NutsComparison`), over
the draw engine of :mod:`lvmkit.inference._draws`; this module re-exports them so that
``from lvmkit.inference.diagnostics import ...`` keeps working.
"""

from lvmkit.inference.arviz_export import to_arviz
from lvmkit.inference.nuts import NutsComparison, compare_with_nuts
from lvmkit.inference.psis import KHAT_THRESHOLDS, KhatResult, psis_khat

__all__ = [
    "KHAT_THRESHOLDS",
    "KhatResult",
    "NutsComparison",
    "compare_with_nuts",
    "psis_khat",
    "to_arviz",
]
