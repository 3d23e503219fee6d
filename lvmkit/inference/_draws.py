"""The draw engine under the diagnostics: guide draws replayed through the model and scored.

:func:`draw` draws ``S`` guide samples for one ``(model, guide, *args)`` call, either all at
once under an outer ``pyro.plate`` (:data:`DRAWS_PLATE`, left of every plate of the model)
or, for models that do not vectorize, one at a time, and keeps what
:mod:`~lvmkit.inference.arviz_export`, :mod:`~lvmkit.inference.psis` and
:mod:`~lvmkit.inference.nuts` need: the latent values, per-site log-likelihoods and
log p(x, z) and log q(z) per draw. :func:`vectorized_trace_pair` is the vectorized pass
that :mod:`~lvmkit.inference.evaluate` runs too.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace

from lvmkit._validation import (
    PROGRAM_ERRORS,
    check_count,
    check_full_plates,
    check_observed_values,
    check_precision,
    check_tensor_arguments,
    describe,
    program_error,
)
from lvmkit.inference.estimators.sites import sample_sites as site_pairs

DATA_PLATE = "data"
#: The plate over draws (and over evaluate's particles), left of the model's plates.
DRAWS_PLATE = "_lvmkit_draws"
# Elements per vectorized pass (about 80 MB of float32 per tensor): bounds the memory of
# replaying many draws of a big model at once.
_ELEMENTS_PER_PASS = 20_000_000


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
    frames = plate_frames(site)
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


def sample_sites(trace: Trace) -> dict[str, dict]:
    """A trace's sample sites by name, subsample sites left out."""
    return dict(site_pairs(trace))


def trace_pair(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> tuple[Trace, Trace]:
    """``(model_trace, guide_trace)``: the guide traced, the model replayed on its values."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    return model_trace, guide_trace


def vectorized_trace_pair(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, num_draws: int, dim: int
) -> tuple[Trace, Trace]:
    """:func:`trace_pair` of ``num_draws`` draws at once, under ``pyro.plate(DRAWS_PLATE,
    num_draws, dim=dim)``; ``dim`` must be left of every plate of model and guide."""
    with pyro.plate(DRAWS_PLATE, num_draws, dim=dim):
        return trace_pair(model, guide, args, kwargs)


def plate_frames(site: dict) -> tuple:
    return tuple(f for f in site["cond_indep_stack"] if f.vectorized and f.name != DRAWS_PLATE)


def _max_plate_nesting(*traces: Trace) -> int:
    dims = [
        -frame.dim
        for trace in traces
        for site in sample_sites(trace).values()
        for frame in plate_frames(site)
        if frame.dim is not None
    ]
    return max(dims, default=0)


@dataclass
class Roles:
    """Which model sites are posterior variables, likelihood terms, or ignored."""

    latent: list[str]  # model latents that the guide samples
    deterministic: list[str]  # pyro.deterministic sites of the model
    observed: list[str]  # observations (scored in the log-likelihood group)
    factors: list[str]  # pyro.factor sites of the model (in log p, not in the likelihood)
    # model latents the guide lacks, all marked for enumeration (others are refused): drawn
    # from their prior, they cancel out of the weights
    model_only: list[str]
    plate_names: list[str] = field(default_factory=list)  # the model's plates (not the draws')


def _roles(model_trace: Trace, guide_trace: Trace) -> Roles:
    guide_sites = sample_sites(guide_trace)
    roles = Roles([], [], [], [], [])
    for name, site in sample_sites(model_trace).items():
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
        if not sample_sites(model_trace)[name]["infer"].get("enumerate")
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
            " their prior, left out of the posterior, and cancel out of the importance weights"
            " (in expectation). The per-datum likelihood needs them summed out, which a draw"
            " of them does not do, so the log_likelihood group is left out",
            stacklevel=3,
        )
    model_sites = sample_sites(model_trace).values()
    roles.plate_names = sorted({f.name for site in model_sites for f in plate_frames(site)})
    if not roles.latent:
        raise ValueError(
            "the guide samples none of the model's latent sites (model latents: "
            f"{roles.model_only}, guide sites: {sorted(guide_sites)})"
        )
    return roles


@dataclass
class SiteDraws:
    """Values of one site stacked over draws as ``(S, *batch, *event)``.

    ``batch`` is left-padded to ``num_plate_dims`` so that batch position ``j`` is plate dim
    ``j - num_plate_dims``.
    """

    values: torch.Tensor
    frames: tuple
    event_dim: int


@dataclass
class Draws:
    num_plate_dims: int
    roles: Roles
    probe_model: Trace
    latents: dict[str, SiteDraws] = field(default_factory=dict)
    log_lik: dict[str, SiteDraws] = field(default_factory=dict)
    log_p: torch.Tensor | None = None
    log_q: torch.Tensor | None = None
    vectorized: bool = True


def _per_draw_sum(log_prob: torch.Tensor, num_draws: int, num_plate_dims: int) -> torch.Tensor:
    if log_prob.dim() != num_plate_dims + 1 or log_prob.shape[0] != num_draws:
        raise _NotVectorizable(f"log-prob of shape {tuple(log_prob.shape)}")
    return log_prob.reshape(num_draws, -1).sum(-1)


def _log_p_and_q(
    model_trace: Trace, guide_trace: Trace, roles: Roles, reduce: Callable
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
    log_q = sum(reduce(site["log_prob"]) for site in sample_sites(guide_trace).values())
    return log_p, log_q


def pad_batch(value: torch.Tensor, event_dim: int, num_plate_dims: int) -> torch.Tensor:
    batch_dims = value.dim() - event_dim
    if batch_dims > num_plate_dims:
        raise _NotVectorizable(f"value of shape {tuple(value.shape)} has extra batch dims")
    return value.reshape((1,) * (num_plate_dims - batch_dims) + tuple(value.shape))


def _vectorized_value(value: torch.Tensor, event_dim: int, num_draws: int, plates: int):
    if value.dim() != plates + 1 + event_dim or value.shape[0] != num_draws:
        raise _NotVectorizable(f"value of shape {tuple(value.shape)}")
    return value


def masked_log_prob(site: dict) -> torch.Tensor:
    """Per-element log-density of a sample site, unscaled, zero where ``poutine.mask`` (a
    bool or a tensor; a ``.mask()`` is applied by ``log_prob`` itself) masks it out:
    masked entries are not data (missing values filled with a placeholder), as in the
    weights' ``lp``."""
    log_p = site["fn"].log_prob(site["value"])
    mask = site["mask"]
    if mask is False:
        return torch.zeros_like(log_p)
    if torch.is_tensor(mask):
        return torch.where(mask, log_p, torch.zeros_like(log_p))
    return log_p


def _draw_vectorized(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_draws: int,
    draws: Draws,
    collect: bool,
) -> tuple[dict, dict, torch.Tensor, torch.Tensor, tuple[Trace, Trace]]:
    plates = draws.num_plate_dims
    model_trace, guide_trace = vectorized_trace_pair(
        model, guide, args, kwargs, num_draws, dim=-plates - 1
    )
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
            latents[name] = SiteDraws(value, plate_frames(site), event_dim)
        for name in draws.roles.observed:
            site = model_trace.nodes[name]
            value = _vectorized_value(masked_log_prob(site), 0, num_draws, plates)
            log_lik[name] = SiteDraws(value, plate_frames(site), 0)
    return latents, log_lik, log_p, log_q, (model_trace, guide_trace)


def _check_first_draw(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    traces: tuple[Trace, Trace],
    probe: tuple[Trace, Trace],
    roles: Roles,
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
        name for name, site in sample_sites(guide_probe).items() if not site["is_observed"]
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
    draws: Draws,
    collect: bool,
) -> tuple[dict, dict, torch.Tensor, torch.Tensor]:
    plates = draws.num_plate_dims
    values: dict[str, list] = {}
    liks: dict[str, list] = {}
    frames: dict[str, tuple] = {}
    events: dict[str, int] = {}
    log_ps, log_qs = [], []
    for _ in range(num_draws):
        model_trace, guide_trace = trace_pair(model, guide, args, kwargs)
        log_p, log_q = _log_p_and_q(model_trace, guide_trace, draws.roles, lambda t: t.sum())
        log_ps.append(log_p)
        log_qs.append(log_q)
        if not collect:
            continue
        for name in draws.roles.latent + draws.roles.deterministic:
            site = model_trace.nodes[name]
            events[name] = _event_dim(site, plates, vectorized=False)
            frames[name] = plate_frames(site)
            try:
                padded = pad_batch(site["value"], events[name], plates)
            except _NotVectorizable as error:
                raise ValueError(
                    f"site {name!r}: {error} for {plates} plate dims and {events[name]} event"
                    " dims; for a pyro.deterministic site pass the right event_dim="
                ) from None
            values.setdefault(name, []).append(padded)
        for name in draws.roles.observed:
            site = model_trace.nodes[name]
            frames[name] = plate_frames(site)
            liks.setdefault(name, []).append(pad_batch(masked_log_prob(site), 0, plates))
    latents = {
        name: SiteDraws(torch.stack(v), frames[name], events[name]) for name, v in values.items()
    }
    log_lik = {name: SiteDraws(torch.stack(v), frames[name], 0) for name, v in liks.items()}
    return latents, log_lik, torch.stack(log_ps), torch.stack(log_qs)


def _draws_per_pass(probe: Trace) -> int:
    elements = sum(
        site["value"].numel() + site["fn"].batch_shape.numel()
        for site in sample_sites(probe).values()
    )
    return max(1, _ELEMENTS_PER_PASS // max(1, elements))


def draw(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_samples: int,
    *,
    vectorize: bool | None = None,
    collect: bool = True,
) -> Draws:
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
            probe = trace_pair(model, guide, args, kwargs)
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
        check_full_plates(probe, "drawing from the guide and scoring under the model")
        roles = _roles(*probe)
        draws = Draws(_max_plate_nesting(*probe), roles, probe[0])
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
    draws: Draws,
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

    def cat(index: int) -> dict[str, SiteDraws]:
        first = chunks[0][index]
        return {
            name: SiteDraws(
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
