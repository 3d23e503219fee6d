"""Export guide draws, scored by the model, to ArviZ: :func:`to_arviz`.

ArviZ is imported lazily, through :mod:`lvmkit.inference.arviz_compat`, the one module that
knows which ArviZ line is installed: the export is an ``arviz.InferenceData`` on ArviZ 0.x
(the line that installs on Python 3.11) and an ``xarray.DataTree`` on ArviZ 1.x.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from pyro.poutine.trace_struct import Trace

from lvmkit.inference import arviz_compat
from lvmkit.inference._draws import (
    DATA_PLATE,
    Draws,
    Roles,
    SiteDraws,
    draw,
    pad_batch,
    plate_frames,
    sample_sites,
)

__all__ = ["to_arviz"]

# What to_arviz returns: arviz.InferenceData (ArviZ 0.x) or xarray.DataTree (ArviZ 1.x).
ArvizData = Any


def site_layout(
    name: str, draws: SiteDraws, num_plate_dims: int, data_dim: str = DATA_PLATE
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
    padded = pad_batch(value, fn.event_dim, num_plate_dims).unsqueeze(0)
    array, dims, coords = site_layout(
        site["name"],
        SiteDraws(padded, plate_frames(site), fn.event_dim),
        num_plate_dims,
        data_dim,
    )
    return array[0], dims, coords


def model_kwargs(labels: torch.Tensor | None, kwargs: dict) -> dict:
    return dict(kwargs) if labels is None else {**kwargs, "labels": labels}


def _check_names(data_dim: str, probe_model: Trace, roles: Roles) -> None:
    """No site may take the name of a sample_stats variable the export writes, and the
    "data" plate's dim may not take the name of a site or of another plate: xarray would
    make a variable of that name a coordinate (empty groups) or merge two dims."""
    reserved = {"log_weight", "lp", "log_q"} & set(sample_sites(probe_model))
    if reserved:
        raise ValueError(
            f"the model's site(s) {sorted(reserved)} take the name of a sample_stats"
            " variable (log_weight, lp, log_q) that the export writes: rename the site(s)"
        )
    if data_dim == DATA_PLATE:
        return  # the plate's own name: Pyro keeps it for the plate's site, no site can take it
    if data_dim in sample_sites(probe_model):
        raise ValueError(
            f"data_dim={data_dim!r} is also the name of the model's site {data_dim!r}: ArviZ"
            " would take that site for the dim's coordinate; choose another data_dim"
        )
    if data_dim in roles.plate_names:
        raise ValueError(
            f"data_dim={data_dim!r} is also the name of the model's plate {data_dim!r}: the two"
            " plates would share one dim; choose another data_dim"
        )


def draws_to_tree(draws: Draws, data_dim: str = DATA_PLATE) -> ArvizData:
    _check_names(data_dim, draws.probe_model, draws.roles)
    plates = draws.num_plate_dims
    groups: dict[str, dict[str, np.ndarray]] = {"posterior": {}, "log_likelihood": {}}
    dims: dict[str, list[str]] = {}
    coords: dict[str, np.ndarray] = {}
    for name, site_draws in draws.latents.items():
        array, dims[name], site_coords = site_layout(name, site_draws, plates, data_dim)
        groups["posterior"][name] = array[None]
        coords.update(site_coords)
    # With model latents the guide leaves out (enumerated, drawn from their prior), a
    # draw's log p(x_i | z, c_i) is not the likelihood log p(x_i | z): the group is left
    # out (see _roles' warning) rather than filled with the wrong numbers.
    for name, site_draws in ({} if draws.roles.model_only else draws.log_lik).items():
        array, _, site_coords = site_layout(name, site_draws, plates, data_dim)
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
    :raises TypeError, ValueError: naming the argument or site, for tensor arguments that
        are on the ``meta`` device, empty, non-finite or in half precision, errors of the
        program on its arguments, observed values that broadcast against their distribution,
        and model latents the guide does not sample (unless the model marks them
        ``infer={"enumerate": ...}``: those are drawn from their prior, with a warning).

    Example:

    >>> import pyro
    >>> import pyro.distributions as dist
    >>> import torch
    >>> def model(y):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    ...     with pyro.plate("data", len(y)):
    ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
    >>> y = torch.tensor([0.5, 1.0, 1.5])
    >>> from pyro.infer.autoguide import AutoNormal
    >>> from lvmkit.inference import to_arviz
    >>> guide = AutoNormal(model)
    >>> data = to_arviz(model, guide, y, num_samples=100)
    >>> data.posterior["mu"].shape, data.log_likelihood["y"].shape
    ((1, 100), (1, 100, 3))
    >>> sorted(data.sample_stats.data_vars)
    ['log_q', 'log_weight', 'lp']
    """
    if not isinstance(data_dim, str) or not data_dim:
        raise ValueError(f"data_dim must be a non-empty string, got {data_dim!r}")
    kwargs = model_kwargs(labels, kwargs)
    draws = draw(model, guide, args, kwargs, num_samples, vectorize=vectorize)
    return draws_to_tree(draws, data_dim)
