"""DisARM for Bernoulli *and* OneHotCategorical guide sites (Dong, Mnih & Tucker, 2021).

A separate module so that :class:`~lvmkit.inference.estimators.arm.DisARMELBO` stays
untouched while it is being reworked; the two should be folded into one class.
"""

from __future__ import annotations

import torch
from pyro.infer import Trace_ELBO

from lvmkit.inference.estimators._score import BERNOULLI, ONEHOT
from lvmkit.inference.estimators.arm import (
    _BernoulliNoise,
    antithetic_loss_particle,
    antithetic_traces,
    check_antithetic_site,
)
from lvmkit.inference.estimators.nvil import (
    discrete_kind,
    innermost,
)

__all__ = ["CategoricalDisARMELBO", "stick_logits"]

_UNIFORM = "_lvmkit_disarm_sb_uniform"
_ANTITHETIC = "_lvmkit_disarm_sb_antithetic_signal"
_ANTI_VALUE = "_lvmkit_disarm_sb_antithetic_value"


def stick_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits of the stick-breaking decisions of a categorical with ``logits`` (last dim C):
    ``phi_k = log pi_k - log sum_{i > k} pi_i`` for ``k < C - 1``, so that ``c = min{k :
    d_k = 1}`` (``C - 1`` if none) with independent ``d_k ~ Bernoulli(sigmoid(phi_k))`` has
    probabilities ``pi``.

    Example: probabilities (1/2, 1/4, 1/4) stop at the first category with probability 1/2,
    then at the second with probability 1/2.

    >>> import torch
    >>> from lvmkit.inference.estimators.disarm_categorical import stick_logits
    >>> stick_logits(torch.tensor([0.5, 0.25, 0.25]).log()).shape
    torch.Size([2])
    """
    log_pi = torch.log_softmax(logits, -1)
    # log sum_{i >= k} pi_i, by a reversed cumulative logsumexp
    tail = torch.logcumsumexp(log_pi.flip(-1), -1).flip(-1)
    return log_pi[..., :-1] - tail[..., 1:]


def _stick_category(u: torch.Tensor, stick_probs: torch.Tensor) -> torch.Tensor:
    """The category ``min{k : u_k < p_k}`` (``C - 1`` if none)."""
    stops = torch.cat([u < stick_probs, torch.ones_like(u[..., :1], dtype=torch.bool)], -1)
    return stops.to(torch.uint8).argmax(-1)


class _CoupledNoise(_BernoulliNoise):
    """Draws Bernoulli sites as ``1[u < p]`` and one-hot sites by stick-breaking from
    recorded uniforms (reused where given, for common random numbers); ``fixed`` values
    are replayed. ARM's noise handler with one-hot sites added: the same uniforms, fixed
    values and record of the values drawn."""

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or msg["value"] is not None:
            return
        name = msg["name"]
        if name in self.fixed:
            msg["value"] = self.fixed[name]
            return
        kind = discrete_kind(msg["fn"])
        if kind not in (BERNOULLI, ONEHOT):
            return
        shape = msg["fn"].batch_shape + msg["fn"].event_shape
        base = innermost(msg["fn"])
        if kind == BERNOULLI:
            probs = base.probs.detach().expand(shape)
        else:
            probs = torch.sigmoid(stick_logits(base.logits.detach())).expand(
                shape[:-1] + (shape[-1] - 1,)
            )
        u = self.uniforms.get(name)
        if u is None:
            u = torch.rand(probs.shape, dtype=probs.dtype, device=probs.device)
        if kind == BERNOULLI:
            value = (u < probs).to(probs.dtype)
        else:
            category = _stick_category(u, probs)
            value = torch.nn.functional.one_hot(category, shape[-1]).to(probs.dtype)
        msg["value"] = value
        msg["infer"] = {**msg["infer"], _UNIFORM: u}


class CategoricalDisARMELBO(Trace_ELBO):
    """ELBO gradient with DisARM for Bernoulli and OneHotCategorical guide sites (Dong,
    Mnih & Tucker 2020, "DisARM: an antithetic gradient estimator for binary latent
    variables"; Dong, Mnih & Tucker 2021, "Coupled gradient estimators for discrete latent
    variables", stick-breaking construction).

    Bernoulli sites: ``b = 1[u < sigmoid(phi)]``, antithetic ``b~ = 1[1 - u < sigmoid(phi)]``
    and the per-logit gradient

    .. math::

        \\tfrac12 (f(b) - f(\\tilde b)) (-1)^{\\tilde b}\\, 1[b \\ne \\tilde b]\\,
        \\sigma(|\\phi|).

    One-hot sites with probabilities ``pi`` (C categories) are written as independent
    binary stick-breaking decisions ``d_k = 1[u_k < sigmoid(phi_k)]``,
    ``phi_k = log pi_k - log sum_{i>k} pi_i`` (:func:`stick_logits`), category
    ``c = min{k : d_k = 1}``; since the ``d_k`` are independent, the binary DisARM above
    applies to every ``phi_k`` with the antithetic decisions ``1[1 - u_k < sigmoid(phi_k)]``
    and ``f`` at the two categories, and ``phi_k`` carries the gradient to ``pi``. The term
    of a decision that neither category reaches (both stopped earlier) has conditional mean
    zero and is dropped (Rao-Blackwellisation). Unbiased; two evaluations of ``f`` per
    site and datum, like the binary DisARM.

    Several sites / layers are handled as in
    :class:`~lvmkit.inference.estimators.arm.ARMELBO`: for each site in turn, the guide
    sites before it are held, it is flipped to its antithetic draw, and the sites after it
    are re-drawn (discrete ones with common random numbers, others afresh), one extra model
    and guide pass without autograd per discrete site. Reparameterized continuous sites keep
    their pathwise gradient; other non-reparameterized sites are refused. Categories are
    broken in their natural order.

    To be folded into :class:`~lvmkit.inference.estimators.arm.DisARMELBO`.

    Example: one SVI step on a VAE with categorical latents.

    >>> import pyro
    >>> import torch
    >>> from lvmkit.inference import CategoricalDisARMELBO
    >>> from lvmkit.models import build
    >>> model, guide = build("categorical-vae", x_dim=4, num_latents=2, num_categories=3)
    >>> x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    >>> elbo = CategoricalDisARMELBO()
    >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=elbo)
    >>> isinstance(svi.step(x), float)
    True
    """

    estimator_name = "CategoricalDisARMELBO"

    def _check_site(self, name: str, site: dict) -> bool:
        return check_antithetic_site(
            name, site, self.estimator_name, (BERNOULLI, ONEHOT),
            "Bernoulli and OneHotCategorical sites",
            "use RLOOELBO for other discrete distributions",
        )

    def _get_trace(self, model, guide, args, kwargs):
        return antithetic_traces(
            model, guide, args, kwargs, self.max_plate_nesting, _CoupledNoise,
            self._check_site, _UNIFORM, _ANTITHETIC, value_key=_ANTI_VALUE,
        )

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        return antithetic_loss_particle(model_trace, guide_trace, _ANTITHETIC,
                                        self._site_surrogate)

    def _pair_weight(self, probs: torch.Tensor) -> torch.Tensor:
        """``sigma(|phi|) = q(b) q(b~) / P(b, b~)`` for ``b != b~`` under the antithetic
        coupling (Dong et al. 2021's importance-sampling view of DisARM)."""
        return torch.maximum(probs, 1 - probs)

    def _site_surrogate(self, site: dict, log_r) -> torch.Tensor:
        value = site["value"]
        event_dim = site["fn"].event_dim

        def per_element(signal):
            signal = torch.as_tensor(signal, dtype=value.dtype, device=value.device)
            return signal.reshape(signal.shape + (1,) * event_dim)

        difference = per_element(log_r.sum_to(site["cond_indep_stack"])) - per_element(
            site["infer"][_ANTITHETIC]
        )
        u = site["infer"][_UNIFORM]
        base = innermost(site["fn"])
        if discrete_kind(site["fn"]) == BERNOULLI:
            logits = base.logits.expand(value.shape)
        else:
            logits = stick_logits(base.logits).expand(u.shape)
        probs = torch.sigmoid(logits.detach())
        main = u < probs
        anti = (1.0 - u) < probs
        sign = 1.0 - 2.0 * anti.to(value.dtype)
        coefficient = 0.5 * difference * sign * (main != anti) * self._pair_weight(probs)
        if discrete_kind(site["fn"]) == ONEHOT:
            # decision k matters to a category c >= k; drop it where neither reaches it
            k = torch.arange(u.shape[-1], device=u.device)
            reached = (value.argmax(-1, keepdim=True) >= k) | (
                site["infer"][_ANTI_VALUE].argmax(-1, keepdim=True) >= k
            )
            coefficient = coefficient * reached
        # Not masked: a mask removes the site's own log-density, not the dependence of the
        # rest of the ELBO on the value drawn (as Trace_ELBO's unmasked score term).
        return (coefficient.detach() * logits).sum()
