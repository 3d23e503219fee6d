"""ARM (Yin & Zhou, 2019) and DisARM (Dong, Mnih & Tucker, 2020) for Bernoulli guide sites.

Both rewrite ``b = 1[u < sigmoid(phi)]``, ``u ~ U(0, 1)`` and pair it with the antithetic
draw ``b~ = 1[1 - u < sigmoid(phi)]``; the gradient with respect to the logits ``phi``
needs the learning signal ``f`` at both.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro.distributions as dist
import torch
from pyro.distributions.util import is_identically_zero
from pyro.infer import Trace_ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.trace_elbo import _compute_log_r
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from pyro.util import check_if_enumerated

from lvmkit.inference.estimators import EstimatorError
from lvmkit.inference.estimators.nvil import (
    discrete_kind,
    innermost,
    latent_guide_sites,
    model_terms,
    refuse_enumerated,
)

__all__ = ["ARMELBO", "DisARMELBO"]

_UNIFORM = "_lvmkit_arm_uniform"
_ANTITHETIC = "_lvmkit_arm_antithetic_signal"


def _bernoulli_logits(fn: dist.Distribution, shape: torch.Size) -> torch.Tensor:
    """The logits of every element of a (wrapped) Bernoulli site's value."""
    return innermost(fn).logits.expand(shape)


class _BernoulliNoise(Messenger):
    """Draws every Bernoulli guide site as ``1[u < p]`` from recorded uniforms.

    ``uniforms`` (by site name) are reused where given, so a second run can flip one site to
    its antithetic ``1 - u`` and keep common random numbers elsewhere; ``fixed`` values
    (subsample indices, upstream continuous sites) are replayed as they are.
    """

    def __init__(self, uniforms: dict | None = None, fixed: dict | None = None) -> None:
        super().__init__()
        self.uniforms = uniforms or {}
        self.fixed = fixed or {}
        self.values: dict[str, torch.Tensor] = {}
        self.order: list[str] = []

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or msg["value"] is not None:
            return
        name = msg["name"]
        if name in self.fixed:
            msg["value"] = self.fixed[name]
            return
        if discrete_kind(msg["fn"]) != "bernoulli":
            return
        shape = msg["fn"].batch_shape + msg["fn"].event_shape
        probs = innermost(msg["fn"]).probs.detach().expand(shape)
        u = self.uniforms.get(name)
        if u is None:
            u = torch.rand(shape, dtype=probs.dtype, device=probs.device)
        msg["value"] = (u < probs).to(probs.dtype)
        msg["infer"] = {**msg["infer"], _UNIFORM: u}

    def _pyro_post_sample(self, msg) -> None:
        if not msg["is_observed"]:
            self.values[msg["name"]] = msg["value"]
            self.order.append(msg["name"])


def check_antithetic_site(name: str, site: dict, estimator: str, kinds: tuple[str, ...],
                          supported: str, advice: str) -> bool:
    """Whether a guide site is one the estimator pairs with an antithetic draw (its
    :func:`discrete_kind` is in ``kinds``); ``False`` for a reparameterized continuous site.
    Any other site is refused with an :class:`EstimatorError` naming it and ``advice``."""
    refuse_enumerated(name, site, estimator)
    if discrete_kind(site["fn"]) in kinds:
        return True
    if site["fn"].has_rsample:
        return False
    kind = type(innermost(site["fn"])).__name__
    raise EstimatorError(
        f"site {name!r}: {estimator} supports {supported} (and reparameterized continuous "
        f"ones) only, got {kind}; {advice}"
    )


def antithetic_traces(model, guide, args, kwargs, max_plate_nesting: float, noise_type: type,
                      select: Callable[[str, dict], bool], uniform_key: str, signal_key: str,
                      value_key: str | None = None, warn_enumerated: bool = False):
    """Model and guide traces of one draw, with each selected guide site's antithetic signal.

    For every site that ``select`` accepts (it refuses unsupported ones), the program runs
    again with that site's uniforms flipped (``u -> 1 - u``), its upstream noise and the
    subsamples fixed; the learning signal of that run, summed to the site's plates, goes
    into ``site["infer"][signal_key]`` (and, with ``value_key``, the antithetic value).

    :param noise_type: a :class:`_BernoulliNoise` (sub)class that records each site's
        uniforms under ``uniform_key``.
    :param warn_enumerated: give Pyro's warning for guide sites marked for enumeration
        first (under validation).
    """
    noise = noise_type()
    model_trace, guide_trace = get_importance_trace(
        "flat", max_plate_nesting, model, noise(guide), args, kwargs
    )
    if warn_enumerated and is_validation_enabled():
        check_if_enumerated(guide_trace)  # Pyro's warning, before ours refuses the site
    selected = [name for name, site in latent_guide_sites(guide_trace) if select(name, site)]
    uniforms = {name: guide_trace.nodes[name]["infer"][uniform_key] for name in selected}
    subsamples = {
        name: value
        for name, value in noise.values.items()
        if name not in guide_trace.nodes or site_is_subsample(guide_trace.nodes[name])
    }
    for name in selected:
        upstream = noise.order[: noise.order.index(name)]
        fixed = {n: noise.values[n] for n in upstream if n not in uniforms}
        flipped = {**uniforms, name: 1.0 - uniforms[name]}
        with torch.no_grad():
            anti_model, anti_guide = get_importance_trace(
                "flat", max_plate_nesting, model,
                noise_type(flipped, {**subsamples, **fixed})(guide), args, kwargs,
            )
            site = guide_trace.nodes[name]
            signal = _compute_log_r(anti_model, anti_guide).sum_to(site["cond_indep_stack"])
            site["infer"][signal_key] = signal
            if value_key is not None:
                site["infer"][value_key] = anti_guide.nodes[name]["value"]
    return model_trace, guide_trace


def antithetic_loss_particle(model_trace, guide_trace, key: str, site_surrogate):
    """``(loss, surrogate loss)`` of one particle for an estimator that pairs each marked
    guide site with an antithetic draw: Trace_ELBO's ELBO and pathwise terms, plus
    ``site_surrogate(site, log_r)`` for every guide site whose ``infer`` holds ``key``
    (the antithetic learning signal recorded by the estimator's ``_get_trace``)."""
    elbo_particle, surrogate = model_terms(model_trace)
    log_r = None
    for _, site in latent_guide_sites(guide_trace):
        elbo_particle = elbo_particle - torch_item(site["log_prob_sum"])
        entropy_term = site["score_parts"].entropy_term
        if not is_identically_zero(entropy_term):
            surrogate = surrogate - entropy_term.sum()
        if key not in site["infer"]:
            continue
        if log_r is None:
            log_r = _compute_log_r(model_trace, guide_trace)
        surrogate = surrogate + site_surrogate(site, log_r)
    return -elbo_particle, -surrogate


class ARMELBO(Trace_ELBO):
    """ELBO gradient with the augment-REINFORCE-merge estimator (Yin & Zhou, 2019).

    For a Bernoulli site with logits ``phi`` and learning signal ``f`` (``log p - log q``,
    Rao-Blackwellised by plate as in ``Trace_ELBO``), with ``b = 1[u < sigmoid(phi)]`` and
    ``b~ = 1[1 - u < sigmoid(phi)]`` sharing one uniform vector ``u`` per datum:

    .. math::

        \\nabla_\\phi \\mathbb{E}[f(b)] = \\mathbb{E}_u\\big[(f(\\tilde b) - f(b))(u - 1/2)\\big].

    Several stochastic layers: each Bernoulli site is handled in turn, with the guide sites
    sampled *before* it held at their values, the site itself flipped to ``b~`` and the
    sites after it re-drawn from the guide given ``b~`` (Bernoulli sites with the same
    uniforms, i.e. common random numbers; other sites afresh). This gives an unbiased
    estimate of ``f`` at ``b~`` given everything upstream, so the sum over layers is an
    unbiased ELBO gradient (the chain rule of Yin & Zhou, 2019, sec. 3). It costs one extra
    model and guide pass (without autograd) per Bernoulli site; the two branches are not
    batched into one pass, because the re-drawn lower layers may differ.

    Reparameterized continuous sites keep their pathwise gradient; any other
    non-reparameterized site (``OneHotCategorical``, ``Poisson``...) is refused.

    Example: one SVI step on a small sigmoid belief net.

    >>> import pyro
    >>> import torch
    >>> from lvmkit.inference import ARMELBO
    >>> from lvmkit.models import build
    >>> model, guide = build("sbn-linear", x_dim=4, layers=(3,))
    >>> x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=ARMELBO())
    >>> isinstance(svi.step(x), float)
    True
    """

    estimator_name = "ARMELBO"
    objective = "elbo"  # unbiased for the ELBO's gradient (see check.check_unbiased)

    def _coefficient(self, f_main, f_anti, u, probs, value) -> torch.Tensor:
        """Per-element gradient of ``E[f]`` with respect to the logits."""
        return (f_anti - f_main) * (u - 0.5)

    def _check_site(self, name: str, site: dict) -> bool:
        """Return whether the site is a Bernoulli site; refuse unsupported ones."""
        return check_antithetic_site(
            name, site, self.estimator_name, ("bernoulli",), "Bernoulli sites",
            "for one-hot sites use CategoricalDisARMELBO (DisARM's stick-breaking "
            "extension), or RLOOELBO, NVILELBO or RebarELBO",
        )

    def _get_trace(self, model, guide, args, kwargs):
        return antithetic_traces(
            model, guide, args, kwargs, self.max_plate_nesting, _BernoulliNoise,
            self._check_site, _UNIFORM, _ANTITHETIC, warn_enumerated=True,
        )

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        return antithetic_loss_particle(model_trace, guide_trace, _ANTITHETIC,
                                        self._site_surrogate)

    def _site_surrogate(self, site: dict, log_r) -> torch.Tensor:
        value = site["value"]
        event_dim = site["fn"].event_dim

        def per_element(signal):
            signal = torch.as_tensor(signal, dtype=value.dtype)
            return signal.reshape(signal.shape + (1,) * event_dim)

        f_main = per_element(log_r.sum_to(site["cond_indep_stack"]))
        f_anti = per_element(site["infer"][_ANTITHETIC])
        logits = _bernoulli_logits(site["fn"], value.shape)
        u = site["infer"][_UNIFORM]
        # Not masked: a mask removes the site's log-density from the ELBO, not the
        # dependence of the rest of it on the value drawn (as Trace_ELBO's unmasked score
        # term); where nothing depends on a masked element, f_anti = f_main there.
        coefficient = self._coefficient(f_main, f_anti, u, torch.sigmoid(logits.detach()), value)
        return (coefficient.detach() * logits).sum()


class DisARMELBO(ARMELBO):
    """ELBO gradient with DisARM (Dong, Mnih & Tucker, 2020), ARM's Rao-Blackwellisation.

    With the same antithetic pair as :class:`ARMELBO` (and the same per-layer treatment of
    several stochastic layers), the per-element logit gradient is

    .. math::

        \\frac12\\,(f(b) - f(\\tilde b))\\,(-1)^{\\tilde b}\\,
        \\mathbb{1}[b \\ne \\tilde b]\\,\\sigma(|\\phi|),

    which integrates ``u`` out of ARM given ``(b, b~)`` and so never has higher variance.

    Example: one SVI step on a small sigmoid belief net.

    >>> import pyro
    >>> import torch
    >>> from lvmkit.inference import DisARMELBO
    >>> from lvmkit.models import build
    >>> model, guide = build("sbn-linear", x_dim=4, layers=(3,))
    >>> x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=DisARMELBO())
    >>> isinstance(svi.step(x), float)
    True

    A categorical site is refused, naming it:

    >>> model, guide = build("categorical-vae", x_dim=4, num_latents=2, num_categories=3)
    >>> DisARMELBO().loss(model, guide, x)
    Traceback (most recent call last):
    ...
    lvmkit.inference.estimators.EstimatorError: site 'z': DisARMELBO supports Bernoulli sites ...
    """

    estimator_name = "DisARMELBO"

    def _coefficient(self, f_main, f_anti, u, probs, value) -> torch.Tensor:
        anti = ((1.0 - u) < probs).to(value.dtype)
        sign = 1.0 - 2.0 * anti
        differ = (value != anti).to(value.dtype)
        sigma_abs = torch.maximum(probs, 1.0 - probs)  # sigmoid(|phi|)
        return 0.5 * (f_main - f_anti) * sign * differ * sigma_abs
