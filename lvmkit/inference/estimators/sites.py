"""What the estimators (and :mod:`lvmkit.inference.check`) ask of a trace's sites: which
discrete family a site's distribution is, under its wrappers, and how many batch dimensions
the plates use."""

from __future__ import annotations

import pyro.distributions as dist
import torch

__all__ = ["BERNOULLI", "CATEGORICAL", "ONEHOT", "discrete_kind", "innermost", "plate_nesting"]

BERNOULLI = "bernoulli"
ONEHOT = "onehot"
CATEGORICAL = "categorical"

_WRAPPERS = (
    dist.Independent,
    torch.distributions.Independent,
    dist.ExpandedDistribution,
    dist.MaskedDistribution,
)


def innermost(fn: dist.Distribution) -> dist.Distribution:
    """The distribution under any ``.to_event`` / ``.expand`` / ``.mask`` wrappers."""
    while isinstance(fn, _WRAPPERS):
        fn = fn.base_dist
    return fn


def discrete_kind(fn: dist.Distribution) -> str | None:
    """``"bernoulli"``, ``"onehot"``, ``"categorical"``, or ``None`` (not discrete)."""
    base = innermost(fn)
    if isinstance(base, torch.distributions.Bernoulli):
        return BERNOULLI
    if isinstance(base, torch.distributions.OneHotCategorical):
        return ONEHOT
    if isinstance(base, torch.distributions.Categorical):
        return CATEGORICAL
    return None


def plate_nesting(*traces) -> int:
    """How many batch dimensions the plates of ``traces`` use (Pyro's max_plate_nesting)."""
    dims = [
        frame.dim
        for trace in traces
        for site in trace.nodes.values() if site["type"] == "sample"
        for frame in site["cond_indep_stack"] if frame.vectorized
    ]
    return -min(dims) if dims else 0
