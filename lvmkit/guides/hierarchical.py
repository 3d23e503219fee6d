"""Hierarchical (auxiliary-variable) guides with a learned reverse model.

A hierarchical guide draws an auxiliary ``a ~ q(a | x)`` and then ``z ~ q(z | a, x)``; its
marginal ``q(z | x) = ∫ q(a | x) q(z | a, x) da`` is far richer than a Gaussian but has no
closed-form density. The auxiliary bound (Agakov & Barber 2004; Salimans et al. 2015;
Ranganath et al. 2016; Maaløe et al. 2016) replaces ``log q(z | x)`` by a reverse model
``r(a | x, z)``::

    log p(x) >= E_q[ log p(x, z) + log r(a | x, z) - log q(a | x) - log q(z | a, x) ]
              = ELBO(q(z | x)) - E_q KL(q(a | z, x) || r(a | z, x)),

which is a valid lower bound for *any* ``r``, and equals the marginal ELBO when
``r(a | x, z) = q(a | z, x)``.

With ``K`` auxiliary draws (Sobolev & Vetrov 2019, "Importance Weighted Hierarchical
Variational Inference"), ``a_0 ~ q(a | x)``, ``z ~ q(z | a_0, x)``, ``a_1..a_{K-1} ~
r(a | x, z)``::

    log q̂(z) = log (1/K) Σ_k q(a_k | x) q(z | a_k, x) / r(a_k | x, z)
    log p(x) >= E[ log p(x, z) - log q̂(z) ]

``E log q̂(z) >= log q(z|x)`` decreases monotonically to ``log q(z|x)`` as ``K`` grows, so
the bound tightens with ``K``. Moreover ``E[p(x, z) / q̂(z)] = p(x)`` exactly (the a's are
exchangeable under the symmetrised extended target), so the importance-weighted bound
``E log (1/M) Σ_m p(x, z_m) / q̂(z_m)`` is valid too.

How it is written in Pyro: the auxiliary ``a`` is an ordinary guide sample site marked
``is_auxiliary`` (so Pyro does not warn that the model lacks it), and the correction
``log q̂(z) - log q(a_0, z)`` (``= -log r(a_0 | x, z)`` when ``K = 1``) is a guide factor
site (``dist.Unit`` with ``has_rsample=True``, observed, also marked auxiliary). Every
Pyro ELBO subtracts the log probability of *every* guide sample site, observed ones
included (``Trace_ELBO``, ``TraceGraph_ELBO``, ``RenyiELBO``, ``TraceEnum_ELBO``: see
``pyro/infer/*.py``), and a ``has_rsample=True`` site contributes through the pathwise
(entropy) term only, so each of them computes the valid bound above, and
``lvmkit.inference.log_likelihood`` (``Σ model log p - Σ guide log q``) computes the
importance-weighted one. Such factor sites carry ``infer["reverse_for"]``: the names of
the auxiliary sites they correct; :func:`check_auxiliary_guide` refuses a guide whose
auxiliary site has none (the situation Pyro's plain ``is_auxiliary`` silently allows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median, init_to_sample
from pyro.nn import PyroModule
from pyro.poutine.runtime import am_i_wrapped
from torch import nn
from torch.nn import functional as F

from lvmkit._validation import check_observations
from lvmkit.guides.encoders import MIN_SCALE, check_size, gaussian_params, mlp

__all__ = [
    "AutoHVM",
    "AuxiliaryEncoder",
    "EqualMixtureNormal",
    "check_auxiliary_guide",
    "reverse_factor",
    "iw_hierarchical_correction",
]


class EqualMixtureNormal(dist.TorchDistribution):
    """Equal-weight mixture of ``K`` diagonal Gaussians, reparameterised.

    ``locs`` and ``scales`` have shape ``(..., K, D)``; the event shape is ``(D,)``. A draw
    picks a component uniformly, then ``a = loc_k + scale_k ε``. The component's law does not
    depend on the parameters, so the pathwise gradient given ``k`` is unbiased: the site is
    ``has_rsample=True`` and Pyro uses no score-function term for it.
    """

    arg_constraints = {"locs": constraints.real, "scales": constraints.positive}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, locs: torch.Tensor, scales: torch.Tensor, validate_args=None) -> None:
        if locs.dim() < 2 or locs.shape != scales.shape:
            raise ValueError(
                "EqualMixtureNormal: locs and scales must share a shape (..., K, D), got "
                f"{tuple(locs.shape)} and {tuple(scales.shape)}"
            )
        self.locs, self.scales = locs, scales
        super().__init__(locs.shape[:-2], locs.shape[-1:], validate_args=validate_args)

    @property
    def num_components(self) -> int:
        return self.locs.shape[-2]

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        shape = batch_shape + self.locs.shape[-2:]
        return EqualMixtureNormal(self.locs.expand(shape), self.scales.expand(shape))

    def rsample(self, sample_shape=()) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        index = torch.randint(self.num_components, shape, device=self.locs.device)
        gather = index[..., None, None].expand(shape + (1,) + self.event_shape)
        locs = self.locs.expand(shape + self.locs.shape[-2:]).gather(-2, gather).squeeze(-2)
        scales = self.scales.expand(shape + self.locs.shape[-2:]).gather(-2, gather).squeeze(-2)
        return locs + scales * torch.randn_like(locs)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        per_component = dist.Normal(self.locs, self.scales).log_prob(value.unsqueeze(-2)).sum(-1)
        return torch.logsumexp(per_component, -1) - math.log(self.num_components)


def reverse_factor(name: str, log_correction: torch.Tensor, reverse_for: Sequence[str]) -> None:
    """Record ``log_correction`` as a guide factor that corrects auxiliary sites.

    The site's log probability is ``log_correction``, which every Pyro ELBO *subtracts*; for
    a single auxiliary draw pass ``-log r(a | x, z)``. Equivalent to ``pyro.factor(name,
    log_correction, has_rsample=True)`` plus the ``reverse_for`` mark that
    :func:`check_auxiliary_guide` looks for.
    """
    if not am_i_wrapped():
        return  # outside inference a factor has no effect (and Pyro would warn)
    unit = dist.Unit(log_correction, has_rsample=True)
    pyro.sample(
        name,
        unit,
        obs=unit.sample(),
        infer={"is_auxiliary": True, "reverse_for": tuple(reverse_for)},
    )


def iw_hierarchical_correction(
    log_q_a0: torch.Tensor,
    log_q_z_given_a0: torch.Tensor,
    log_r_a0: torch.Tensor,
    log_q_extra: torch.Tensor | None = None,
    log_r_extra: torch.Tensor | None = None,
) -> torch.Tensor:
    """``log q̂(z) - log q(a_0, z)``: the guide factor of the (IW) hierarchical bound.

    ``log q̂(z) = log (1/K) Σ_k q(a_k) q(z | a_k) / r(a_k | z)`` with ``a_0`` the draw that
    generated ``z`` and ``a_1..a_{K-1} ~ r(a | z)`` (Sobolev & Vetrov 2019, eq. 7). The
    ``*_extra`` tensors hold ``log q(a_k) + log q(z | a_k)`` and ``log r(a_k | z)`` for the
    extra draws, stacked on dim 0. With none it reduces to ``-log r(a_0 | z)``.
    """
    log_joint_0 = log_q_a0 + log_q_z_given_a0
    if log_q_extra is None:
        return -log_r_a0
    terms = torch.cat([(log_joint_0 - log_r_a0).unsqueeze(0), log_q_extra - log_r_extra], 0)
    log_q_hat = torch.logsumexp(terms, 0) - math.log(terms.shape[0])
    return log_q_hat - log_joint_0


def check_auxiliary_guide(model: Callable, guide: Callable, *args, **kwargs) -> None:
    """Raise ``ValueError`` if the guide has a latent site that neither the model has nor a
    reverse factor corrects.

    Such a site (e.g. one marked only ``infer={"is_auxiliary": True}``) makes every Pyro ELBO
    subtract ``log q(a)`` with no ``log r(a | x, z)``: not a lower bound on ``log p(x)``.
    Mark the correcting factor with :func:`reverse_factor`.
    """
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
        *args, **kwargs
    )
    model_latents = {
        name
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    }
    corrected: set[str] = set()
    for site in guide_trace.nodes.values():
        if site["type"] == "sample":
            corrected.update(site["infer"].get("reverse_for", ()))
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or name in model_latents:
            continue
        if type(site["fn"]).__name__ == "_Subsample":
            continue
        if name not in corrected:
            raise ValueError(
                f"guide site {name!r} is not in the model and no reverse density r({name} | x, z)"
                " corrects it: the objective would not be a lower bound. Add "
                f"lvmkit.guides.hierarchical.reverse_factor(..., reverse_for=[{name!r}])"
            )


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class _ResidualGaussian(nn.Module):
    """``N(P (v - v0) + f(v), diag softplus(g(v) + c)^2)`` with ``softplus(c) = init_scale``.

    ``P`` is a fixed zero-padded identity, so at initialisation (``f``'s output layer is
    zero) the map is the identity between the first coordinates of ``v - v0`` and the
    output: ``q(u | a)`` starts as ``a`` plus small noise and ``r(a | u)`` as its exact
    inverse, so the reverse model is right from the first step and the guide starts as
    the mixture ``q(a)`` itself.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: Sequence[int], init_scale: float):
        super().__init__()
        self.net = mlp(in_dim, hidden, 2 * out_dim)
        with torch.no_grad():
            self.net[-1].weight.zero_()
            self.net[-1].bias.zero_()
        self.register_buffer("projection", torch.eye(out_dim, in_dim))
        self.scale_offset = _inverse_softplus(init_scale)

    def forward(self, v: torch.Tensor, v0: torch.Tensor | float = 0.0):
        loc, raw = self.net(v).chunk(2, dim=-1)
        loc = loc + (v - v0) @ self.projection.T
        return loc, F.softplus(raw + self.scale_offset) + MIN_SCALE


class AutoHVM(AutoContinuous):
    """Hierarchical variational model (Ranganath et al. 2016) as a Pyro autoguide.

    For a model whose latent sites are continuous, all of them are transformed to
    unconstrained space and concatenated into ``u`` (Pyro's :class:`AutoContinuous`
    machinery: ``biject_to`` of each site's support, Jacobians included). Then

    - ``q(a)``: an equal-weight mixture of ``num_components`` diagonal Gaussians on
      ``R^aux_dim`` with learned means and scales (:class:`EqualMixtureNormal`),
    - ``q(u | a) = N(u0 + P a + f(a), diag σ(a)^2)``, ``f, σ`` a tanh MLP, ``P`` a fixed
      zero-padded identity,
    - ``r(a | u) = N(P^T (u - u0) + g(u), diag s(u)^2)``, an MLP reverse model (or a user's
      ``reverse``),

    trained on the auxiliary bound (``num_aux_samples=1``) or the IWHVI bound with
    ``num_aux_samples=K`` draws (Sobolev & Vetrov 2019); see the module docstring. Guide
    sites ``_AutoHVM_aux`` (``a``), ``_AutoHVM_latent`` (``u``) and the factor
    ``_AutoHVM_reverse`` are auxiliary; the model's sites are Delta sites as in every
    :class:`AutoContinuous` guide, so ``Predictive`` returns posterior samples of them and
    leaves the auxiliary sites out.

    Works with ``Trace_ELBO``, ``TraceGraph_ELBO``, ``RenyiELBO`` (``alpha=0`` gives the
    importance-weighted bound) and ``TraceEnum_ELBO`` when enumerated discrete model sites
    are hidden from the guide (``AutoHVM(poutine.block(model, hide=[...]))``), as for any
    Pyro autoguide. Discrete latent sites are refused with an error naming them. Local
    latents in a subsampled plate are not supported (the guide is global, as
    :class:`~pyro.infer.autoguide.AutoMultivariateNormal`).

    :param model: a Pyro model.
    Defaults that work without tuning (measured on :mod:`lvmkit.models.targets`, see
    ``benchmarks/hierarchical.py`` for what else was tried): ``f`` and ``g`` start at zero,
    so ``r`` is the exact inverse of ``q(u | a)`` at the first step and the guide starts as
    the mixture ``q(a)`` shifted to ``u0``; the components start at ``component_spread ·
    N(0, I)`` so that they can find different modes. Train with several particles per
    step (e.g. ``Trace_ELBO(num_particles=32, vectorize_particles=True)``) and a learning
    rate around 3e-3; ``num_aux_samples=4`` trains and evaluates the tighter IWHVI bound.

    :param aux_dim: dimension of ``a``; default ``latent_dim``.
    :param num_components: components of the mixture ``q(a)``; ``1`` gives a Gaussian.
    :param hidden: hidden sizes of the ``q(u | a)`` and ``r(a | u)`` MLPs.
    :param init_scale: initial standard deviation of ``q(u | a)``.
    :param num_aux_samples: ``K`` auxiliary draws for the IWHVI estimate of ``log q(u)``.
    :param reverse: optional callable ``u -> distribution over a`` replacing the MLP;
        its event shape must be ``(aux_dim,)``.
    :param init_loc_fn: per-site initialisation, as in Pyro's autoguides.
    :param component_spread: standard deviation of the initial mixture means around
        ``u0``; ``None`` starts them at prior draws instead.
    """

    def __init__(
        self,
        model: Callable,
        aux_dim: int | None = None,
        num_components: int = 8,
        hidden: Sequence[int] = (64, 64),
        init_scale: float = 0.1,
        num_aux_samples: int = 1,
        reverse: Callable[[torch.Tensor], dist.Distribution] | None = None,
        init_loc_fn: Callable = init_to_median,
        component_spread: float | None = 2.0,
    ) -> None:
        if aux_dim is not None:
            check_size(aux_dim, "aux_dim")
        check_size(num_components, "num_components")
        check_size(num_aux_samples, "num_aux_samples")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale}")
        super().__init__(model, init_loc_fn=init_loc_fn)
        self._aux_dim_arg = aux_dim
        self.num_components = num_components
        self.hidden = tuple(check_size(h, "hidden layer size") for h in hidden)
        self._init_scale = float(init_scale)
        self.num_aux_samples = num_aux_samples
        self._custom_reverse = reverse
        self.component_spread = component_spread
        # a tuple, so that a PyroModule model is not registered as a submodule of the guide
        self._original_model = (model,)

    def _setup_prototype(self, *args, **kwargs) -> None:
        try:
            super()._setup_prototype(*args, **kwargs)
        except ValueError as error:
            # Pyro's own message names the site; say which guide refused it.
            raise ValueError(f"AutoHVM: {error}") from None
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            if site["fn"].support.is_discrete:
                raise ValueError(
                    f"AutoHVM: latent site {name!r} is discrete ({site['fn'].support}); "
                    "enumerate it in the model and hide it from the guide"
                )
        self.aux_dim = self._aux_dim_arg or self.latent_dim
        dim, aux = self.latent_dim, self.aux_dim
        init_loc = self._init_loc()
        self.loc0 = nn.Parameter(init_loc)
        # A mode-seeking objective rarely moves a component from one basin to another, so
        # the components must start spread out to find several modes.
        self.aux_locs = nn.Parameter(self._component_inits(init_loc, *args, **kwargs))
        self.aux_raw_scales = nn.Parameter(
            torch.full((self.num_components, aux), _inverse_softplus(1.0))
        )
        self.forward_net = _ResidualGaussian(aux, dim, self.hidden, self._init_scale)
        if self._custom_reverse is None:
            self.reverse_net = _ResidualGaussian(dim, aux, self.hidden, self._init_scale)
        for p in self.parameters():
            p.data = p.data.to(init_loc)

    def _component_inits(self, init_loc: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Initial mixture means: ``component_spread · N(0, I)``, or (``None``) prior draws
        of ``u - u0`` on ``a``'s first coordinates."""
        if self.component_spread is not None:
            spread = self.component_spread * torch.randn(self.num_components, self.aux_dim)
            return spread.to(init_loc)
        hidden_model = poutine.block(self._original_model[0], self._prototype_hide_fn)
        draws = []
        for _ in range(self.num_components):
            try:
                trace = poutine.block(
                    poutine.trace(InitMessenger(init_to_sample)(hidden_model)).get_trace
                )(*args, **kwargs)
                parts = [
                    biject_to(site["fn"].support).inv(trace.nodes[name]["value"]).reshape(-1)
                    for name, site in self.prototype_trace.iter_stochastic_nodes()
                ]
                draw = torch.cat(parts).detach().to(init_loc) - init_loc
            except (NotImplementedError, KeyError, RuntimeError):
                # e.g. an improper prior cannot be sampled: fall back to unit spread
                draw = torch.randn_like(init_loc)
            draws.append(draw)
        draws = torch.stack(draws)
        aux = torch.zeros(self.num_components, self.aux_dim).to(init_loc)
        width = min(self.aux_dim, self.latent_dim)
        aux[:, :width] = draws[:, :width]
        return aux

    def aux_prior(self) -> EqualMixtureNormal:
        """q(a)."""
        return EqualMixtureNormal(self.aux_locs, F.softplus(self.aux_raw_scales) + MIN_SCALE)

    def conditional(self, a: torch.Tensor) -> dist.Distribution:
        """q(u | a) over the unconstrained latent vector."""
        loc, scale = self.forward_net(a)
        return dist.Normal(self.loc0 + loc, scale).to_event(1)

    def reverse(self, u: torch.Tensor) -> dist.Distribution:
        """r(a | u)."""
        if self._custom_reverse is not None:
            r = self._custom_reverse(u)
        else:
            loc, scale = self.reverse_net(u, self.loc0)
            r = dist.Normal(loc, scale).to_event(1)
        if tuple(r.event_shape) != (self.aux_dim,):
            raise ValueError(
                f"AutoHVM: the reverse model r(a | z) has event shape {tuple(r.event_shape)}"
                f" but q(a) at site '_{self._pyro_name}_aux' has ({self.aux_dim},)"
            )
        return r

    def get_posterior(self, *args, **kwargs):
        raise NotImplementedError(
            "AutoHVM's marginal q(z) has no closed form; sample it by calling the guide"
        )

    def sample_latent(self, *args, **kwargs) -> torch.Tensor:
        prefix = f"_{self._pyro_name}"
        q_a = self.aux_prior()
        a0 = pyro.sample(f"{prefix}_aux", q_a, infer={"is_auxiliary": True})
        q_u = self.conditional(a0)
        u = pyro.sample(f"{prefix}_latent", q_u, infer={"is_auxiliary": True})
        r = self.reverse(u)
        log_q_extra = log_r_extra = None
        if self.num_aux_samples > 1:
            extra = r.rsample((self.num_aux_samples - 1,))
            log_q_extra = q_a.log_prob(extra) + self.conditional(extra).log_prob(u)
            log_r_extra = r.log_prob(extra)
        correction = iw_hierarchical_correction(
            q_a.log_prob(a0), q_u.log_prob(u), r.log_prob(a0), log_q_extra, log_r_extra
        )
        reverse_factor(f"{prefix}_reverse", correction, [f"{prefix}_aux"])
        return u

    def _loc_scale(self, *args, **kwargs):
        # Moments of q(u) by Monte Carlo: the marginal has no closed form.
        with torch.no_grad():
            a = self.aux_prior().sample((1000,))
            u = self.conditional(a).sample()
        return u.mean(0), u.std(0)


class AuxiliaryEncoder(PyroModule):
    """Amortized hierarchical guide for a model with latent site ``"z"`` (e.g. ``VAE``).

    ``q(a | x) q(z | a, x)`` with reverse model ``r(a | x, z)``, all diagonal Gaussians with
    tanh-MLP parameters (the auxiliary VAE of Maaløe et al. 2016 without labels; Salimans et
    al. 2015). Sites, inside ``pyro.plate("data", N)``: ``"a"`` (auxiliary), ``"z"``, and
    the factor ``"a_reverse"``. ``num_aux_samples=K > 1`` uses the IWHVI estimate of
    ``log q(z | x)`` (Sobolev & Vetrov 2019). Valid with every Pyro ELBO and with
    ``lvmkit.inference.log_likelihood`` (see the module docstring).

    :param x_dim: pixels D.
    :param z_dim: latent dimensions (the model's site ``"z"``).
    :param a_dim: auxiliary dimensions.
    :param hidden: tanh hidden layers of each of the three MLPs.
    :param num_aux_samples: auxiliary draws K for the IWHVI bound.
    :param name: prefix of the parameter names in Pyro's param store.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        a_dim: int,
        hidden: Sequence[int] = (200,),
        num_aux_samples: int = 1,
        *,
        name: str = "aux_encoder",
    ) -> None:
        super().__init__(name)
        self.x_dim = check_size(x_dim, "x_dim")
        self.z_dim = check_size(z_dim, "z_dim")
        self.a_dim = check_size(a_dim, "a_dim")
        self.num_aux_samples = check_size(num_aux_samples, "num_aux_samples")
        hidden = tuple(hidden)
        self.aux_net = mlp(x_dim, hidden, 2 * a_dim)
        self.z_net = mlp(x_dim + a_dim, hidden, 2 * z_dim)
        self.reverse_net = mlp(x_dim + z_dim, hidden, 2 * a_dim)

    def _q_z(self, x: torch.Tensor, a: torch.Tensor) -> dist.Distribution:
        x = x.expand(a.shape[:-1] + x.shape[-1:])
        loc, scale = gaussian_params(self.z_net(torch.cat([x, a], -1)))
        return dist.Normal(loc, scale).to_event(1)

    def _r_a(self, x: torch.Tensor, z: torch.Tensor) -> dist.Distribution:
        x = x.expand(z.shape[:-1] + x.shape[-1:])
        loc, scale = gaussian_params(self.reverse_net(torch.cat([x, z], -1)))
        return dist.Normal(loc, scale).to_event(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_observations(x, site="x", event_shape=(self.x_dim,), support="unit")
        loc, scale = gaussian_params(self.aux_net(x))
        q_a = dist.Normal(loc, scale).to_event(1)
        with pyro.plate("data", x.shape[0]):
            a0 = pyro.sample("a", q_a, infer={"is_auxiliary": True})
            q_z = self._q_z(x, a0)
            z = pyro.sample("z", q_z)
            r = self._r_a(x, z)
            log_q_extra = log_r_extra = None
            if self.num_aux_samples > 1:
                extra = r.rsample((self.num_aux_samples - 1,))
                log_q_extra = q_a.log_prob(extra) + self._q_z(x, extra).log_prob(z)
                log_r_extra = r.log_prob(extra)
            correction = iw_hierarchical_correction(
                q_a.log_prob(a0), q_z.log_prob(z), r.log_prob(a0), log_q_extra, log_r_extra
            )
            reverse_factor("a_reverse", correction, ["a"])
        return z
