"""Importance-weighted evaluation of a trained (model, guide) pair.

For a datum x and K draws z_k ~ q(z | x) from the guide, the log weights are

    log w_k = log p(x, z_k) - log q(z_k | x)

and the importance-weighted bound (Burda, Grosse & Salakhutdinov 2016, "Importance Weighted
Autoencoders", ICLR) is

    L_K(x) = log (1/K) sum_k w_k  <=  log p(x),

which increases with K and converges to log p(x); L_1 is the ELBO. ``log p(x, z)`` sums the
log-probabilities of every model sample site (latent and observed, ``pyro.factor`` sites
included); ``log q`` sums every guide sample site, observed and ``pyro.factor`` sites
included. An auxiliary guide (Agakov & Barber 2004; Maaloe et al. 2016) therefore gets the
valid bound with w = p(x, z) r(a | x, z) / q(a, z | x) by adding ``-log r(a | x, z)`` as a
``pyro.factor`` in the guide. Site scales (``poutine.scale``, subsampling plates) are ignored:
these are per-datum log densities. Masks are honoured.

Samples are drawn in chunks of ``chunk_size`` vectorized along a ``pyro.plate`` left of all
the model's plates, and combined by a running log-sum-exp, so memory stays bounded for
K = 5000.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from pyro.poutine.util import prune_subsample_sites

from lvmkit._validation import (
    PROGRAM_ERRORS,
    check_count,
    check_data,
    check_full_plates,
    check_observed_values,
    check_precision,
    check_tensor_arguments,
    program_error,
)
from lvmkit.data import Dataset, check_dataset
from lvmkit.inference._draws import masked_log_prob, trace_pair, vectorized_trace_pair


def log_likelihood(
    model: Callable,
    guide: Callable,
    data: torch.Tensor | Dataset,
    num_samples: int = 5000,
    chunk_size: int = 100,
    batch_size: int = 100,
    labels: torch.Tensor | bool | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Per-datum importance-weighted estimate L_K(x) of log p(x), K = ``num_samples``.

    :param data: a tensor (N, ...) or a :class:`~lvmkit.data.Dataset` (a dynamically
        binarized one is binarized once here, from torch's global RNG); a real or integer
        dtype, finite values, N >= 1.
    :param num_samples: importance samples K per datum, a positive int.
    :param chunk_size: samples drawn together; memory grows with chunk_size * batch_size.
    :param batch_size: data points evaluated together.
    :param labels: ``None``, ``True`` (a Dataset's ``y``) or a tensor of N labels, passed to
        model and guide as the keyword ``labels``.
    :returns: a float tensor of shape (N,), on the CPU.
    :raises TypeError: naming the argument, for a model or guide that is not callable, data
        that is not a tensor or Dataset, or data of dtype bool, complex, float16 or bfloat16
        (log-densities in half precision are off by nats or overflow).
    :raises ValueError: naming the argument, for counts that are not positive ints, empty
        data, non-finite data, data on the ``meta`` device, labels that do not match the data
        or observed values that broadcast against their distribution; naming the sites, for
        model latents the guide does not sample (they would be drawn from the prior with no
        log q term: no estimate of log p(x)).

    Example:

    >>> import torch
    >>> from lvmkit.inference import log_likelihood
    >>> from lvmkit.models import build
    >>> model, guide = build("vae", x_dim=4, z_dim=2, hidden=(8,))
    >>> x = torch.bernoulli(torch.full((5, 4), 0.5))
    >>> ll = log_likelihood(model, guide, x, num_samples=20)
    >>> ll.shape, bool((ll < 0).all())
    (torch.Size([5]), True)
    """
    num_samples, chunk_size, batch_size = _check_counts(num_samples, chunk_size, batch_size)
    _check_callables(model, guide)
    results = []
    for x, kwargs in _batches(data, labels, batch_size, progress, "log_likelihood"):
        total = torch.full((x.shape[0],), -math.inf, dtype=torch.float64)
        for log_w in _chunks(model, guide, x, kwargs, num_samples, chunk_size):
            total = torch.logaddexp(total, torch.logsumexp(log_w.double().cpu(), dim=0))
        results.append((total - math.log(num_samples)).float())
    return torch.cat(results)


def elbo_per_datum(
    model: Callable,
    guide: Callable,
    data: torch.Tensor | Dataset,
    num_samples: int = 1,
    chunk_size: int = 100,
    batch_size: int = 100,
    labels: torch.Tensor | bool | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Per-datum ELBO estimate: the mean of ``num_samples`` log weights, shape (N,).

    Arguments and errors as for :func:`log_likelihood`.

    Example: the ELBO is a lower bound of the importance-weighted estimate (in expectation;
    here, with many samples, also in this draw).

    >>> import torch
    >>> from lvmkit.inference import elbo_per_datum, log_likelihood
    >>> from lvmkit.models import build
    >>> model, guide = build("vae", x_dim=4, z_dim=2, hidden=(8,))
    >>> x = torch.bernoulli(torch.full((5, 4), 0.5))
    >>> elbo = elbo_per_datum(model, guide, x, num_samples=200)
    >>> elbo.shape
    torch.Size([5])
    >>> bool((elbo < log_likelihood(model, guide, x, num_samples=200)).all())
    True
    """
    num_samples, chunk_size, batch_size = _check_counts(num_samples, chunk_size, batch_size)
    _check_callables(model, guide)
    results = []
    for x, kwargs in _batches(data, labels, batch_size, progress, "elbo"):
        total = torch.zeros(x.shape[0], dtype=torch.float64)
        for log_w in _chunks(model, guide, x, kwargs, num_samples, chunk_size):
            total += log_w.double().cpu().sum(0)
        results.append((total / num_samples).float())
    return torch.cat(results)


def log_weights(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    num_samples: int,
    chunk_size: int = 100,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log importance weights log p(x, z_k) - log q(z_k | x) of one batch, shape (K, B).

    Keeps all K x B weights in memory (e.g. for Pareto-smoothed diagnostics); use
    :func:`log_likelihood` for large K. Arguments and errors as for :func:`log_likelihood`
    (``x`` must be a tensor).

    Example:

    >>> import torch
    >>> from lvmkit.inference import log_weights
    >>> from lvmkit.models import build
    >>> model, guide = build("sbn-linear", x_dim=4, layers=(3,))
    >>> x = torch.bernoulli(torch.full((5, 4), 0.5))
    >>> log_weights(model, guide, x, num_samples=7).shape
    torch.Size([7, 5])
    """
    num_samples, chunk_size, _ = _check_counts(num_samples, chunk_size, 1)
    _check_callables(model, guide)
    _check_data(x, "x")
    _check_labels(labels, x)
    kwargs = {} if labels is None else {"labels": labels}
    return torch.cat(list(_chunks(model, guide, x, kwargs, num_samples, chunk_size)))


def _check_counts(num_samples, chunk_size, batch_size) -> tuple[int, int, int]:
    """The three counts as Python ints; a ValueError naming the first that is not >= 1."""
    return (check_count("num_samples", num_samples), check_count("chunk_size", chunk_size),
            check_count("batch_size", batch_size))


def _check_callables(model, guide) -> None:
    for name, fn in (("model", model), ("guide", guide)):
        if not callable(fn):
            raise TypeError(f"{name} must be a callable Pyro program, got {type(fn).__name__}")


def _check_data(x: torch.Tensor, name: str) -> None:
    """Refuse data no likelihood can score, naming the argument ``name``
    (:func:`lvmkit._validation.check_data`); half precision is refused too."""
    check_data(x, name)
    check_precision(x, name)


def _check_labels(labels, x: torch.Tensor) -> None:
    if labels is not None and (not torch.is_tensor(labels) or labels.dim() == 0
                               or len(labels) != len(x)):
        raise ValueError(
            f"labels must be a tensor of {len(x)} labels (one per datum), got "
            f"{tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__}"
        )
    check_tensor_arguments({"labels": labels})


def _batches(data, labels, batch_size: int, progress: bool, desc: str
             ) -> Iterator[tuple[torch.Tensor, dict]]:
    if isinstance(data, Dataset):
        check_dataset(data)
        x_all = data.batch(torch.arange(len(data)))
        if labels is True:
            labels = data.y
    elif torch.is_tensor(data):
        x_all = data
    else:
        raise TypeError(f"data must be a torch.Tensor or a Dataset, got {type(data).__name__}")
    if labels is True:
        raise ValueError("labels=True needs a Dataset; pass the label tensor instead")
    _check_data(x_all, "data")
    _check_labels(labels, x_all)
    starts = range(0, x_all.shape[0], batch_size)
    if progress:  # a bar in terminals and notebooks, plain lines in logs
        from lvmkit._progress import track

        starts = track(starts, desc=desc)
    for start in starts:
        stop = start + batch_size
        kwargs = {} if labels is None else {"labels": labels[start:stop]}
        yield x_all[start:stop], kwargs


def _chunks(model, guide, x, kwargs, num_samples: int, chunk_size: int
            ) -> Iterator[torch.Tensor]:
    """Yield (chunk, B) log weights until ``num_samples`` rows have been drawn."""
    with torch.no_grad():
        particle_dim = -1 - _max_plate_nesting(model, guide, x, kwargs)
        done = 0
        while done < num_samples:
            size = min(chunk_size, num_samples - done)
            yield _log_weights_chunk(model, guide, x, kwargs, size, particle_dim)
            done += size


def _max_plate_nesting(model, guide, x, kwargs) -> int:
    """Depth of the plates of guide and model, from one unvectorized trace of each.

    The probe runs on a forked RNG so that, for a given seed, the estimates do not depend
    on it.
    """
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            guide_trace, model_trace = _traces(model, guide, x, kwargs)
        except PROGRAM_ERRORS as err:
            wrapped = program_error(
                err,
                f"running the guide and the model on data of shape {tuple(x.shape)} and dtype "
                f"{x.dtype} failed (data on {x.device})",
            )
            if wrapped is None:
                raise
            raise wrapped from err
    _check_guide_covers_model(model_trace, guide_trace)
    check_full_plates((model_trace, guide_trace), "the per-datum log-likelihood")
    _check_observed_values(model_trace, x)
    if not any(frame.name == "data" for site in model_trace.nodes.values()
               for frame in site.get("cond_indep_stack", ())):
        raise ValueError(
            "the model has no pyro.plate('data', ...): per-datum log-likelihoods need its "
            "per-datum sites inside a plate named 'data'"
        )
    dims = [-frame.dim for trace in (guide_trace, model_trace)
            for site in trace.nodes.values()
            for frame in site.get("cond_indep_stack", ()) if frame.vectorized]
    return max(dims, default=0)


def _check_guide_covers_model(model_trace, guide_trace) -> None:
    """Refuse latent model sites the guide does not sample.

    Replayed against the guide, the model draws such a site from its prior and scores it in
    log p(x, z), with no log q term to cancel it: the weights would then estimate
    E_prior[p(x, z)], not p(x), with no error.
    """
    guide_latents = {name for name, site in guide_trace.nodes.items()
                     if site["type"] == "sample" and not site["is_observed"]}
    missing = [name for name, site in model_trace.nodes.items()
               if site["type"] == "sample" and not site["is_observed"]
               and name not in guide_latents]
    if missing:
        raise ValueError(
            f"the guide does not sample the model's latent site(s) {missing}: the model would "
            "draw them from their prior and the estimate would not be of log p(x); sample them "
            "in the guide, or observe them in the model"
        )


def _check_observed_values(model_trace, x: torch.Tensor) -> None:
    check_observed_values(model_trace, "data", f"data has shape {tuple(x.shape)}")


def _traces(model, guide, x, kwargs):
    model_trace, guide_trace = trace_pair(model, guide, (x,), kwargs)
    return prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)


def _log_weights_chunk(model, guide, x, kwargs, size: int, particle_dim: int) -> torch.Tensor:
    # the vectorized pass of the diagnostics' draw engine
    try:
        traces = vectorized_trace_pair(model, guide, (x,), kwargs, size, particle_dim)
    except PROGRAM_ERRORS as err:
        wrapped = program_error(
            err,
            f"running the guide and the model on data of shape {tuple(x.shape)} under a plate"
            f" of {size} importance samples at dim {particle_dim} (left of the model's plates)"
            " failed; the program must broadcast over batch dims on the left",
        )
        if wrapped is None:
            raise
        raise wrapped from err
    model_trace, guide_trace = (prune_subsample_sites(trace) for trace in traces)
    batch = x.shape[0]
    log_w = torch.zeros(size, batch, device=x.device)
    for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            log_p = masked_log_prob(site)
            log_w = log_w + sign * _per_datum(log_p, site, name, particle_dim, size, batch)
    return log_w


def _per_datum(log_p: torch.Tensor, site: dict, name: str, particle_dim: int, size: int,
               batch: int) -> torch.Tensor:
    """Sum a site's log-probability over every dim but the particle and data dims."""
    data_frames = [f for f in site["cond_indep_stack"] if f.name == "data"]
    if not data_frames or data_frames[0].dim is None:
        raise ValueError(
            f"site {name!r} is outside the vectorized pyro.plate('data', ...): per-datum "
            "log-likelihoods need every sample site of model and guide inside it"
        )
    data_dim = data_frames[0].dim
    ndim = -particle_dim
    log_p = torch.as_tensor(log_p)
    if log_p.dim() > ndim:
        raise ValueError(
            f"site {name!r}: log_prob has shape {tuple(log_p.shape)}, more batch dims than "
            f"the model's plates ({ndim - 1}); declare extra dims with .to_event()"
        )
    log_p = log_p.reshape((1,) * (ndim - log_p.dim()) + tuple(log_p.shape))
    others = [d for d in range(-ndim, 0) if d not in (particle_dim, data_dim)]
    if others:
        log_p = log_p.sum(others, keepdim=True)
    log_p = log_p.reshape(log_p.shape[particle_dim], log_p.shape[data_dim])
    return log_p.expand(size, batch)
