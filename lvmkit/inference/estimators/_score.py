"""Shared machinery of the leave-one-out score-function estimators (RLOO, Double CV, RODEO).

All three draw ``K`` independent samples per datum as Pyro's vectorized particles (the
``num_particles_vectorized`` plate), compute each draw's learning signal
``f = log p(x, z) - log q(z | x)`` Rao-Blackwellised by plate as ``Trace_ELBO`` does, and
centre draw ``k``'s signal on quantities computed from the *other* ``K - 1`` draws only, so
the centring is independent of draw ``k`` and the estimator stays unbiased.

For Bernoulli and OneHotCategorical guide sites the estimators are written as a gradient
with respect to the site's logits ``eta`` (per element, ``d log q(b) / d eta = b - pi``),
pushed into the parameters through the surrogate ``sum(coef.detach() * eta)``; any other
non-reparameterized site gets plain RLOO through its score term. Reparameterized continuous
sites keep their pathwise gradient, exactly as in ``Trace_ELBO``.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions.util import is_identically_zero
from pyro.infer import Trace_ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.trace_elbo import _compute_log_r
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.messenger import Messenger
from pyro.util import check_if_enumerated

from lvmkit.inference.estimators._pairs import PairDecisions, checked_particle_traces
from lvmkit.inference.estimators.nvil import (
    discrete_kind,
    innermost,
    latent_guide_sites,
    model_terms,
    refuse_enumerated,
)
from lvmkit.inference.estimators.sites import PARTICLE_PLATE

BERNOULLI, ONEHOT = "bernoulli", "onehot"


class _LeafValues(Messenger):
    """Draws every Bernoulli / OneHotCategorical guide site as a fresh leaf tensor that
    requires grad, so the learning signal can be differentiated in the sampled values
    (Double CV and RODEO's Taylor terms need ``df/db`` at the draws)."""

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or msg["value"] is not None:
            return
        if discrete_kind(msg["fn"]) not in (BERNOULLI, ONEHOT):
            return
        with torch.no_grad():
            value = msg["fn"](*msg["args"], **msg["kwargs"])
        msg["value"] = value.detach().requires_grad_(True)


def element_mask(site: dict) -> torch.Tensor | None:
    """Boolean mask over the value's elements from ``poutine.mask`` and ``.mask()``."""
    shape = site["value"].shape
    masks = []
    if site["mask"] is False:
        masks.append(torch.zeros((), dtype=torch.bool))
    elif torch.is_tensor(site["mask"]):
        masks.append(site["mask"].reshape(site["mask"].shape + (1,) * site["fn"].event_dim))
    fn = site["fn"]
    while isinstance(
        fn, dist.Independent | torch.distributions.Independent | dist.ExpandedDistribution
        | dist.MaskedDistribution
    ):
        if isinstance(fn, dist.MaskedDistribution):
            if fn._mask is False:
                masks.append(torch.zeros((), dtype=torch.bool))
            elif torch.is_tensor(fn._mask):
                masks.append(fn._mask.reshape(fn._mask.shape + (1,) * fn.event_dim))
        fn = fn.base_dist
    if not masks:
        return None
    out = torch.ones(shape, dtype=torch.bool, device=site["value"].device)
    for m in masks:
        out = out & m.to(out.device).expand(shape)
    return out


def particle_dim(name: str, site: dict, estimator: str) -> int:
    """The (negative) batch dim of the vectorized particle plate at ``site``."""
    for frame in site["cond_indep_stack"]:
        if frame.name == PARTICLE_PLATE and frame.vectorized:
            return frame.dim
    raise ValueError(
        f"site {name!r}: {estimator} draws its K samples as vectorized particles, but the "
        f"site is not inside the {PARTICLE_PLATE!r} plate"
    )


def loo_mean(t: torch.Tensor, dim: int) -> torch.Tensor:
    """For each index along ``dim``, the mean of ``t`` over the *other* indices."""
    k = t.shape[dim]
    return (t.sum(dim, keepdim=True) - t) / (k - 1)


def reduce_like(t: torch.Tensor, like: torch.Size) -> torch.Tensor:
    """Sum ``t`` over the dims where the (right-aligned) shape ``like`` has size 1."""
    like = (1,) * (t.dim() - len(like)) + tuple(like)
    dims = [i for i, (a, b) in enumerate(zip(like, t.shape, strict=True)) if a == 1 and b != 1]
    return t.sum(dims, keepdim=True) if dims else t


def site_signal(site: dict, log_r, pdim_el: int) -> torch.Tensor:
    """Learning signal of ``site`` in element space (batch dims + ones for event dims)."""
    signal = log_r.sum_to(site["cond_indep_stack"])
    value = site["value"]
    signal = torch.as_tensor(signal, dtype=value.dtype, device=value.device)
    signal = signal.reshape(signal.shape + (1,) * site["fn"].event_dim)
    if signal.dim() < -pdim_el:
        signal = signal.reshape((1,) * (-pdim_el - signal.dim()) + signal.shape)
    return signal


def _value_differentiable_total(model_trace, guide_trace, leaves: set[int]) -> torch.Tensor:
    """``sum log p - sum log q`` over both traces, differentiable in the leaf values.

    ``OneHotCategorical.log_prob`` takes an argmax, so its value gradient is lost; for those
    sites a straight-through term ``(v - v.detach()) . log pi`` (zero in value) restores
    ``d log pi_v / d v = log pi``.
    """
    total = 0.0
    for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
        for site in trace.nodes.values():
            if site["type"] != "sample":
                continue
            if trace is guide_trace and site["is_observed"]:
                continue
            total = total + sign * site["log_prob_sum"]
            value = site["value"]
            if discrete_kind(site["fn"]) == ONEHOT and id(value) in leaves:
                logits = innermost(site["fn"]).logits.detach()
                term = (value - value.detach()) * logits
                mask = element_mask(site)
                if mask is not None:
                    term = term * mask
                # per batch element (event dims summed), so a tensor scale broadcasts
                term = term.sum(tuple(range(-site["fn"].event_dim, 0)))
                total = total + sign * (term * site["scale"]).sum()
    return total


class LeaveOneOutELBO(Trace_ELBO):
    """Base of :class:`~lvmkit.inference.estimators.rloo.RLOOELBO` and its extensions."""

    estimator_name = "RLOOELBO"
    #: whether :meth:`_discrete_coefficient` needs ``df/db`` at the draws
    value_gradients = False

    def __init__(self, num_particles: int = 2, **kwargs) -> None:
        if not isinstance(num_particles, int) or num_particles < 2:
            raise ValueError(
                f"{self.estimator_name} needs num_particles >= 2 (got {num_particles!r}): "
                "each draw's baseline is the mean learning signal of the other K - 1 draws "
                "of the same datum, and with K = 1 there is no other draw"
            )
        if not kwargs.pop("vectorize_particles", True):
            raise ValueError(
                f"{self.estimator_name} draws its K samples per datum as vectorized particles; "
                "vectorize_particles=False is not supported"
            )
        super().__init__(num_particles=num_particles, vectorize_particles=True, **kwargs)
        self._broadcast_checked = PairDecisions()  # pairs checked to broadcast

    # -- traces -------------------------------------------------------------------------

    def _get_traces(self, model, guide, args, kwargs):
        yield from checked_particle_traces(
            self, super()._get_traces, model, guide, args, kwargs,
            "use an estimator that runs particles one by one (NVILELBO, RebarELBO)")

    def _get_trace(self, model, guide, args, kwargs):
        if self.value_gradients:
            guide = _LeafValues()(guide)
        model_trace, guide_trace = get_importance_trace(
            "flat", self.max_plate_nesting, model, guide, args, kwargs
        )
        if is_validation_enabled():
            check_if_enumerated(guide_trace)
        return model_trace, guide_trace

    def _uses_logits(self, kind: str | None) -> bool:
        """Whether a site of this kind goes through :meth:`_discrete_coefficient`."""
        return False

    # -- surrogate ------------------------------------------------------------------------

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        elbo_particle, surrogate = model_terms(model_trace)
        score_sites = []
        for name, site in latent_guide_sites(guide_trace):
            refuse_enumerated(name, site, self.estimator_name)
            _, score_term, entropy_term = site["score_parts"]
            elbo_particle = elbo_particle - torch_item(site["log_prob_sum"])
            if not is_identically_zero(entropy_term):
                surrogate = surrogate - entropy_term.sum()
            if not is_identically_zero(score_term):
                score_sites.append((name, site, score_term))
        if score_sites:
            log_r = _compute_log_r(model_trace, guide_trace)
            value_grads = {}
            logit_sites = [
                (n, s) for n, s, _ in score_sites if self._uses_logits(discrete_kind(s["fn"]))
            ]
            if self.value_gradients and logit_sites:
                value_grads = self._value_grads(model_trace, guide_trace, logit_sites)
            control_loss = 0.0
            for name, site, score_term in score_sites:
                pdim = particle_dim(name, site, self.estimator_name)
                kind = discrete_kind(site["fn"])
                if self._uses_logits(kind):
                    term, site_control = self._logit_surrogate(
                        name, site, kind, log_r, pdim, value_grads.get(name)
                    )
                    surrogate = surrogate + term
                    control_loss = control_loss + site_control
                else:
                    surrogate = surrogate + self._rloo_score_surrogate(
                        site, score_term, log_r, pdim
                    )
            if torch.is_tensor(control_loss):
                # moves only the controls: every other input of the coefficients is detached
                surrogate = surrogate - control_loss
        return -elbo_particle, -surrogate

    def _rloo_score_surrogate(self, site, score_term, log_r, pdim: int) -> torch.Tensor:
        """``sum_k (f_k - mean_{j != k} f_j) log q(z_k)``, per datum (any distribution)."""
        signal = log_r.sum_to(site["cond_indep_stack"])
        signal = torch.as_tensor(signal, dtype=score_term.dtype, device=score_term.device)
        if signal.dim() < -pdim:
            signal = signal.reshape((1,) * (-pdim - signal.dim()) + signal.shape)
        centred = signal - loo_mean(signal, pdim) if signal.shape[pdim] > 1 else 0 * signal
        # Not masked: a mask removes the site's own log-density from the ELBO, not the
        # dependence of the rest of it on the value drawn (Trace_ELBO's score term is
        # unmasked too); where nothing else depends on a masked element its signal is 0.
        return (centred.detach() * score_term).sum()

    def _value_grads(self, model_trace, guide_trace, sites) -> dict[str, torch.Tensor]:
        leaves = [s["value"] for _, s in sites]
        if not all(v.requires_grad for v in leaves):
            bad = [n for n, s in sites if not s["value"].requires_grad]
            raise ValueError(
                f"sites {bad}: {self.estimator_name} needs df/db at the draws, but these "
                "values were not drawn by the estimator (are they conditioned or replayed?)"
            )
        total = _value_differentiable_total(model_trace, guide_trace, {id(v) for v in leaves})
        grads = torch.autograd.grad(total, leaves, retain_graph=True, allow_unused=True)
        return {
            name: (torch.zeros_like(v) if g is None else g.detach())
            for (name, _), v, g in zip(sites, leaves, grads, strict=True)
        }

    def _logit_surrogate(self, name, site, kind, log_r, pdim, grad_b):
        value = site["value"].detach()
        event_dim = site["fn"].event_dim
        pdim_el = pdim - event_dim
        base = innermost(site["fn"])
        logits = base.logits.expand(value.shape)
        if kind == BERNOULLI:
            probs = torch.sigmoid(logits.detach())
        else:
            probs = torch.softmax(logits.detach(), -1)
        f = site_signal(site, log_r, pdim_el).detach()
        # not masked, for the reason given in _rloo_score_surrogate (a learned control
        # may use the mask: it is zero-mean either way)
        coef = self._discrete_coefficient(name, kind, f, value, probs, grad_b, pdim_el,
                                          element_mask(site))
        control = 0.0
        if coef.requires_grad:
            estimate = coef.mean(pdim_el)
            control = estimate.pow(2).mean()
        return (coef.detach() * logits).sum(), control

    def _discrete_coefficient(self, name, kind, f, value, probs, grad_b, pdim, mask=None):
        """Per-element estimate of ``d E[f] / d eta`` for each draw (element space);
        ``mask`` is the site's element mask (``None``: unmasked)."""
        return (f - loo_mean(f, pdim)) * (value - probs)


def covariance_times(kind: str, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Cov_q[b] v`` for factorised q: ``p(1-p) v`` (Bernoulli), ``pi (v - pi.v)`` (one-hot)."""
    if kind == BERNOULLI:
        return probs * (1 - probs) * v
    return probs * (v - (probs * v).sum(-1, keepdim=True))
