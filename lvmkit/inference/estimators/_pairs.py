"""Decisions an estimator takes once per model and guide, from their first call, and the
check behind estimators that draw their particles vectorized by default: that the model
and guide broadcast over the particle dimension."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import pyro.poutine as poutine
import torch
from pyro.infer.enum import get_importance_trace
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from lvmkit._rng import RandomState
from lvmkit.inference.estimators import EstimatorError
from lvmkit.inference.estimators.sites import PARTICLE_PLATE, sample_sites


class PairDecisions:
    """The path decided for each model/guide pair, held weakly: forgotten when either
    callable is freed, so a new callable is decided afresh. A bound method is keyed by its
    owner and function (``obj.model`` is a new object on every access)."""

    def __init__(self) -> None:
        self._by_guide: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @staticmethod
    def _split(fn: Callable) -> tuple:
        owner, func = getattr(fn, "__self__", None), getattr(fn, "__func__", None)
        return (owner, func) if owner is not None and func is not None else (fn, None)

    def get(self, model: Callable, guide: Callable):
        (m, m_func), (g, g_func) = self._split(model), self._split(guide)
        try:
            return self._by_guide.get(g, {}).get(m, {}).get((g_func, m_func))
        except TypeError:  # not weakly referenceable: never stored
            return None

    def set(self, model: Callable, guide: Callable, value) -> None:
        (m, m_func), (g, g_func) = self._split(model), self._split(guide)
        try:
            by_model = self._by_guide.setdefault(g, weakref.WeakKeyDictionary())
            by_model.setdefault(m, {})[(g_func, m_func)] = value
        except TypeError:  # not weakly referenceable: decided on every call instead
            pass

    def values(self) -> list:
        return [v for by_model in self._by_guide.values() for d in by_model.values()
                for v in d.values()]

    def __len__(self) -> int:
        return len(self.values())

    def __deepcopy__(self, memo) -> PairDecisions:
        copied = PairDecisions()
        for g, by_model in self._by_guide.items():
            for m, d in by_model.items():
                copied._by_guide.setdefault(g, weakref.WeakKeyDictionary())[m] = dict(d)
        return copied

    def __getstate__(self) -> dict:
        return {}  # decisions are not pickled: the pairs are decided afresh

    def __setstate__(self, state: dict) -> None:
        self._by_guide = weakref.WeakKeyDictionary()


class SubsampleRecorder(Messenger):
    """Keeps the subsample indices a guide drew (the importance traces drop those sites),
    so that particle 0 can be run alone on the same mini-batch."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, torch.Tensor] = {}

    def _pyro_post_sample(self, msg) -> None:
        if site_is_subsample(msg):
            self.values[msg["name"]] = msg["value"]


def particle_difference(model: Callable, guide: Callable, args: tuple, kwargs: dict,
                        model_trace, guide_trace, max_plate_nesting: float,
                        subsamples: dict | None = None) -> str | None:
    """Where the vectorized-particle traces differ from running particle 0 alone (``None``
    where they agree): the guide is run on particle 0's values and the model replayed on
    it without the particle plate, and every site's log-probability must equal particle
    0's slice of the vectorized one. A model that reduces over all dimensions
    (``z.sum()``), reshapes, or asserts its shapes fails here. The random state is left as
    it was (the check draws only the model's own latents, if any)."""
    frame = next((f for _, site in sample_sites(guide_trace)
                  for f in site["cond_indep_stack"] if f.name == PARTICLE_PLATE), None)
    if frame is None:
        return None  # no sample site in the particle plate: nothing to compare
    dim, size = frame.dim, frame.size
    values = poutine.Trace()  # particle 0's guide values, to replay the guide on
    for name, value in (subsamples or {}).items():
        values.add_node(name, type="sample", is_observed=False, infer={}, value=value)
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        value = site["value"]
        if not site_is_subsample(site):
            value = _particle_zero(value, dim - site["fn"].event_dim, size, site)
        values.add_node(name, type="sample", is_observed=False, infer=dict(site["infer"]),
                        value=value.detach() if torch.is_tensor(value) else value)
    nesting = max_plate_nesting if math.isfinite(max_plate_nesting) else -dim - 1
    with RandomState(), torch.no_grad():
        try:
            single_model, single_guide = get_importance_trace(
                "flat", nesting, model, poutine.replay(guide, trace=values), args, kwargs)
        except Exception as error:  # noqa: BLE001 - reported, with the way out
            first_line = (str(error).splitlines() or [""])[0]
            return f"particle 0 alone fails ({type(error).__name__}: {first_line})"
    for role, single, vectorized in (("model", single_model, model_trace),
                                     ("guide", single_guide, guide_trace)):
        for name, site in sample_sites(single):
            if role == "model" and not site["is_observed"] and name not in values.nodes:
                continue  # a latent of the model alone: drawn afresh, not comparable
            other = vectorized.nodes.get(name)
            if other is None:
                return f"site {name!r} is missing from the vectorized {role}"
            expected = site["log_prob"]
            got = other["log_prob"]
            if got.dim() < -dim or got.shape[dim] != size:
                return (f"site {name!r} of the {role} has log-probability shape"
                        f" {tuple(got.shape)} without the particle dimension {dim}")
            got = got.select(dim, 0)
            if got.numel() != expected.numel() or not torch.allclose(
                    got.detach().reshape(expected.shape), expected.detach(), rtol=1e-4,
                    atol=1e-5):
                return (f"site {name!r} of the {role} has another log-probability for"
                        " particle 0 than when that particle runs alone")
    return None


def checked_particle_traces(elbo, get_traces: Callable, model, guide, args, kwargs,
                            advice: str):
    """The traces of ``get_traces(model, guide, args, kwargs)`` (an ELBO's vectorized
    ``_get_traces``), checked by :func:`particle_difference` on the first call of each
    model and guide (the pairs checked are kept in ``elbo._broadcast_checked``, a
    :class:`PairDecisions`); an :class:`EstimatorError` naming the site where they do
    not broadcast over the particle dimension."""
    decisions = elbo._broadcast_checked
    if decisions.get(model, guide) is not None:
        yield from get_traces(model, guide, args, kwargs)
        return
    recorder = SubsampleRecorder()
    for model_trace, guide_trace in get_traces(model, recorder(guide), args, kwargs):
        _check_particles(elbo, decisions, model, guide, args, kwargs, model_trace,
                         guide_trace, recorder.values, advice)
        yield model_trace, guide_trace


def _check_particles(elbo, decisions: PairDecisions, model, guide, args, kwargs,
                     model_trace, guide_trace, subsamples: dict, advice: str) -> None:
    estimator = getattr(elbo, "estimator_name", type(elbo).__name__)
    difference = particle_difference(model, guide, args, kwargs, model_trace, guide_trace,
                                     elbo.max_plate_nesting, subsamples)
    if difference is not None:
        raise EstimatorError(
            f"{estimator} draws its particles vectorized, in a plate left of the model's"
            f" plates, and this model and guide do not broadcast over it: {difference}."
            f" Reduce over event dims only (e.g. .sum(-1), not .sum()), or {advice}"
        )
    decisions.set(model, guide, True)


def _particle_zero(value, axis: int, size: int, site: dict):
    """Particle 0 of a vectorized value, with the leading singleton dims that the particle
    plate's position left in front of the site's own plates removed."""
    if not torch.is_tensor(value) or value.dim() < -axis or value.shape[axis] != size:
        return value
    value = value.select(axis, 0)
    plate_dims = [-f.dim for f in site["cond_indep_stack"]
                  if f.vectorized and f.name != PARTICLE_PLATE]
    keep = site["fn"].event_dim + max(plate_dims, default=0)
    while value.dim() > keep and value.shape[0] == 1:
        value = value[0]
    return value

