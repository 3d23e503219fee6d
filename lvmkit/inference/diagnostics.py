"""Posterior diagnostics for a ``(model, guide)`` pair: ArviZ export, PSIS k-hat, NUTS check.

Every function takes the same ``(model, guide, data)`` triple that training uses. Draws of
the guide are replayed through the model, either all at once under an outer
``pyro.plate("_num_samples", ...)`` or, for models that do not vectorize, one at a time.

ArviZ is imported lazily, through :mod:`lvmkit.inference.arviz_compat`, the one module that
knows which ArviZ line is installed: the export is an ``arviz.InferenceData`` on ArviZ 0.x
(the line that installs on Python 3.11) and an ``xarray.DataTree`` on ArviZ 1.x.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample

from lvmkit._validation import (
    PROGRAM_ERRORS,
    check_count,
    check_observed_values,
    check_precision,
    check_tensor_arguments,
    describe,
    program_error,
)
from lvmkit.inference import arviz_compat

if TYPE_CHECKING:  # pragma: no cover
    import pandas

# What to_arviz returns: arviz.InferenceData (ArviZ 0.x) or xarray.DataTree (ArviZ 1.x).
ArvizData = Any

DATA_PLATE = "data"
_SAMPLE_PLATE = "_num_samples"
# Elements per vectorized pass (about 80 MB of float32 per tensor): bounds the memory of
# replaying many draws of a big model at once.
_ELEMENTS_PER_PASS = 20_000_000
KHAT_THRESHOLDS = (0.5, 0.7)
# PSIS fits its Pareto tail to the largest S/5 ratios (3 sqrt(S) beyond S = 225) and needs 5.
_MIN_PSIS_DRAWS = 25


# --------------------------------------------------------------------------- traces


class _NotVectorizable(RuntimeError):
    """The model or guide gave shapes that do not carry the draws as a batch dimension."""


def _is_deterministic(site: dict) -> bool:
    return bool(site["infer"].get("_deterministic", False))


def _event_dim(site: dict, num_plate_dims: int, vectorized: bool) -> int:
    """Event dims of the value of a latent or ``pyro.deterministic`` site.

    A latent's come from its distribution. ``pyro.deterministic(name, value, event_dim=None)``
    records ``Delta(value, event_dim=value.ndim)``: by default the whole value is one event,
    the dims of the enclosing plates included. Pyro's plates own fixed batch positions (plate
    dim -1 is the rightmost batch dim, left of the event dims), so where the default leaves
    the plates no room, the dims right of them are the event: under the draws' plate (left of
    every model plate) that is all but the leading ``1 + num_plate_dims`` dims; in a single
    trace, all but the dims the site's plates reach, if their sizes fit those plates, else
    the whole value as Pyro records it. An ``event_dim`` the user gave is kept.
    """
    recorded = site["fn"].event_dim
    value = site["value"]
    if not _is_deterministic(site) or recorded != value.dim():
        return recorded
    if vectorized:
        event_dim = value.dim() - 1 - num_plate_dims
        if event_dim < 0:
            raise _NotVectorizable(
                f"deterministic site {site['name']!r} of shape {tuple(value.shape)} does not"
                " carry the draws' dim"
            )
        return event_dim
    frames = _plate_frames(site)
    if not frames:
        return recorded
    depth = max(-frame.dim for frame in frames)
    event_dim = max(value.dim() - depth, 0)
    batch = value.shape[: value.dim() - event_dim]
    sizes = {frame.dim: frame.size for frame in frames}
    fits = all(
        size == 1 or size == sizes.get(dim)
        for dim, size in zip(range(-len(batch), 0), batch, strict=True)
    )
    return event_dim if fits else recorded


def _is_factor(site: dict) -> bool:
    return isinstance(site["fn"], dist.Unit)


def _sample_sites(trace: Trace) -> dict[str, dict]:
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    }


def _trace_pair(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> tuple[Trace, Trace]:
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return model_trace, guide_trace


def _plate_frames(site: dict) -> tuple:
    return tuple(f for f in site["cond_indep_stack"] if f.vectorized and f.name != _SAMPLE_PLATE)


def _max_plate_nesting(*traces: Trace) -> int:
    dims = [
        -frame.dim
        for trace in traces
        for site in _sample_sites(trace).values()
        for frame in _plate_frames(site)
        if frame.dim is not None
    ]
    return max(dims, default=0)


@dataclass
class _Roles:
    """Which model sites are posterior variables, likelihood terms, or ignored."""

    latent: list[str]  # model latents that the guide samples
    deterministic: list[str]  # pyro.deterministic sites of the model
    observed: list[str]  # observations (scored in the log-likelihood group)
    factors: list[str]  # pyro.factor sites of the model (in log p, not in the likelihood)
    model_only: list[str]  # model latents drawn from their prior: cancel out of the weights
    plate_names: list[str] = field(default_factory=list)  # the model's plates (not the draws')


def _roles(model_trace: Trace, guide_trace: Trace) -> _Roles:
    guide_sites = _sample_sites(guide_trace)
    roles = _Roles([], [], [], [], [])
    for name, site in _sample_sites(model_trace).items():
        if _is_deterministic(site):
            roles.deterministic.append(name)
        elif site["is_observed"]:
            (roles.factors if _is_factor(site) else roles.observed).append(name)
        elif name in guide_sites and not guide_sites[name]["is_observed"]:
            roles.latent.append(name)
        else:
            roles.model_only.append(name)
    not_enumerated = [
        name for name in roles.model_only
        if not _sample_sites(model_trace)[name]["infer"].get("enumerate")
    ]
    if not_enumerated:
        raise ValueError(
            f"the guide does not sample the model's latent site(s) {not_enumerated} (Pyro's"
            " 'Found vars in model but not guide'): sample them in the guide, or observe them"
            " in the model. (Sites the model marks infer={'enumerate': ...}, which a guide"
            " trained with TraceEnum_ELBO leaves out, are drawn from their prior.)"
        )
    if roles.model_only:
        warnings.warn(
            f"model sites {roles.model_only} are not sampled by the guide; they are drawn from"
            " their prior, left out of the posterior, and cancel out of the importance weights",
            stacklevel=3,
        )
    model_sites = _sample_sites(model_trace).values()
    roles.plate_names = sorted({f.name for site in model_sites for f in _plate_frames(site)})
    if not roles.latent:
        raise ValueError(
            "the guide samples none of the model's latent sites (model latents: "
            f"{roles.model_only}, guide sites: {sorted(guide_sites)})"
        )
    return roles


@dataclass
class _SiteDraws:
    """Values of one site stacked over draws as ``(S, *batch, *event)``.

    ``batch`` is left-padded to ``num_plate_dims`` so that batch position ``j`` is plate dim
    ``j - num_plate_dims``.
    """

    values: torch.Tensor
    frames: tuple
    event_dim: int


@dataclass
class _Draws:
    num_plate_dims: int
    roles: _Roles
    probe_model: Trace
    latents: dict[str, _SiteDraws] = field(default_factory=dict)
    log_lik: dict[str, _SiteDraws] = field(default_factory=dict)
    log_p: torch.Tensor | None = None
    log_q: torch.Tensor | None = None
    vectorized: bool = True


def _per_draw_sum(log_prob: torch.Tensor, num_draws: int, num_plate_dims: int) -> torch.Tensor:
    if log_prob.dim() != num_plate_dims + 1 or log_prob.shape[0] != num_draws:
        raise _NotVectorizable(f"log-prob of shape {tuple(log_prob.shape)}")
    return log_prob.reshape(num_draws, -1).sum(-1)


def _log_p_and_q(
    model_trace: Trace, guide_trace: Trace, roles: _Roles, reduce: Callable
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x, z) over the model's scored sites and log q over every guide site.

    The guide's observed and factor sites count in log q: a hierarchical guide adds
    -log r(a | x, z) there, which makes ``log p - log q`` the auxiliary importance weight
    p(x, z) r(a | x, z) / q(a, z | x) (Agakov & Barber 2004; Ranganath et al. 2016).
    """
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    scored = roles.latent + roles.observed + roles.factors
    log_p = sum(reduce(model_trace.nodes[name]["log_prob"]) for name in scored)
    log_q = sum(reduce(site["log_prob"]) for site in _sample_sites(guide_trace).values())
    return log_p, log_q


def _pad_batch(value: torch.Tensor, event_dim: int, num_plate_dims: int) -> torch.Tensor:
    batch_dims = value.dim() - event_dim
    if batch_dims > num_plate_dims:
        raise _NotVectorizable(f"value of shape {tuple(value.shape)} has extra batch dims")
    return value.reshape((1,) * (num_plate_dims - batch_dims) + tuple(value.shape))


def _vectorized_value(value: torch.Tensor, event_dim: int, num_draws: int, plates: int):
    if value.dim() != plates + 1 + event_dim or value.shape[0] != num_draws:
        raise _NotVectorizable(f"value of shape {tuple(value.shape)}")
    return value


def _log_lik(site: dict) -> torch.Tensor:
    return site["fn"].log_prob(site["value"])


def _draw_vectorized(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_draws: int,
    draws: _Draws,
    collect: bool,
) -> tuple[dict, dict, torch.Tensor, torch.Tensor, tuple[Trace, Trace]]:
    plates = draws.num_plate_dims

    def vectorize(fn: Callable) -> Callable:
        def wrapped(*a, **k):
            with pyro.plate(_SAMPLE_PLATE, num_draws, dim=-plates - 1):
                return fn(*a, **k)

        return wrapped

    model_trace, guide_trace = _trace_pair(vectorize(model), vectorize(guide), args, kwargs)
    log_p, log_q = _log_p_and_q(
        model_trace,
        guide_trace,
        draws.roles,
        lambda t: _per_draw_sum(t, num_draws, plates),
    )
    latents, log_lik = {}, {}
    if collect:
        for name in draws.roles.latent + draws.roles.deterministic:
            site = model_trace.nodes[name]
            event_dim = _event_dim(site, plates, vectorized=True)
            value = _vectorized_value(site["value"], event_dim, num_draws, plates)
            latents[name] = _SiteDraws(value, _plate_frames(site), event_dim)
        for name in draws.roles.observed:
            site = model_trace.nodes[name]
            value = _vectorized_value(_log_lik(site), 0, num_draws, plates)
            log_lik[name] = _SiteDraws(value, _plate_frames(site), 0)
    return latents, log_lik, log_p, log_q, (model_trace, guide_trace)


def _check_first_draw(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    traces: tuple[Trace, Trace],
    probe: tuple[Trace, Trace],
    roles: _Roles,
    log_p: torch.Tensor,
    log_q: torch.Tensor,
) -> None:
    """Re-score draw 0 without the sample plate: a model that reduces over the draws'
    dimension (``.sum()``, reshapes) runs vectorized but scores them wrongly."""

    def first(values_trace: Trace, shapes_trace: Trace, names) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            shape = shapes_trace.nodes[name]["value"].shape
            value = values_trace.nodes[name]["value"]
            if value.numel() != value.shape[0] * math.prod(shape):
                raise _NotVectorizable(f"site {name!r}")
            out[name] = value[0].reshape(shape)
        return out

    model_trace, guide_trace = traces
    model_probe, guide_probe = probe
    guide_latents = [
        name for name, site in _sample_sites(guide_probe).items() if not site["is_observed"]
    ]
    guide_values = first(guide_trace, guide_probe, guide_latents)
    model_values = first(model_trace, model_probe, roles.latent + roles.model_only)
    guide_check = poutine.trace(poutine.condition(guide, data=guide_values)).get_trace(
        *args, **kwargs
    )
    model_check = poutine.trace(poutine.condition(model, data=model_values)).get_trace(
        *args, **kwargs
    )
    check_p, check_q = _log_p_and_q(model_check, guide_check, roles, lambda t: t.sum())
    for what, vectorized, single in (("log p", log_p[0], check_p), ("log q", log_q[0], check_q)):
        if not torch.allclose(vectorized, single, rtol=1e-3, atol=1e-3):
            raise _NotVectorizable(
                f"re-scoring draw 0 alone gives {what} = {float(single):.6g}, not"
                f" {float(vectorized):.6g}: the model or guide mixes draws (a reduction over"
                " all dims) or draws randomness outside sample sites"
            )


def _draw_loop(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_draws: int,
    draws: _Draws,
    collect: bool,
) -> tuple[dict, dict, torch.Tensor, torch.Tensor]:
    plates = draws.num_plate_dims
    values: dict[str, list] = {}
    liks: dict[str, list] = {}
    frames: dict[str, tuple] = {}
    events: dict[str, int] = {}
    log_ps, log_qs = [], []
    for _ in range(num_draws):
        model_trace, guide_trace = _trace_pair(model, guide, args, kwargs)
        log_p, log_q = _log_p_and_q(model_trace, guide_trace, draws.roles, lambda t: t.sum())
        log_ps.append(log_p)
        log_qs.append(log_q)
        if not collect:
            continue
        for name in draws.roles.latent + draws.roles.deterministic:
            site = model_trace.nodes[name]
            events[name] = _event_dim(site, plates, vectorized=False)
            frames[name] = _plate_frames(site)
            try:
                padded = _pad_batch(site["value"], events[name], plates)
            except _NotVectorizable as error:
                raise ValueError(
                    f"site {name!r}: {error} for {plates} plate dims and {events[name]} event"
                    " dims; for a pyro.deterministic site pass the right event_dim="
                ) from None
            values.setdefault(name, []).append(padded)
        for name in draws.roles.observed:
            site = model_trace.nodes[name]
            frames[name] = _plate_frames(site)
            liks.setdefault(name, []).append(_pad_batch(_log_lik(site), 0, plates))
    latents = {
        name: _SiteDraws(torch.stack(v), frames[name], events[name]) for name, v in values.items()
    }
    log_lik = {name: _SiteDraws(torch.stack(v), frames[name], 0) for name, v in liks.items()}
    return latents, log_lik, torch.stack(log_ps), torch.stack(log_qs)


def _draws_per_pass(probe: Trace) -> int:
    elements = sum(
        site["value"].numel() + site["fn"].batch_shape.numel()
        for site in _sample_sites(probe).values()
    )
    return max(1, _ELEMENTS_PER_PASS // max(1, elements))


def _draw(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_samples: int,
    *,
    vectorize: bool | None = None,
    collect: bool = True,
) -> _Draws:
    """Draw ``num_samples`` guide samples and score them under the model.

    ``vectorize=None`` tries vectorized passes (the first checked against a plain re-scoring
    of its first draw) and falls back to a loop over draws; ``True`` vectorizes without the
    check and raises if that fails; ``False`` loops.
    """
    num_samples = check_count("num_samples", num_samples)
    if vectorize not in (None, True, False) or not isinstance(vectorize, bool | None):
        raise ValueError(f"vectorize must be None, True or False, got {vectorize!r}")
    for name, fn in (("model", model), ("guide", guide)):
        if not callable(fn):
            raise TypeError(f"{name} must be a callable Pyro program, got {type(fn).__name__}")
    named = {f"args[{i}]": value for i, value in enumerate(args)} | dict(kwargs)
    check_tensor_arguments(named)
    for name, value in named.items():
        check_precision(value, name)
    described = ", ".join(f"{name}: {describe(value)}" for name, value in named.items())
    with torch.no_grad():
        try:
            probe = _trace_pair(model, guide, args, kwargs)
            # scored here, so that data the model cannot score fails with its arguments named
            # rather than in a vectorized pass (which falls back to a loop) or in the loop
            for trace in probe:
                trace.compute_log_prob()
        except PROGRAM_ERRORS as err:
            wrapped = program_error(
                err, f"running the guide and the model on ({described or 'no arguments'}) failed"
            )
            if wrapped is None:
                raise
            raise wrapped from err
        check_observed_values(probe[0], DATA_PLATE, f"the arguments are ({described})")
        roles = _roles(*probe)
        draws = _Draws(_max_plate_nesting(*probe), roles, probe[0])
        if vectorize is not False:
            try:
                _draw_all_vectorized(
                    model,
                    guide,
                    args,
                    kwargs,
                    num_samples,
                    draws,
                    collect,
                    probe,
                    check=vectorize is None,
                )
                return draws
            except (_NotVectorizable, RuntimeError, ValueError, IndexError, TypeError) as error:
                reason = error
            if vectorize:
                raise ValueError(
                    f"model/guide pair does not vectorize over draws: {reason}"
                ) from reason
            warnings.warn(
                f"model/guide pair does not vectorize over draws ({reason}); drawing one at a time",
                stacklevel=3,
            )
        latents, log_lik, log_p, log_q = _draw_loop(
            model, guide, args, kwargs, num_samples, draws, collect
        )
        draws.latents, draws.log_lik, draws.log_p, draws.log_q = latents, log_lik, log_p, log_q
        draws.vectorized = False
        return draws


def _draw_all_vectorized(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_samples: int,
    draws: _Draws,
    collect: bool,
    probe: tuple[Trace, Trace],
    check: bool,
) -> None:
    per_pass = _draws_per_pass(probe[0])
    chunks = []
    remaining = num_samples
    while remaining > 0:
        size = min(per_pass, remaining)
        result = _draw_vectorized(model, guide, args, kwargs, size, draws, collect)
        if not chunks and check:
            _check_first_draw(
                model, guide, args, kwargs, result[4], probe, draws.roles, result[2], result[3]
            )
        chunks.append(result[:4])
        remaining -= size

    def cat(index: int) -> dict[str, _SiteDraws]:
        first = chunks[0][index]
        return {
            name: _SiteDraws(
                torch.cat([chunk[index][name].values for chunk in chunks]),
                first[name].frames,
                first[name].event_dim,
            )
            for name in first
        }

    draws.latents, draws.log_lik = cat(0), cat(1)
    draws.log_p = torch.cat([chunk[2] for chunk in chunks])
    draws.log_q = torch.cat([chunk[3] for chunk in chunks])
    draws.vectorized = True


# --------------------------------------------------------------------------- naming


def _layout(
    name: str, draws: _SiteDraws, num_plate_dims: int, data_dim: str = DATA_PLATE
) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
    """Drop broadcast batch dims and name the rest: the "data" plate is ``data_dim``, another
    plate keeps its name, event dims are ``{name}_dim_k``."""
    values = draws.values
    by_dim = {frame.dim: frame for frame in draws.frames}
    keep, dims, coords = [0], [], {}
    for j in range(num_plate_dims):
        axis = 1 + j
        frame = by_dim.get(j - num_plate_dims)
        if frame is not None and values.shape[axis] not in (1, frame.size):
            raise ValueError(
                f"site {name!r} has size {values.shape[axis]} at batch dim"
                f" {j - num_plate_dims}, where its plate {frame.name!r} has size"
                f" {frame.size} (values of shape {tuple(values.shape[1:])} with"
                f" {draws.event_dim} event dims); for a pyro.deterministic site pass event_dim="
            )
        if frame is not None and values.shape[axis] == frame.size:
            dim = data_dim if frame.name == DATA_PLATE else frame.name
        elif values.shape[axis] == 1:
            continue  # broadcast: e.g. a deterministic of global sites inside a plate
        else:
            dim = f"{name}_batch_dim_{j}"
        keep.append(axis)
        dims.append(dim)
        coords[dim] = np.arange(values.shape[axis])
    for k in range(draws.event_dim):
        axis = 1 + num_plate_dims + k
        keep.append(axis)
        dims.append(f"{name}_dim_{k}")
    shape = [values.shape[axis] for axis in keep]
    return values.reshape(shape).detach().cpu().numpy(), dims, coords


def _observed_layout(
    site: dict, num_plate_dims: int, data_dim: str
) -> tuple[np.ndarray, list[str], dict]:
    fn = site["fn"]
    value = site["value"].expand(tuple(fn.batch_shape) + tuple(fn.event_shape))
    padded = _pad_batch(value, fn.event_dim, num_plate_dims).unsqueeze(0)
    array, dims, coords = _layout(
        site["name"],
        _SiteDraws(padded, _plate_frames(site), fn.event_dim),
        num_plate_dims,
        data_dim,
    )
    return array[0], dims, coords


def _model_kwargs(labels: torch.Tensor | None, kwargs: dict) -> dict:
    return dict(kwargs) if labels is None else {**kwargs, "labels": labels}


def _check_data_dim(data_dim: str, probe_model: Trace, roles: _Roles) -> None:
    """The "data" plate's dim may not take the name of a site or of another plate: xarray
    would make a variable of that name a coordinate (empty groups) or merge two dims."""
    if data_dim == DATA_PLATE:
        return  # the plate's own name: Pyro keeps it for the plate's site, no site can take it
    if data_dim in _sample_sites(probe_model):
        raise ValueError(
            f"data_dim={data_dim!r} is also the name of the model's site {data_dim!r}: ArviZ"
            " would take that site for the dim's coordinate; choose another data_dim"
        )
    if data_dim in roles.plate_names:
        raise ValueError(
            f"data_dim={data_dim!r} is also the name of the model's plate {data_dim!r}: the two"
            " plates would share one dim; choose another data_dim"
        )


def _draws_to_tree(draws: _Draws, data_dim: str = DATA_PLATE) -> ArvizData:
    _check_data_dim(data_dim, draws.probe_model, draws.roles)
    plates = draws.num_plate_dims
    groups: dict[str, dict[str, np.ndarray]] = {"posterior": {}, "log_likelihood": {}}
    dims: dict[str, list[str]] = {}
    coords: dict[str, np.ndarray] = {}
    for name, site_draws in draws.latents.items():
        array, dims[name], site_coords = _layout(name, site_draws, plates, data_dim)
        groups["posterior"][name] = array[None]
        coords.update(site_coords)
    for name, site_draws in draws.log_lik.items():
        array, _, site_coords = _layout(name, site_draws, plates, data_dim)
        groups["log_likelihood"][name] = array[None]
        coords.update(site_coords)
    groups["observed_data"] = {}
    for name in draws.roles.observed:
        array, dims[name], site_coords = _observed_layout(
            draws.probe_model.nodes[name], plates, data_dim
        )
        groups["observed_data"][name] = array
        coords.update(site_coords)
    log_p, log_q = draws.log_p.detach().cpu().numpy(), draws.log_q.detach().cpu().numpy()
    groups["sample_stats"] = {
        "log_weight": (log_p - log_q)[None],
        "lp": log_p[None],
        "log_q": log_q[None],
    }
    attrs = {"inference_library": "pyro", "vectorized_draws": int(draws.vectorized)}
    # log_likelihood variables take the leading (batch) dims of their observed_data twin.
    return arviz_compat.from_groups(groups, dims=dims, coords=coords, attrs=attrs)


# --------------------------------------------------------------------------- public API


def to_arviz(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 500,
    labels: torch.Tensor | None = None,
    vectorize: bool | None = None,
    data_dim: str = DATA_PLATE,
    **kwargs: Any,
) -> ArvizData:
    """Export guide draws, scored by the model, through the installed ArviZ's ``from_dict``:
    an ``arviz.InferenceData`` on ArviZ 0.x (Python 3.11), an ``xarray.DataTree`` on 1.x.
    Either way ``az.summary``, ``az.loo`` and the plots of that ArviZ read it.

    Groups (``chain`` has length 1, ``draw`` has ``num_samples``):

    - ``posterior``: guide draws of the *model's* latent sites (and its ``pyro.deterministic``
      sites, whose event dims are inferred from the plates when the model does not give
      ``event_dim``). Guide-only sites (auxiliary variables, guide factors) are left out.
      Sites in a plate get a dim named after the plate (coords ``0..size-1``; the
      ``"data"`` plate's dim is ``data_dim``), event dims are ``{site}_dim_k``.
    - ``log_likelihood``: per-datum log p(x_i | z) of each observed site, dims
      ``(chain, draw, data_dim)``.
    - ``observed_data``: the observations.
    - ``sample_stats``: ``log_weight`` = log p(x, z) - log q(z | x) per draw (summed over
      the data; with an auxiliary guide it includes the guide's -log r term, so it is the
      auxiliary importance weight), ``lp`` = log p(x, z), ``log_q``.

    :param args: positional arguments of the model and the guide (usually ``x``, and ``y``
        for a regression), as for :func:`psis_khat` and :func:`compare_with_nuts`.
    :param num_samples: number of guide draws (keyword only).
    :param labels: passed as ``labels=`` when given (semi-supervised models).
    :param data_dim: name of the ``"data"`` plate's dim. The default, the plate's own name,
        cannot collide with a site (Pyro records the plate as a site of that name); another
        name that is a sample site or a plate of the model is refused.
    :param vectorize: ``None`` draws under a ``pyro.plate`` over draws, checks draw 0 by
        re-scoring it alone, and falls back to a loop over draws (with a warning) if the
        pair does not broadcast or the check fails; ``True`` skips the check (for guides
        with randomness outside sample sites, e.g. IWHVI's extra auxiliary draws, which
        the check cannot reproduce) and raises if the pair does not run vectorized;
        ``False`` loops.
    :param kwargs: further keyword arguments for the model and the guide.
    """
    if not isinstance(data_dim, str) or not data_dim:
        raise ValueError(f"data_dim must be a non-empty string, got {data_dim!r}")
    kwargs = _model_kwargs(labels, kwargs)
    draws = _draw(model, guide, args, kwargs, num_samples, vectorize=vectorize)
    return _draws_to_tree(draws, data_dim)


@dataclass(frozen=True)
class KhatResult:
    """Pareto k-hat of the importance ratios p(x, z) / q(z) (Yao et al. 2018).

    ``log_weights`` are the Pareto-smoothed, self-normalized log weights; ``log_ratios``
    the raw log p(x, z) - log q(z) per draw.

    ``constant_weights`` is ``True`` when the log ratios are constant up to rounding (q is
    the posterior up to normalization, e.g. an exact guide): there is no tail to fit, so
    ``khat`` is reported as 0 rather than fitted, the weights are uniform, and ``str()``
    says so.
    """

    khat: float
    log_weights: np.ndarray
    log_ratios: np.ndarray
    thresholds: tuple[float, float] = KHAT_THRESHOLDS
    constant_weights: bool = False

    @property
    def verdict(self) -> str:
        """``"good"`` (k < 0.5), ``"ok"`` (0.5 <= k < 0.7, usable with PSIS), ``"poor"``."""
        good, poor = self.thresholds
        if self.khat < good:
            return "good"
        return "ok" if self.khat < poor else "poor"

    @property
    def num_samples(self) -> int:
        return int(self.log_ratios.shape[0])

    @property
    def ess(self) -> float:
        """Effective sample size of the smoothed weights, 1 / sum w_s^2."""
        return float(1.0 / np.exp(np.logaddexp.reduce(2.0 * self.log_weights)))

    @property
    def log_evidence(self) -> float:
        """Importance-sampling estimate log (1/S) sum_s p(x, z_s) / q(z_s) of log p(x)."""
        return float(np.logaddexp.reduce(self.log_ratios) - math.log(self.num_samples))

    def __str__(self) -> str:
        good, poor = self.thresholds
        note = (
            "; the importance ratios are constant (q matches the posterior up to"
            " normalization), so k-hat is 0 by convention, not fitted"
            if self.constant_weights
            else ""
        )
        return (
            f"PSIS k-hat = {self.khat:.3f} ({self.verdict}; good < {good}, poor > {poor}) "
            f"from {self.num_samples} draws, ESS {self.ess:.1f}{note}"
        )


def _khat_from(log_p: torch.Tensor, log_q: torch.Tensor) -> KhatResult:
    log_ratios = (log_p - log_q).detach().double().cpu().numpy()
    bad = ~np.isfinite(log_ratios)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} of {log_ratios.size} draws have a non-finite log p(x,z) - log"
            f" q(z) (first: draw {int(np.argmax(bad))}, value {log_ratios[bad][0]})"
        )
    if log_ratios.size < _MIN_PSIS_DRAWS:
        raise ValueError(
            f"PSIS needs at least {_MIN_PSIS_DRAWS} draws (a tail of 5 or more),"
            f" got num_samples={log_ratios.size}"
        )
    spread = float(np.ptp(log_ratios))
    if spread <= _rounding_tolerance(log_p, log_q):
        # q is the posterior up to normalization: the ratios are bounded (constant), there
        # is no tail to fit (a Pareto fit gives -inf or fails), and the weights are uniform.
        warnings.warn(
            f"the {log_ratios.size} log importance ratios are constant up to rounding (spread"
            f" {spread:.3g}): q matches the posterior up to normalization; reporting k-hat = 0"
            " (not fitted) and uniform weights",
            stacklevel=3,
        )
        uniform = np.full(log_ratios.size, -math.log(log_ratios.size))
        return KhatResult(
            khat=0.0, log_weights=uniform, log_ratios=log_ratios, constant_weights=True
        )
    log_weights, khat = arviz_compat.psislw(log_ratios)
    return KhatResult(khat=khat, log_weights=log_weights, log_ratios=log_ratios)


def _rounding_tolerance(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """Spread of log ratios that rounding alone explains (float32 sums of many terms)."""
    magnitude = max(float(log_p.abs().max()), float(log_q.abs().max()))
    eps = torch.finfo(log_p.dtype).eps if log_p.is_floating_point() else 1e-7
    return 100.0 * eps * (1.0 + magnitude)


def psis_khat(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    vectorize: bool | None = None,
    **kwargs: Any,
) -> KhatResult:
    """Pareto-smoothed importance sampling diagnostic of a variational approximation.

    With draws z_s ~ q(z | x), the log importance ratios are
    log r_s = log p(x, z_s) - log q(z_s | x), computed from joint traces. A generalized Pareto
    distribution is fitted to the largest ratios (Vehtari et al. 2024, "Pareto smoothed
    importance sampling"); its shape k-hat measures how heavy the tail of p/q is. Yao et al.
    (2018, "Yes, but did it work?: Evaluating variational inference", ICML): k-hat < 0.5
    means q is close to the posterior, 0.5-0.7 usable after PSIS correction, > 0.7 poor.
    A q narrower than the posterior gives heavy-tailed ratios and a large k-hat. Where the
    ratios are constant up to rounding (q is the exact posterior), there is no tail to fit:
    the result has ``khat = 0``, ``constant_weights = True`` and uniform weights, and a
    warning says so.

    :param args: positional arguments of the model and the guide (usually ``x``).
    :param kwargs: keyword arguments of the model and the guide (e.g. ``labels``).
    """
    draws = _draw(model, guide, args, kwargs, num_samples, vectorize=vectorize, collect=False)
    return _khat_from(draws.log_p, draws.log_q)


@dataclass
class NutsComparison:
    """Guide posterior against NUTS on the same model.

    ``table`` has MultiIndex columns ``("guide" | "nuts", stat)`` and one row per scalar
    latent component, plus ``("diff", "z")`` = (mean_guide - mean_nuts) / sd_nuts.
    """

    table: pandas.DataFrame
    guide_summary: pandas.DataFrame
    nuts_summary: pandas.DataFrame
    khat: KhatResult
    guide_posterior: ArvizData
    nuts_posterior: ArvizData
    divergences: int
    plot_path: str | None = None

    def __str__(self) -> str:
        columns = [(who, stat) for who in ("guide", "nuts") for stat in ("mean", "sd")]
        shown = self.table[columns + [("diff", "z")]]
        return f"{shown.to_string()}\n{self.khat}\nNUTS divergences: {self.divergences}" + (
            f"\nplot: {self.plot_path}" if self.plot_path else ""
        )


def _run_nuts(
    model: Callable,
    args: tuple,
    kwargs: dict,
    num_samples: int,
    warmup: int,
    num_chains: int,
    seed: int,
) -> tuple[dict[str, torch.Tensor], int]:
    """Chains run one after the other in this process (seeds ``seed + c``): Pyro's
    multi-chain MCMC forks processes, which buys nothing on a small model."""
    from pyro.infer import MCMC, NUTS

    chains: dict[str, list[torch.Tensor]] = {}
    divergences = 0
    for chain in range(num_chains):
        pyro.set_rng_seed(seed + chain)
        mcmc = MCMC(NUTS(model), num_samples=num_samples, warmup_steps=warmup, disable_progbar=True)
        mcmc.run(*args, **kwargs)
        for name, values in mcmc.get_samples().items():
            chains.setdefault(name, []).append(values)
        divergences += sum(len(v) for v in mcmc.diagnostics().get("divergences", {}).values())
    return {name: torch.stack(values) for name, values in chains.items()}, divergences


def _nuts_tree(samples: dict[str, torch.Tensor], draws: _Draws) -> ArvizData:
    """NUTS draws, laid out and named exactly like the guide's posterior group."""
    plates = draws.num_plate_dims
    posterior, dims, coords = {}, {}, {}
    for name in draws.roles.latent:
        chains = samples[name]
        num_chains, num_draws = chains.shape[:2]
        site = draws.probe_model.nodes[name]
        event_dim = site["fn"].event_dim
        flat = chains.reshape((num_chains * num_draws,) + tuple(chains.shape[2:]))
        padded = torch.stack([_pad_batch(v, event_dim, plates) for v in flat])
        array, dims[name], site_coords = _layout(
            name, _SiteDraws(padded, _plate_frames(site), event_dim), plates
        )
        posterior[name] = array.reshape((num_chains, num_draws) + array.shape[1:])
        coords.update(site_coords)
    return arviz_compat.from_groups({"posterior": posterior}, dims=dims, coords=coords)


def _merge_summaries(guide: pandas.DataFrame, nuts: pandas.DataFrame) -> pandas.DataFrame:
    import pandas

    table = pandas.concat({"guide": guide, "nuts": nuts}, axis=1)
    table[("diff", "z")] = (table[("guide", "mean")] - table[("nuts", "mean")]) / table[
        ("nuts", "sd")
    ]
    return table


def _plot_forest_matplotlib(table: pandas.DataFrame, path: str) -> None:
    from matplotlib.figure import Figure

    rows = list(table.index)
    figure = Figure(figsize=(6.0, 1.5 + 0.5 * len(rows)), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    for offset, who, color in ((-0.15, "guide", "C0"), (0.15, "nuts", "C1")):
        means = table[(who, "mean")].to_numpy(dtype=float)
        sds = table[(who, "sd")].to_numpy(dtype=float)
        y = np.arange(len(rows)) + offset
        axes.errorbar(means, y, xerr=2 * sds, fmt="o", color=color, label=f"{who} (mean ± 2 sd)")
    axes.set_yticks(np.arange(len(rows)), [str(r) for r in rows])
    axes.invert_yaxis()
    figure.legend(loc="outside lower center", ncols=2)
    axes.set_title("guide vs NUTS")
    figure.savefig(path)


def compare_with_nuts(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 500,
    warmup: int = 300,
    num_chains: int = 1,
    seed: int = 0,
    plot_path: str | None = None,
    plot_backend: str = "arviz",
    **kwargs: Any,
) -> NutsComparison:
    """Check a guide against Pyro's NUTS on a small model with global latents.

    Runs NUTS (Hoffman & Gelman 2014) with ``warmup`` adaptation steps and ``num_samples``
    draws per chain, draws ``num_samples`` from the guide, and returns both ArviZ summaries
    (mean, sd, interval, ESS, R-hat, MCSE) side by side, the PSIS k-hat of the guide draws
    (Yao et al. 2018), and optionally a forest plot of both posteriors at ``plot_path``.
    The global RNG state is restored afterwards.

    :param plot_backend: ``"arviz"`` (the installed ArviZ's ``plot_forest``; falls back to
        matplotlib with a warning if it fails) or ``"matplotlib"``.
    """
    if plot_backend not in ("arviz", "matplotlib"):
        raise ValueError(f"plot_backend must be 'arviz' or 'matplotlib', got {plot_backend!r}")
    if num_chains < 1 or num_samples < _MIN_PSIS_DRAWS or warmup < 0:
        raise ValueError(
            f"need num_chains >= 1, num_samples >= {_MIN_PSIS_DRAWS}, warmup >= 0; got"
            f" {num_chains},"
            f" {num_samples}, {warmup}"
        )
    state = pyro.util.get_rng_state()
    try:
        pyro.set_rng_seed(seed)
        draws = _draw(model, guide, args, kwargs, num_samples)
        guide_tree = _draws_to_tree(draws)
        samples, divergences = _run_nuts(model, args, kwargs, num_samples, warmup, num_chains, seed)
    finally:
        pyro.util.set_rng_state(state)
    nuts_tree = _nuts_tree(samples, draws)
    names = list(draws.roles.latent)
    guide_summary = arviz_compat.summary(guide_tree, names)
    nuts_summary = arviz_compat.summary(nuts_tree, names)
    table = _merge_summaries(guide_summary, nuts_summary)
    if plot_path is not None:
        plot_path = str(plot_path)
        if plot_backend == "arviz":
            try:
                arviz_compat.plot_forest(
                    {"guide": guide_tree, "nuts": nuts_tree}, names, plot_path
                )
            except Exception as error:  # noqa: BLE001 - any plotting failure has a fallback
                warnings.warn(
                    f"ArviZ forest plot failed ({error}); using matplotlib", stacklevel=2
                )
                _plot_forest_matplotlib(table, plot_path)
        else:
            _plot_forest_matplotlib(table, plot_path)
    return NutsComparison(
        table=table,
        guide_summary=guide_summary,
        nuts_summary=nuts_summary,
        khat=_khat_from(draws.log_p, draws.log_q),
        guide_posterior=guide_tree,
        nuts_posterior=nuts_tree,
        divergences=divergences,
        plot_path=plot_path,
    )
