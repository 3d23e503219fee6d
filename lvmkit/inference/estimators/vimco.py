"""VIMCO: multi-sample gradients with leave-one-out baselines (Mnih & Rezende, 2016)."""

from __future__ import annotations

import math

import torch
from pyro.distributions.util import is_identically_zero
from pyro.infer import Trace_ELBO
from pyro.infer.util import torch_item
from pyro.util import warn_if_nan

from lvmkit.inference.estimators import EstimatorError
from lvmkit.inference.estimators._pairs import PairDecisions, checked_particle_traces
from lvmkit.inference.estimators.nvil import (
    latent_guide_sites,
    refuse_enumerated,
)
from lvmkit.inference.estimators.sites import PARTICLE_PLATE, plate_nesting, sample_sites

__all__ = ["VIMCOELBO"]


def _vectorized_frames(site: dict) -> frozenset:
    return frozenset(f for f in site["cond_indep_stack"] if f.vectorized)


def _sum_to(tensor: torch.Tensor, keep_dims: set[int], ndim: int) -> torch.Tensor:
    """Sum ``tensor`` (batch-shaped, at most ``ndim`` dims) over every dim not in
    ``keep_dims`` (negative dims), returning an ``ndim``-dim tensor."""
    tensor = tensor.reshape((1,) * (ndim - tensor.dim()) + tuple(tensor.shape))
    drop = [d for d in range(-ndim, 0) if d not in keep_dims and tensor.shape[d] != 1]
    return tensor.sum(drop, keepdim=True) if drop else tensor


def _common_scale(sites: list[tuple[str, dict]]) -> float:
    """The subsampling scale shared by every site (VIMCO cannot mix scales)."""
    scales = {}
    for name, site in sites:
        scale = site["scale"]
        if torch.is_tensor(scale):
            if scale.numel() != 1:
                raise EstimatorError(
                    f"site {name!r}: VIMCOELBO needs a scalar scale, got shape {tuple(scale.shape)}"
                )
            scale = float(scale)
        scales[name] = float(scale)
    if len(set(scales.values())) > 1:
        raise EstimatorError(
            "VIMCOELBO needs every sample site to have the same scale (subsampling factor), "
            f"because the importance weights of a datum combine them; got {scales}"
        )
    scale = next(iter(scales.values()), 1.0)
    if scale <= 0:
        raise EstimatorError(f"VIMCOELBO needs a positive scale, got {scale}")
    return scale


def _site_mask(site: dict) -> torch.Tensor | None:
    mask = site["mask"]
    return mask if torch.is_tensor(mask) else None


class VIMCOELBO(Trace_ELBO):
    """Gradient of the K-sample importance-weighted bound with VIMCO's baselines.

    The objective is the IWAE bound (Burda et al., 2016) with ``K = num_particles``

    .. math::

        \\mathcal{L}_K = \\mathbb{E}\\Big[\\log \\frac{1}{K}\\sum_{k=1}^{K} w_k\\Big],
        \\qquad w_k = \\frac{p(x, z_k)}{q(z_k \\mid x)},

    and its gradient estimate (Mnih & Rezende, 2016, eq. 9-10) is

    .. math::

        \\sum_k \\big(\\hat L - \\hat L_{-k}\\big)\\nabla\\log q(z_k \\mid x)
        + \\sum_k \\tilde w_k \\nabla \\log w_k,

    with ``\\hat L = log mean_k w_k``, ``\\tilde w_k = w_k / sum_j w_j`` and the leave-one-out
    baseline ``\\hat L_{-k}`` that replaces ``log w_k`` by the mean of the other ``log w_j``
    (a geometric mean). Reparameterized sites enter ``log w_k`` pathwise.

    Independence: the bound is taken per element of the plates that *every* sample site
    (model and guide) shares, typically the ``"data"`` plate, i.e. the estimate is of
    ``scale * sum_i L_K(x_i)``; sites outside such a plate make it one joint bound. All
    sites must then have the same subsampling scale ``scale``. The particles are
    vectorized by default (Pyro's ``vectorize_particles``); with
    ``vectorize_particles=False`` they are K traces, for models whose plates or parameters
    assume no particle dimension (same estimator). Vectorized, the first call with a model
    and guide also runs particle 0 alone and raises
    :class:`~lvmkit.inference.estimators.EstimatorError`, naming the site, where the two
    disagree (a model that reduces with ``.sum()``). ``loss`` returns ``-L_K`` (estimated),
    not the ELBO.

    This estimates the gradient of ``L_K``, *not* of the ELBO (``objective = "iwae"``);
    :func:`lvmkit.inference.check.exact_iwae_gradient` computes the exact ``L_K`` gradient
    for small discrete guides, and :func:`~lvmkit.inference.check.check_unbiased` tests
    against it.

    Example: one SVI step on a small sigmoid belief net.

    >>> import pyro
    >>> import torch
    >>> from lvmkit.inference import VIMCOELBO
    >>> from lvmkit.models import build
    >>> model, guide = build("sbn-linear", x_dim=4, layers=(3,))
    >>> x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    >>> elbo = VIMCOELBO(num_particles=4)
    >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=elbo)
    >>> isinstance(svi.step(x), float)
    True
    >>> elbo.objective
    'iwae'
    """

    objective = "iwae"  # the K-sample bound, K = num_particles

    def __init__(self, num_particles: int = 2, **kwargs) -> None:
        if num_particles < 2:
            raise ValueError(
                f"VIMCOELBO needs num_particles >= 2 for its leave-one-out baselines, "
                f"got {num_particles}"
            )
        super().__init__(num_particles=num_particles,
                         vectorize_particles=kwargs.pop("vectorize_particles", True), **kwargs)
        self._broadcast_checked = PairDecisions()  # pairs checked to broadcast

    def _get_traces(self, model, guide, args, kwargs):
        if not self.vectorize_particles:
            yield from super()._get_traces(model, guide, args, kwargs)
            return
        yield from checked_particle_traces(self, super()._get_traces, model, guide, args,
                                           kwargs, "pass vectorize_particles=False")

    def _particle_terms(self, model_trace, guide_trace, ndim: int | None = None):
        """``(log_w, score, scale, pdim)``: per-particle log-weights and guide scores,
        summed to the shared plates (``ndim`` batch dims), with the particle dim at
        ``pdim`` (``None`` for a trace of one particle)."""
        guide_latents = latent_guide_sites(guide_trace)
        for name, site in guide_latents:
            refuse_enumerated(name, site, "VIMCOELBO")
        # Every guide sample site enters the weight, observed ones too: a hierarchical guide
        # adds its reverse model -log r(a|x,z) as a factor site, and dropping it would make
        # the bound invalid. Only the latent sites carry a score term.
        guide_sites = sample_sites(guide_trace)
        sites = sample_sites(model_trace) + guide_sites
        particle_frame = next(
            (f for f in sites[0][1]["cond_indep_stack"] if f.name == PARTICLE_PLATE), None
        )
        shared = frozenset.intersection(*(_vectorized_frames(s) for _, s in sites))
        keep = {f.dim for f in shared}
        ndim = int(self.max_plate_nesting) if ndim is None else ndim
        scale = _common_scale(sites)

        log_w = 0.0
        for _, site in sample_sites(model_trace):
            log_w = log_w + _sum_to(site["log_prob"] / scale, keep, ndim)
        for _, site in guide_sites:
            log_w = log_w - _sum_to(site["log_prob"] / scale, keep, ndim)
        score = 0.0
        for _, site in guide_latents:
            score_term = site["score_parts"].score_function
            if not is_identically_zero(score_term):
                mask = _site_mask(site)
                if mask is not None:
                    score_term = score_term * mask
                score = score + _sum_to(score_term, keep, ndim)
        return log_w, score, scale, None if particle_frame is None else particle_frame.dim

    def _objective(self, log_w, score, scale: float, pdim: int):
        """``(-s L_K estimate, surrogate)`` from the particles' log-weights along ``pdim``."""
        k = self.num_particles
        log_w_det = log_w.detach()
        bound = torch.logsumexp(log_w_det, pdim, keepdim=True) - math.log(k)
        surrogate = torch.logsumexp(log_w, pdim, keepdim=True) - math.log(k)
        if torch.is_tensor(score):
            signal = bound - _leave_one_out_bound(log_w_det, pdim)
            surrogate = surrogate + (signal * score).sum(pdim, keepdim=True)
        return -scale * float(bound.sum()), -scale * surrogate.sum()

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        if not sample_sites(model_trace) + sample_sites(guide_trace):
            return 0.0, 0.0  # an empty program, as Trace_ELBO scores it
        loss, surrogate = self._objective(*self._particle_terms(model_trace, guide_trace))
        # Trace_ELBO divides by num_particles; the vectorized trace holds all K at once.
        return self.num_particles * loss, self.num_particles * surrogate

    def _sequential(self, model, guide, args, kwargs):
        """``vectorize_particles=False``: the K particles as K traces (for models whose
        plates or parameters assume no particle dimension), their terms stacked along a
        new leftmost dimension; ``(loss, surrogate)``."""
        traces = [self._get_trace(model, guide, args, kwargs) for _ in range(self.num_particles)]
        if not any(sample_sites(m) + sample_sites(g) for m, g in traces):
            return 0.0, 0.0
        ndim = max(plate_nesting(m, g) for m, g in traces)
        terms = [self._particle_terms(m, g, ndim) for m, g in traces]
        scales = {t[2] for t in terms}
        if len(scales) > 1:
            raise EstimatorError(f"VIMCOELBO: the particles have different scales {scales}")
        log_w = torch.stack(torch.broadcast_tensors(*(t[0] for t in terms)))
        scores = [torch.as_tensor(t[1], dtype=log_w.dtype, device=log_w.device) for t in terms]
        score = torch.stack(torch.broadcast_tensors(*scores))
        return self._objective(log_w, score, scales.pop(), -(ndim + 1))

    def differentiable_loss(self, model, guide, *args, **kwargs):
        if self.vectorize_particles:
            return super().differentiable_loss(model, guide, *args, **kwargs)
        loss, surrogate = self._sequential(model, guide, args, kwargs)
        warn_if_nan(surrogate, "loss")
        return loss + (surrogate - torch_item(surrogate))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        if self.vectorize_particles:
            return super().loss_and_grads(model, guide, *args, **kwargs)
        loss, surrogate = self._sequential(model, guide, args, kwargs)
        if getattr(surrogate, "requires_grad", False):
            surrogate.backward(retain_graph=self.retain_graph)
        warn_if_nan(loss, "loss")
        return loss

    def loss(self, model, guide, *args, **kwargs) -> float:
        """Estimate of ``-L_K`` (negative importance-weighted bound)."""
        with torch.no_grad():
            if not self.vectorize_particles:
                return self._sequential(model, guide, args, kwargs)[0]
            total = 0.0
            for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
                if not sample_sites(model_trace) + sample_sites(guide_trace):
                    continue
                log_w, _, scale, pdim = self._particle_terms(model_trace, guide_trace)
                bound = torch.logsumexp(log_w, pdim) - math.log(self.num_particles)
                total -= scale * float(bound.sum())
        return total


def _leave_one_out_bound(log_w: torch.Tensor, dim: int) -> torch.Tensor:
    """``L_{-k}``: the bound with ``log w_k`` replaced by the mean of the other log-weights.

    ``L_{-k} = log (1/K) [sum_{j != k} w_j + exp(mean_{j != k} log w_j)]`` for every ``k``
    in O(K) time and memory (a K x K grid of log-weights would need K^2: 10 GB at
    K = 50,000). Each sum is taken relative to the largest term it contains: for ``k`` not
    the argmax that is the overall maximum ``M``, and ``sum_{j != k}`` is ``S - w_k`` with
    ``S >= 1 + w_k`` (relative to ``M``), so the subtraction loses at most a few ulps; for
    the argmax itself the other terms are summed directly relative to their own maximum,
    as ``S - w_k`` would cancel catastrophically there (and underflow to ``log 0``).
    """
    k = log_w.shape[dim]
    moved = log_w.detach().movedim(dim, 0)
    others_mean = (moved.sum(0, keepdim=True) - moved) / (k - 1)
    top, top_index = moved.max(0, keepdim=True)
    is_top = torch.zeros_like(moved, dtype=torch.bool).scatter_(0, top_index, True)
    scaled = (moved - top).exp()
    # For k != argmax: relative to M.
    rest = torch.log(scaled.sum(0, keepdim=True) - scaled + (others_mean - top).exp()) + top
    # For the argmax: relative to the largest of the other log-weights and their mean.
    mean_at_top = others_mean.gather(0, top_index)
    second = moved.masked_fill(is_top, -math.inf).amax(0, keepdim=True)
    ref = torch.maximum(second, mean_at_top)
    others = (moved - ref).exp().masked_fill(is_top, 0.0).sum(0, keepdim=True)
    at_top = torch.log(others + (mean_at_top - ref).exp()) + ref
    loo = torch.where(is_top, at_top.expand_as(moved), rest) - math.log(k)
    return loo.movedim(0, dim)
