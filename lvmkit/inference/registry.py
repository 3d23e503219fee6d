"""Gradient estimators by name: what ``lvmkit train --elbo`` and ``compare_estimators`` select.

Each entry names the class by module path and is imported only when built, so that a
missing or broken estimator module costs only its own entry (``make_estimator`` then raises
the ``ImportError``), and ``import lvmkit.inference.registry`` imports no estimator.

Example::

    >>> from lvmkit.inference.registry import ESTIMATOR_NAMES, make_estimator
    >>> "rebar" in ESTIMATOR_NAMES
    True
    >>> type(make_estimator("trace", num_particles=2)).__name__
    'Trace_ELBO'
"""

from __future__ import annotations

import importlib
import numbers
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ESTIMATOR_NAMES", "EstimatorSpec", "ESTIMATORS", "estimator_spec", "make_estimator"]


@dataclass(frozen=True)
class EstimatorSpec:
    """How to build one estimator.

    :ivar module: the module that defines the class.
    :ivar cls: the class name in that module.
    :ivar summary: one line for help texts.
    :ivar defaults: keyword arguments passed unless the caller overrides them.
    :ivar min_particles: the fewest particles the estimator works with (VIMCO's leave-one-out
        baseline needs two); a smaller request is raised to it.
    :ivar comparable: keyword arguments that put its gradient on the scale of the others'
        when gradient variances are compared (``make_estimator(..., comparable=True)``).

    Example:

    >>> from lvmkit.inference.registry import ESTIMATORS, EstimatorSpec
    >>> ESTIMATORS["vimco"].cls, ESTIMATORS["vimco"].min_particles
    ('VIMCOELBO', 2)
    >>> spec = EstimatorSpec("pyro.infer", "RenyiELBO", "Renyi divergence", {"alpha": 0.5})
    >>> spec.defaults
    {'alpha': 0.5}
    """

    module: str
    cls: str
    summary: str
    defaults: dict[str, Any] = field(default_factory=dict)
    min_particles: int = 1
    comparable: dict[str, Any] = field(default_factory=dict)


#: name -> :class:`EstimatorSpec`; add a line here to make an estimator selectable by name.
ESTIMATORS: dict[str, EstimatorSpec] = {
    "trace": EstimatorSpec(
        "pyro.infer", "Trace_ELBO", "Pyro's ELBO: reparameterized or plain score function"
    ),
    "tracegraph": EstimatorSpec(
        "pyro.infer", "TraceGraph_ELBO", "Pyro's score function with Rao-Blackwellization"
    ),
    "rebar": EstimatorSpec(
        "lvmkit.inference.estimators.rebar", "RebarELBO", "REBAR (Tucker et al. 2017)"
    ),
    "relax": EstimatorSpec(
        "lvmkit.inference.estimators.relax", "RelaxELBO", "RELAX (Grathwohl et al. 2018)"
    ),
    "nvil": EstimatorSpec(
        "lvmkit.inference.estimators.nvil",
        "NVILELBO",
        "NVIL (Mnih & Gregor 2014)",
        # the paper's variance normalisation rescales the score term, and so the variance
        comparable={"normalize": False},
    ),
    "nvil-norm": EstimatorSpec(
        "lvmkit.inference.estimators.nvil",
        "NVILELBO",
        "NVIL with the paper's variance normalisation (biased; Mnih & Gregor 2014)",
        defaults={"normalize": True},
    ),
    "vimco": EstimatorSpec(
        "lvmkit.inference.estimators.vimco",
        "VIMCOELBO",
        "VIMCO (Mnih & Rezende 2016), at least 2 particles",
        min_particles=2,
    ),
    "arm": EstimatorSpec("lvmkit.inference.estimators.arm", "ARMELBO", "ARM (Yin & Zhou 2019)"),
    "disarm": EstimatorSpec(
        "lvmkit.inference.estimators.arm", "DisARMELBO", "DisARM (Dong et al. 2020)"
    ),
    "rloo": EstimatorSpec(
        "lvmkit.inference.estimators.rloo",
        "RLOOELBO",
        "REINFORCE leave-one-out (Kool et al. 2019), at least 2 particles",
        min_particles=2,
    ),
    "double-cv": EstimatorSpec(
        "lvmkit.inference.estimators.double_cv",
        "DoubleCVELBO",
        "RLOO with the Taylor double control variate (Titsias & Shi 2022), at least 2 particles",
        min_particles=2,
    ),
    "rodeo": EstimatorSpec(
        "lvmkit.inference.estimators.rodeo",
        "RodeoELBO",
        "RLOO with discrete Stein control variates (Shi et al. 2022), at least 2 particles",
        min_particles=2,
    ),
    "disarm-categorical": EstimatorSpec(
        "lvmkit.inference.estimators.disarm_categorical",
        "CategoricalDisARMELBO",
        "DisARM with stick-breaking for one-hot sites (Dong et al. 2021)",
    ),
    "concrete": EstimatorSpec(
        "lvmkit.inference.estimators.concrete",
        "ConcreteELBO",
        "Concrete / Gumbel-softmax relaxation (biased; Maddison et al. 2017)",
    ),
}

#: The names :func:`make_estimator` accepts, in the order help texts list them.
ESTIMATOR_NAMES: tuple[str, ...] = tuple(ESTIMATORS)


def estimator_spec(name: str) -> EstimatorSpec:
    """The :class:`EstimatorSpec` of ``name``; a ``ValueError`` listing the names if unknown.

    Example:

    >>> from lvmkit.inference.registry import estimator_spec
    >>> estimator_spec("nvil-norm").defaults
    {'normalize': True}
    >>> estimator_spec("reinforce")
    Traceback (most recent call last):
    ...
    ValueError: unknown estimator 'reinforce'; choose one of trace, tracegraph, rebar, ...
    """
    try:
        return ESTIMATORS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATOR_NAMES)}"
        ) from None


def make_estimator(
    name: str, num_particles: int = 1, *, comparable: bool = False, **kwargs: Any
):
    """Build the estimator called ``name`` (an ELBO object for :func:`~lvmkit.inference.fit`).

    :param name: one of :data:`ESTIMATOR_NAMES`.
    :param num_particles: particles per step, a positive int; raised to the estimator's
        ``min_particles`` where it needs more (VIMCO: 2).
    :param comparable: apply the entry's ``comparable`` arguments, for gradient-variance
        comparisons (NVIL without its variance normalisation).
    :param kwargs: constructor arguments, overriding the entry's ``defaults`` (and
        ``comparable`` ones).
    :raises ValueError: for an unknown name or a ``num_particles`` that is not a positive int.
    :raises ImportError: if the estimator's module cannot be imported.

    Example:

    >>> from lvmkit.inference import ESTIMATOR_NAMES, make_estimator
    >>> "rebar" in ESTIMATOR_NAMES
    True
    >>> elbo = make_estimator("vimco")  # raised to VIMCO's two particles
    >>> type(elbo).__name__, elbo.num_particles
    ('VIMCOELBO', 2)
    >>> make_estimator("nvil-norm", comparable=False).normalize
    True
    """
    spec = estimator_spec(name)
    if (
        isinstance(num_particles, bool)
        or not isinstance(num_particles, numbers.Integral)
        or num_particles < 1
    ):
        raise ValueError(f"num_particles must be a positive int, got {num_particles!r}")
    cls = getattr(importlib.import_module(spec.module), spec.cls)
    options = {**spec.defaults, **(spec.comparable if comparable else {}), **kwargs}
    return cls(num_particles=max(int(num_particles), spec.min_particles), **options)
