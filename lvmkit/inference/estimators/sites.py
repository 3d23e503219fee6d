"""What the estimators (and :mod:`lvmkit.inference.check`) ask of a trace's sites: which
discrete family a site's distribution is, under its wrappers, and how many batch dimensions
the plates use."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.poutine.util import site_is_subsample

__all__ = ["BERNOULLI", "CATEGORICAL", "ONEHOT", "PARTICLE_PLATE", "discrete_kind", "innermost",
           "plate_nesting", "sample_sites"]

#: the plate of Pyro's vectorized particles (``ELBO._vectorized_num_particles``)
PARTICLE_PLATE = "num_particles_vectorized"

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
    """The distribution under any ``.to_event`` / ``.expand`` / ``.mask`` wrappers.

    Example:

    >>> import pyro.distributions as dist
    >>> import torch
    >>> from lvmkit.inference.estimators.sites import innermost
    >>> fn = dist.Bernoulli(logits=torch.zeros(3)).expand([2, 3]).to_event(1)
    >>> type(innermost(fn)).__name__
    'Bernoulli'
    """
    while isinstance(fn, _WRAPPERS):
        fn = fn.base_dist
    return fn


def discrete_kind(fn: dist.Distribution) -> str | None:
    """``"bernoulli"``, ``"onehot"``, ``"categorical"``, or ``None`` (not discrete).

    Example:

    >>> import pyro.distributions as dist
    >>> import torch
    >>> from lvmkit.inference.estimators.sites import discrete_kind
    >>> discrete_kind(dist.OneHotCategorical(logits=torch.zeros(2, 4)).to_event(1))
    'onehot'
    >>> discrete_kind(dist.Normal(0.0, 1.0)) is None
    True
    """
    base = innermost(fn)
    if isinstance(base, torch.distributions.Bernoulli):
        return BERNOULLI
    if isinstance(base, torch.distributions.OneHotCategorical):
        return ONEHOT
    if isinstance(base, torch.distributions.Categorical):
        return CATEGORICAL
    return None


def plate_nesting(*traces) -> int:
    """How many batch dimensions the plates of ``traces`` use (Pyro's max_plate_nesting).

    Example:

    >>> import pyro
    >>> import pyro.distributions as dist
    >>> from lvmkit.inference.estimators.sites import plate_nesting
    >>> def model():
    ...     with pyro.plate("groups", 2, dim=-2), pyro.plate("data", 3):
    ...         pyro.sample("z", dist.Normal(0.0, 1.0))
    >>> plate_nesting(pyro.poutine.trace(model).get_trace())
    2
    """
    dims = [
        frame.dim
        for trace in traces
        for site in trace.nodes.values() if site["type"] == "sample"
        for frame in site["cond_indep_stack"] if frame.vectorized
    ]
    return -min(dims) if dims else 0


def sample_sites(trace) -> list[tuple[str, dict]]:
    """``(name, site)`` of a trace's sample sites, subsample sites left out."""
    return [(name, site) for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site_is_subsample(site)]
