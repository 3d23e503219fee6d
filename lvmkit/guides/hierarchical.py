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

With ``K`` reverse draws (Sobolev & Vetrov 2019, "Importance Weighted Hierarchical
Variational Inference"), ``a_0 ~ q(a | x)``, ``z ~ q(z | a_0, x)``, ``a_1..a_K ~
r(a | x, z)``, ``K + 1`` terms::

    log q̂(z) = log 1/(K+1) Σ_{k=0..K} q(a_k | x) q(z | a_k, x) / r(a_k | x, z)
    log p(x) >= E[ log p(x, z) - log q̂(z) ]

``E log q̂(z) >= log q(z|x)`` decreases monotonically to ``log q(z|x)`` as ``K`` grows, so
the bound tightens with ``K``; ``K = 0`` is the auxiliary bound above. Moreover
``E[p(x, z) / q̂(z)] = p(x)`` exactly (the a's are exchangeable under the symmetrised
extended target), so the importance-weighted bound
``E log (1/M) Σ_m p(x, z_m) / q̂(z_m)`` is valid too. :class:`AutoHVM` trains the reverse
model with doubly-reparameterised gradients (:func:`iwhvi_log_q_hat`).

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
    picks a component uniformly (stratified across a batch of draws, see
    :meth:`_stratified_index`), then ``a = loc_k + scale_k ε``. The component's law does not
    depend on the parameters, so the pathwise gradient given ``k`` is unbiased: the site is
    ``has_rsample=True`` and Pyro uses no score-function term for it.

    Example:

    >>> import torch
    >>> from lvmkit.guides.hierarchical import EqualMixtureNormal
    >>> q = EqualMixtureNormal(torch.zeros(3, 2), torch.ones(3, 2))  # 3 components in 2-D
    >>> q.rsample().shape, q.event_shape
    (torch.Size([2]), torch.Size([2]))
    >>> round(float(q.log_prob(torch.zeros(2))), 4)  # log N(0; 0, I) in 2-D
    -1.8379
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
        index = self._stratified_index(shape)
        gather = index[..., None, None].expand(shape + (1,) + self.event_shape)
        locs = self.locs.expand(shape + self.locs.shape[-2:]).gather(-2, gather).squeeze(-2)
        scales = self.scales.expand(shape + self.locs.shape[-2:]).gather(-2, gather).squeeze(-2)
        return locs + scales * torch.randn_like(locs)

    def _stratified_index(self, shape: torch.Size) -> torch.Tensor:
        """Component indices for ``shape`` draws: each is uniform on ``0..K-1`` (so every
        draw is an exact draw of the mixture and any average over draws is unbiased), but
        the draws are stratified (systematic sampling over a random permutation of the
        batch), so that ``n >= K`` draws visit every component ``n // K`` times. With
        vectorized particles that gives every component a pathwise gradient at every step
        instead of about ``n / K`` on average, which is what lets the components find
        their modes in a few hundred steps."""
        n, device = shape.numel(), self.locs.device
        offset = torch.randint(self.num_components, (), device=device)
        index = (torch.arange(n, device=device) + offset) % self.num_components
        return index[torch.randperm(n, device=device)].reshape(shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        per_component = dist.Normal(self.locs, self.scales).log_prob(value.unsqueeze(-2)).sum(-1)
        return torch.logsumexp(per_component, -1) - math.log(self.num_components)


def reverse_factor(name: str, log_correction: torch.Tensor, reverse_for: Sequence[str]) -> None:
    """Record ``log_correction`` as a guide factor that corrects auxiliary sites.

    The site's log probability is ``log_correction``, which every Pyro ELBO *subtracts*; for
    a single auxiliary draw pass ``-log r(a | x, z)``. Equivalent to ``pyro.factor(name,
    log_correction, has_rsample=True)`` plus the ``reverse_for`` mark that
    :func:`check_auxiliary_guide` looks for.

    Example: the factor is an observed guide site whose log density is the correction
    (see :func:`check_auxiliary_guide` for a whole guide).

    >>> import torch
    >>> from pyro import poutine
    >>> from lvmkit.guides.hierarchical import reverse_factor
    >>> def guide():
    ...     reverse_factor("a_reverse", torch.tensor(0.25), ["a"])
    >>> site = poutine.trace(guide).get_trace().nodes["a_reverse"]
    >>> site["infer"]["reverse_for"], site["is_observed"], float(site["fn"].log_prob(site["value"]))
    (('a',), True, 0.25)
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

    ``log q̂(z) = log 1/(K+1) Σ_{k=0..K} q(a_k) q(z | a_k) / r(a_k | z)`` with ``a_0`` the
    draw that generated ``z`` and ``a_1..a_K ~ r(a | z)`` (Sobolev & Vetrov 2019, eq. 7). The
    ``*_extra`` tensors hold ``log q(a_k) + log q(z | a_k)`` and ``log r(a_k | z)`` for the
    extra draws, stacked on dim 0. With none it reduces to ``-log r(a_0 | z)``.

    Example: with no extra draws the correction is ``-log r(a_0)`` plus what cancels.

    >>> import torch
    >>> from lvmkit.guides.hierarchical import iw_hierarchical_correction
    >>> float(iw_hierarchical_correction(torch.tensor(-1.0), torch.tensor(-2.0),
    ...                                  torch.tensor(-0.5)))
    0.5
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

    Example: an auxiliary ``a`` needs a reverse density, written with :func:`reverse_factor`.

    >>> import pyro
    >>> import pyro.distributions as dist
    >>> from lvmkit.guides.hierarchical import check_auxiliary_guide, reverse_factor
    >>> def model():
    ...     pyro.sample("z", dist.Normal(0.0, 1.0))
    >>> def guide():
    ...     a = pyro.sample("a", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True})
    ...     z = pyro.sample("z", dist.Normal(a, 1.0))
    ...     # -log r(a | z), r the exact conditional N(z / 2, 1 / 2)
    ...     reverse_factor("a_reverse", -dist.Normal(z / 2, 0.5 ** 0.5).log_prob(a), ["a"])
    >>> check_auxiliary_guide(model, guide)  # passes: returns None
    >>> def unchecked_guide():
    ...     a = pyro.sample("a", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True})
    ...     pyro.sample("z", dist.Normal(a, 1.0))
    >>> check_auxiliary_guide(model, unchecked_guide)
    Traceback (most recent call last):
    ...
    ValueError: guide site 'a' is not in the model and no reverse density r(a | x, z) corrects it...
    """
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    model_latents = {
        name
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    }
    corrected: set[str] = _joint_latent_names(guide)
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


def _joint_latent_names(guide: Callable) -> set[str]:
    """The joint latent sites of Pyro's ``AutoContinuous`` guides inside ``guide``.

    Such a site is a bijection of the model's latents (its Delta sites carry the
    log-Jacobians), not a random auxiliary variable, so it needs no reverse density.
    """
    from pyro.infer.autoguide import AutoContinuous, AutoGuideList

    if isinstance(guide, AutoContinuous):
        return {f"_{guide._pyro_name}_latent"}
    if isinstance(guide, AutoGuideList):
        return set().union(*(_joint_latent_names(part) for part in guide))
    return set()


_LAPLACE_MAX_DIM = 100
_MODE_REFINE_FACTOR = 4  # refining climbs run this many times mode_search_steps
_NEWTON_STEPS = 8  # from a refined climb to the mode, for its Laplace mass
_NEWTON_TOLERANCE = 1e-5  # a Newton step this short (times init_scale) has converged
# Modes whose Laplace log masses agree to rounding error count as symmetric copies of one
# mode: within _EQUAL_MASSES nats, or _EQUAL_MASSES_ULPS float steps of the largest |log
# mass| where the model's own dtype rounds more coarsely (float32 at thousands of nats:
# exact copies of a 20,000-point float32 model spread by 2.3e-3 nats at |log p| = 28,477).
# On the suite's square targets (exact sign flips, seeds 0-7) the spread is at most 1.2e-5
# nats, while distinct modes of its random mixtures differ by 0.0499 nats (seed 5's
# mixture5d#17) or more. The earlier 0.05 (5%) took that 0.512 / 0.488 mixture for
# symmetric copies and left 6 of its 8 components off both modes.
_EQUAL_MASSES = 1e-3
_EQUAL_MASSES_ULPS = 4


def _allocate_components(log_masses: torch.Tensor, count: int) -> list[int]:
    """How many of ``count`` equal-weight components each mode gets: the integer counts
    ``n_m`` (summing to ``count``) that minimise ``KL(n / count || w)`` with ``w`` the
    normalised masses, the reverse KL of the mixture's mode weights that the ELBO pays.
    The objective is a sum of convex functions of each ``n_m``, so adding components one
    at a time where the KL grows least is exact.

    >>> import math, torch
    >>> _allocate_components(torch.tensor([0.5, 0.3, 0.15, 0.05]).log(), 8)
    [4, 2, 1, 1]
    """
    # in log space: a mode hundreds of nats lighter than another has weight 0 in floats
    log_weights = torch.log_softmax(log_masses.double(), 0).tolist()
    counts = [0] * len(log_weights)

    def cost(n: int, log_w: float) -> float:
        return 0.0 if n == 0 else (n / count) * (math.log(n / count) - log_w)

    for _ in range(count):
        increase = [cost(n + 1, lw) - cost(n, lw)
                    for n, lw in zip(counts, log_weights, strict=True)]
        counts[min(range(len(counts)), key=increase.__getitem__)] += 1
    return counts


def _farthest_first(pool: torch.Tensor, distance: torch.Tensor, count: int) -> list[int]:
    """Indices of ``count`` rows of ``pool`` picked farthest-point first, ``distance``
    being each row's distance to the points already chosen (updated as rows are picked)."""
    picks = []
    for _ in range(count):
        pick = int(distance.argmax())
        picks.append(pick)
        distance = torch.minimum(distance, (pool - pool[pick]).norm(dim=-1))
    return picks


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def iwhvi_log_q_hat(
    log_joint: Callable[[torch.Tensor, bool], torch.Tensor],
    reverse_params: Callable[[torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]],
    a0: torch.Tensor,
    v: torch.Tensor,
    num_samples: int,
    dreg: bool = True,
    log_joint_a0: torch.Tensor | None = None,
) -> torch.Tensor:
    """The IWHVI estimate ``log q̂(v) = log 1/(K+1) Σ_{k=0..K} q(a_k) q(v | a_k) / τ(a_k | v)``
    (Sobolev & Vetrov 2019) with ``a_0`` the draw that generated ``v`` and
    ``a_1..a_K ~ τ(a | v) = N(loc(v), diag scale(v)^2)``.

    Its expectation upper-bounds ``log q(v)`` and decreases monotonically to it as ``K``
    grows; ``K = 0`` gives ``-log τ(a_0 | v) + log q(a_0, v)``, the HVM (Agakov & Barber)
    term.

    Gradients: the value's gradient reaches the parameters of ``q`` (and ``v``) with the
    reverse model's parameters held fixed; the reverse model's parameters get the
    doubly-reparameterised gradient (DReG, Tucker et al. 2019, eq. for IWAE's proposal),
    ``Σ_{k>=1} w̃_k^2 ∂ log w_k / ∂a_k · ∂a_k / ∂φ - w̃_0 ∂ log τ(a_0 | v) / ∂φ`` with
    ``w̃`` the normalised weights: ``a_0`` is not a draw of ``τ``, so its term keeps the
    plain score. Both are unbiased for the gradient of ``E log q̂``; DReG's signal-to-noise
    ratio does not fall as ``K`` grows (Rainforth et al. 2018; Tucker et al. 2019).
    ``dreg=False`` differentiates the value through everything (the IWAE-style gradient).

    :param log_joint: ``(a, detach) -> log q(a) + log q(v | a)`` for ``a`` of shape
        ``(S, ..., A)`` (``v`` broadcast); ``detach=True`` must hold ``q``'s parameters and
        ``v`` fixed.
    :param reverse_params: ``(v, detach) -> (loc, scale)`` of τ; ``detach=True`` holds τ's
        parameters fixed (not ``v``).
    :param a0: the ancestral auxiliary draw, shape ``(..., A)``.
    :param v: the latent draw, shape ``(..., D)``.
    :param num_samples: ``K >= 0``.
    :param dreg: use DReG gradients for τ.
    :param log_joint_a0: ``log_joint(a0, False)`` if the caller has it already.
    """
    if log_joint_a0 is None:
        log_joint_a0 = log_joint(a0.unsqueeze(0), False).squeeze(0)
    if not dreg:
        loc, scale = reverse_params(v, False)
        tau = dist.Normal(loc, scale).to_event(1)
        log_w = (log_joint_a0 - tau.log_prob(a0)).unsqueeze(0)
        if num_samples > 0:
            extra = tau.rsample((num_samples,))
            log_w = torch.cat([log_w, log_joint(extra, False) - tau.log_prob(extra)], 0)
        return torch.logsumexp(log_w, 0) - math.log(num_samples + 1)
    loc, scale = reverse_params(v, True)  # τ's parameters fixed, v live
    tau = dist.Normal(loc, scale).to_event(1)
    log_w = (log_joint_a0 - tau.log_prob(a0)).unsqueeze(0)
    if num_samples > 0:
        noise = torch.randn((num_samples,) + loc.shape, dtype=loc.dtype, device=loc.device)
        extra = loc + scale * noise
        log_w = torch.cat([log_w, log_joint(extra, False) - tau.log_prob(extra)], 0)
    value = torch.logsumexp(log_w, 0) - math.log(num_samples + 1)
    # DReG surrogate: only τ's parameters carry gradient, through the draws' locations
    loc_live, scale_live = reverse_params(v.detach(), False)
    weights = torch.softmax(log_w.detach(), 0)
    surrogate = -weights[0] * dist.Normal(loc_live, scale_live).to_event(1).log_prob(a0.detach())
    if num_samples > 0:
        extra_live = loc_live + scale_live * noise
        log_w_live = log_joint(extra_live, True) - dist.Normal(
            loc.detach(), scale.detach()
        ).to_event(1).log_prob(extra_live)
        surrogate = surrogate + (weights[1:] ** 2 * log_w_live).sum(0)
    return value + (surrogate - surrogate.detach())


class _ResidualGaussian(nn.Module):
    """``N(P (v - v0) + f(v), diag softplus(g(v) + c)^2)`` with ``softplus(c) = init_scale``.

    ``P`` is a fixed zero-padded identity, so at initialisation (``f``'s output layer is
    zero) the map is the identity between the first coordinates of ``v - v0`` and the
    output: ``q(v | a)`` starts as ``a`` plus small noise and ``r(a | v)`` as its inverse,
    so the reverse model is right from the first step.

    ``f, g`` are one tanh MLP whose weights and biases are slices of a single parameter
    tensor: Pyro's optimizers keep one torch optimizer per parameter tensor, and with a
    dozen small tensors their per-step bookkeeping cost more than the arithmetic.
    Initialised as ``nn.Linear`` is (uniform in ``±1/sqrt(fan_in)``), output layer zero.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: Sequence[int], init_scale: float):
        super().__init__()
        sizes = [in_dim, *hidden, 2 * out_dim]
        self._layers = list(zip(sizes[:-1], sizes[1:], strict=True))
        chunks = []
        for i, (fan_in, fan_out) in enumerate(self._layers):
            bound = 0.0 if i == len(self._layers) - 1 else 1 / math.sqrt(fan_in)
            chunks.append(torch.empty(fan_out * fan_in + fan_out).uniform_(-bound, bound))
        self.flat = nn.Parameter(torch.cat(chunks))
        self.register_buffer("projection", torch.eye(out_dim, in_dim))
        self.scale_offset = _inverse_softplus(init_scale)

    def forward(self, v: torch.Tensor, v0: torch.Tensor | float = 0.0, detach: bool = False):
        """``(loc, scale)``; ``detach=True`` holds the parameters fixed (not ``v``)."""
        flat = self.flat.detach() if detach else self.flat
        h, offset = v, 0
        for i, (fan_in, fan_out) in enumerate(self._layers):
            weight = flat[offset : offset + fan_out * fan_in].view(fan_out, fan_in)
            offset += fan_out * fan_in
            h = F.linear(h, weight, flat[offset : offset + fan_out])
            offset += fan_out
            if i < len(self._layers) - 1:
                h = torch.tanh(h)
        loc, raw = h.chunk(2, dim=-1)
        loc = loc + (v - v0) @ self.projection.T
        return loc, F.softplus(raw + self.scale_offset) + MIN_SCALE


class AutoHVM(AutoContinuous):
    """Hierarchical variational model (Ranganath et al. 2016) as a Pyro autoguide, trained
    on the IWHVI bound (Sobolev & Vetrov 2019).

    For a model whose latent sites are continuous, all of them are transformed to
    unconstrained space and concatenated into ``u`` (Pyro's :class:`AutoContinuous`
    machinery: ``biject_to`` of each site's support, Jacobians included). Then

    - ``q(a)``: an equal-weight mixture of ``num_components`` diagonal Gaussians on
      ``R^aux_dim`` (:class:`EqualMixtureNormal`),
    - ``q(v | a) = N(P a + f(a), diag σ(a)^2)``, ``f, σ`` a tanh MLP, ``P`` a fixed
      zero-padded identity,
    - ``u = T(u0 + s ⊙ v)``: ``T`` is ``num_flows`` affine-autoregressive transforms
      (Kingma et al. 2016; Pyro's ``affine_autoregressive``, the layers of
      :class:`~pyro.infer.autoguide.AutoIAFNormal`; identity when ``num_flows=0``) and
      ``u0, log s`` are learned (``s`` starts at ``init_scale``), so ``q(u | a)`` is a
      normalising flow of a Gaussian whose mean depends on ``a``,
    - ``r(a | v) = N(P^T v + g(v), diag ρ(v)^2)``, an MLP reverse model.

    With ``num_components=1`` and ``f = 0`` this is AutoIAFNormal's family
    (``num_flows >= 1``) or AutoDiagonalNormal's (``num_flows=0``) with an auxiliary
    variable; the mixture adds modes and ``f`` curvature. ``log q(u)`` is replaced by the
    IWHVI estimate with ``num_aux_samples = K`` reverse draws plus the ancestral ``a``
    (:func:`iwhvi_log_q_hat`; the flow's Jacobian enters as in any flow), so the objective
    is a lower bound on the ELBO of ``q(u)`` that tightens with ``K``; ``K = 0`` is the
    HVM bound. The reverse model is trained with DReG gradients.

    Guide sites ``_AutoHVM_aux`` (``a``), ``_AutoHVM_latent`` (``u``) and the factor
    ``_AutoHVM_reverse`` are auxiliary; the model's sites are Delta sites as in every
    :class:`AutoContinuous` guide, so ``Predictive`` returns posterior samples of them and
    leaves the auxiliary sites out. Works with ``Trace_ELBO``, ``TraceGraph_ELBO``,
    ``RenyiELBO`` (``alpha=0`` gives the doubly importance-weighted bound) and
    ``TraceEnum_ELBO`` when enumerated discrete model sites are hidden from the guide
    (``AutoHVM(poutine.block(model, hide=[...]))``). Discrete latent sites are refused with
    an error naming them. Latents in a subsampled plate are refused (the guide is global, as
    :class:`~pyro.infer.autoguide.AutoMultivariateNormal`): use
    :class:`~lvmkit.guides.AmortizedAutoHVM` for per-datum latents.

    Defaults (chosen on ``draw_targets(0)`` of :mod:`lvmkit.models.target_suite` and
    evaluated on another seed, ``benchmarks/hierarchical.py --suite``): ``K = 0``; eight
    narrow components (``0.1 s``) started by a search of ``init_search`` model evaluations
    so that they sit in different high-density regions, the best of them climbing to
    their local modes (``mode_search_steps``; the mean log density over a component-sized
    ball is climbed, ``mode_search_smoothing``) so that each distinct mode found gets a
    component, or, for modes of unequal mass, a share of the components that matches
    their Laplace masses, after further climbs started far from the modes found
    (``mode_weighting``); ``u0`` at the best point found; draws of the component index
    stratified across particles.

    Evaluate it with more reverse draws than it trains with: its training bound (``K = 0``)
    is below its ELBO by ``E KL(q(a | z) || r(a | z))``, which on the development suite was
    0.1-2.7 nats (``K = 32`` tightened the bound by that much at no change to ``q``), and
    PSIS diagnostics need ``log q(z)``, for which the IWHVI estimate with large ``K`` is the
    honest input (set ``guide.num_aux_samples = 64`` before calling ``psis_khat``, with
    ``vectorize=True``: the estimate is random given ``z``, so its re-scoring check cannot
    match it). The
    older defaults (components
    at ``2 N(0, I)`` with unit scales around the init point, one uniform component draw
    per particle) let the shared parameters drag every component into one basin in the
    first ~50 steps: measured on the suite, all eight components ended in one or two of a
    target's modes, and the too-wide start cost hundreds of nats that 1500 steps at
    ``lr = 5e-3`` did not recover on curved targets.

    :param model: a Pyro model.
    :param aux_dim: dimension of ``a``; default ``latent_dim``.
    :param num_components: components of the mixture ``q(a)``; ``1`` gives a Gaussian.
    :param hidden: hidden sizes of the ``q(v | a)`` and ``r(a | v)`` MLPs.
    :param init_scale: initial global scale ``s`` of ``u``.
    :param noise_scale: initial standard deviation of ``q(v | a)`` (relative to ``s``).
    :param num_aux_samples: ``K >= 0`` reverse draws for the IWHVI estimate of ``log q(u)``.
    :param reverse: optional callable ``v -> distribution over a`` replacing the MLP; its
        event shape must be ``(aux_dim,)``. Its parameters get the plain (IWAE-style)
        gradient, not DReG, since the guide cannot hold them fixed.
    :param init_loc_fn: per-site initialisation of ``u0``, as in Pyro's autoguides.
    :param component_spread: standard deviation of the initial mixture means (in units of
        ``s``); ``None`` starts them at prior draws instead.
    :param component_scale: initial standard deviation of each component (units of ``s``).
    :param num_flows: affine-autoregressive layers in ``T``.
    :param flow_hidden: hidden sizes of each layer's autoregressive network (default
        ``[3 * latent_dim + 1]``, Pyro's default).
    :param dreg: DReG gradients for the reverse model.
    :param init_search: model evaluations spent at setup choosing ``u0`` and the initial
        component means among prior draws and draws around ``u0``
        (:meth:`_searched_inits`); ``0`` uses ``component_spread`` alone.
    :param mode_search_steps: gradient-ascent steps with which the best
        ``2 · num_components`` searched candidates climb to their local modes
        (:meth:`_distinct_modes`); the distinct modes found seed the components first, the
        farthest-first fill the rest. ``0`` keeps the raw candidates (the 0.2.0 behaviour).
    :param mode_search_smoothing: the climbs maximise the mean log density over a ball
        of ``mode_search_smoothing`` times a component's initial standard deviation (two
        antithetic points) instead of the density itself, so they end where a component
        of that width fits, not down a neck where the density grows without bound;
        ``0`` climbs the density itself (the behaviour before).
    :param mode_weighting: look for more modes with ``num_components`` further climbs
        started far from the modes found (:meth:`_explored_modes`), verify every mode by
        Newton's method, and, when their masses differ, share the equal-weight
        components out among them by their Laplace masses (:meth:`_components_by_mass`):
        a mode holding half the mass gets about half the components instead of one, and a
        very light one may get none. Verified modes of equal mass (to rounding error,
        1e-3 nats: symmetric copies, of which the search usually finds only some) get one
        component each, at the mode, and the spare ones start elsewhere. It does what
        ``False`` does, with the same random draws, where fewer than two modes are
        verified, where one of the search's own modes cannot be verified, with
        ``mode_search_steps=0``, and for more than 100 latent dimensions.
    :param laplace_init: start the global scale ``s`` at the Laplace widths
        ``(-∂² log p / ∂u_i²)^{-1/2}`` at ``u0`` (:meth:`_laplace_scale`) instead of
        ``init_scale``. Off by default: on the development suite it helped Student-t targets
        and hurt the squared-observation ones (components then start far narrower than a
        mode).

    Example: a drop-in for ``AutoNormal`` on a target with four modes.

    >>> import pyro
    >>> from pyro.infer import SVI, Trace_ELBO
    >>> from lvmkit.guides import AutoHVM
    >>> from lvmkit.models.targets import RingOfModes
    >>> target = RingOfModes()
    >>> guide = AutoHVM(target.model)
    >>> elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=0)
    >>> svi = SVI(target.model, guide, pyro.optim.Adam({"lr": 5e-3}), elbo)
    >>> losses = [svi.step() for _ in range(5)]
    >>> guide().keys()
    dict_keys(['z'])
    """

    def __init__(
        self,
        model: Callable,
        aux_dim: int | None = None,
        num_components: int = 8,
        hidden: Sequence[int] = (64, 64),
        init_scale: float = 1.0,
        num_aux_samples: int = 0,
        reverse: Callable[[torch.Tensor], dist.Distribution] | None = None,
        init_loc_fn: Callable = init_to_median,
        component_spread: float | None = 1.0,
        component_scale: float = 0.1,
        noise_scale: float = 0.1,
        num_flows: int = 0,
        flow_hidden: Sequence[int] | None = None,
        dreg: bool = True,
        init_search: int = 256,
        laplace_init: bool = False,
        mode_search_steps: int = 40,
        mode_search_smoothing: float = 1.0,
        mode_weighting: bool = True,
    ) -> None:
        if aux_dim is not None:
            check_size(aux_dim, "aux_dim")
        check_size(num_components, "num_components")
        _check_count(num_aux_samples, "num_aux_samples")
        _check_count(num_flows, "num_flows")
        for value, what in [
            (init_scale, "init_scale"),
            (noise_scale, "noise_scale"),
            (component_scale, "component_scale"),
        ]:
            if not value > 0:
                raise ValueError(f"{what} must be positive, got {value}")
        if component_spread is not None and not component_spread >= 0:
            raise ValueError(f"component_spread must be >= 0 or None, got {component_spread}")
        super().__init__(model, init_loc_fn=init_loc_fn)
        self._aux_dim_arg = aux_dim
        self.num_components = num_components
        self.hidden = tuple(check_size(h, "hidden layer size") for h in hidden)
        self._init_scale = float(init_scale)
        self._noise_scale = float(noise_scale)
        self._component_scale = float(component_scale)
        self.num_aux_samples = num_aux_samples
        self._custom_reverse = reverse
        self.component_spread = component_spread
        self.num_flows = num_flows
        self.flow_hidden = (
            None
            if flow_hidden is None
            else [check_size(h, "flow hidden size") for h in flow_hidden]
        )
        self.dreg = bool(dreg)
        self.init_search = _check_count(init_search, "init_search")
        self.laplace_init = bool(laplace_init)
        self.mode_search_steps = _check_count(mode_search_steps, "mode_search_steps")
        if not (isinstance(mode_search_smoothing, int | float)
                and math.isfinite(mode_search_smoothing) and mode_search_smoothing >= 0):
            raise ValueError(
                f"mode_search_smoothing must be a number >= 0, got {mode_search_smoothing!r}")
        self.mode_search_smoothing = float(mode_search_smoothing)
        self.mode_weighting = bool(mode_weighting)
        # a tuple, so that a PyroModule model is not registered as a submodule of the guide
        self._original_model = (model,)

    def _setup_prototype(self, *args, **kwargs) -> None:
        try:
            super()._setup_prototype(*args, **kwargs)
        except ValueError as error:
            # Pyro's own message names the site; say which guide refused it.
            raise ValueError(f"AutoHVM: {error}") from None
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            # u's entries follow the plate's positions, not the data (Pyro trains it silently)
            subsampled = [
                f.name for f in site["cond_indep_stack"] if f.full_size not in (None, f.size)
            ]
            if subsampled:
                raise ValueError(
                    f"AutoHVM: latent site {name!r} is in the subsampled plate "
                    f"{subsampled[0]!r}; AutoHVM is a global guide (one vector for all "
                    "latents): use lvmkit.guides.AmortizedAutoHVM for per-datum latents"
                )
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            if site["fn"].support.is_discrete:
                raise ValueError(
                    f"AutoHVM: latent site {name!r} is discrete ({site['fn'].support}); "
                    "enumerate it in the model and hide it from the guide"
                )
        self.aux_dim = self._aux_dim_arg or self.latent_dim
        dim, aux = self.latent_dim, self.aux_dim
        init_loc = self._init_loc()
        # A mode-seeking objective rarely moves a component from one basin to another, so
        # the components must start in different basins to find several modes.
        if self.init_search:
            init_loc, aux_locs = self._searched_inits(init_loc, *args, **kwargs)
        else:
            aux_locs = self._component_inits(init_loc, *args, **kwargs)
        scale0 = torch.full_like(init_loc, self._init_scale)
        if self.laplace_init:
            scale0 = self._laplace_scale(init_loc, *args, **kwargs)
            # the component means were found in units of init_scale; keep their positions
            width = min(self.aux_dim, self.latent_dim)
            aux_locs[:, :width] = aux_locs[:, :width] * self._init_scale / scale0[:width]
        self.loc0 = nn.Parameter(init_loc)
        self.log_scale0 = nn.Parameter(scale0.log())
        self.aux_locs = nn.Parameter(aux_locs)
        self.aux_log_scales = nn.Parameter(
            torch.full((self.num_components, aux), math.log(self._component_scale))
        )
        self.forward_net = _ResidualGaussian(aux, dim, self.hidden, self._noise_scale)
        if self._custom_reverse is None:
            self.reverse_net = _ResidualGaussian(dim, aux, self.hidden, self._noise_scale)
        if self.num_flows:
            from pyro.distributions.transforms import affine_autoregressive

            self.flows = nn.ModuleList(
                affine_autoregressive(dim, hidden_dims=self.flow_hidden)
                for _ in range(self.num_flows)
            )
            # each flow starts as the identity (zero output layer: shift 0, log-scale 0), so
            # the guide starts where num_flows=0 does instead of at a random warp
            with torch.no_grad():
                for flow in self.flows:
                    flow.arn.layers[-1].weight.zero_()
                    flow.arn.layers[-1].bias.zero_()
        for p in self.parameters():
            p.data = p.data.to(init_loc)

    def _laplace_scale(self, u0: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``1 / sqrt(-∂² log p / ∂u_i²)`` at ``u0``: the mean-field (reverse-KL) optimal
        standard deviations of a Gaussian posterior, and the local widths of any smooth one,
        so that ``q`` starts as wide as the posterior around ``u0`` instead of at a fixed
        ``init_scale`` that Adam then needs hundreds of steps to grow or shrink (log-scales
        move about ``lr`` per step). Coordinates with non-positive or non-finite curvature
        (``u0`` not at a mode, or a model autograd cannot differentiate twice) keep
        ``init_scale``; the result is clipped to ``[1e-3, 10] · init_scale``. Models with
        more than ``_LAPLACE_MAX_DIM`` latent dimensions skip it (the exact Hessian costs
        ``D`` backward passes)."""
        fallback = torch.full_like(u0, self._init_scale)
        if self.latent_dim > _LAPLACE_MAX_DIM:
            return fallback
        try:
            hessian = torch.autograd.functional.hessian(
                lambda u: self._log_joint_tensor(u, *args, **kwargs), u0.detach().clone()
            )
        except (ValueError, RuntimeError, NotImplementedError):
            return fallback
        curvature = -hessian.diagonal().detach()
        good = torch.isfinite(curvature) & (curvature > 0)
        scale = torch.where(good, curvature.clamp(min=1e-30).rsqrt(), fallback)
        return scale.clamp(1e-3 * self._init_scale, 10 * self._init_scale)

    def _log_joint_at(self, u: torch.Tensor, *args, **kwargs) -> float:
        """``log p(x, z(u)) + log|det dz/du|`` for one unconstrained latent vector ``u``."""
        return float(self._log_joint_tensor(u, *args, **kwargs))

    def _log_joint_tensor(self, u: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """:meth:`_log_joint_at` as a differentiable tensor."""
        values, log_det = {}, 0.0
        for site, unconstrained in self._unpack_latent(u):
            transform = biject_to(site["fn"].support)
            value = transform(unconstrained)
            values[site["name"]] = value
            log_det = log_det + transform.log_abs_det_jacobian(unconstrained, value).sum()
        conditioned = poutine.condition(self._original_model[0], values)
        trace = poutine.block(poutine.trace(conditioned).get_trace)(*args, **kwargs)
        return trace.log_prob_sum() + log_det

    def _searched_inits(self, init_loc: torch.Tensor, *args, **kwargs):
        """``(u0, component means)`` from a search: ``init_search`` candidates (half prior
        draws, half ``u0 + c · component_spread · s · N(0, I)`` for ``c`` in 0.5, 1, 2, 4)
        are scored by the model's joint
        density; ``u0`` becomes the best, and the components the best ``num_components``
        of the top ``4 · num_components`` chosen farthest-point first, so that they start
        in different high-density regions instead of wherever ``N(0, I)`` puts them (the
        old defaults' mixtures collapsed onto one mode of a multimodal target). The best
        candidates climb to their modes first (:meth:`_distinct_modes`), and with
        ``mode_weighting`` the modes are verified and weighed
        (:meth:`_components_by_mass`)."""
        with torch.no_grad():
            half = self.init_search // 2
            prior = self._component_inits(init_loc, *args, _count=half, _raw=True, **kwargs)
            spread = 2.0 if self.component_spread is None else self.component_spread
            # several radii: the posterior's scale is unknown, and a mode at distance r is
            # only reached by draws of about that radius
            count = self.init_search - half
            radii = (
                spread
                * self._init_scale
                * torch.tensor([0.5, 1.0, 2.0, 4.0]).repeat(count // 4 + 1)[:count]
            )
            local = init_loc + radii.unsqueeze(-1).to(init_loc) * torch.randn(
                count, self.latent_dim
            ).to(init_loc)
            candidates = torch.cat([init_loc.unsqueeze(0), prior + init_loc, local])
            scores = []
            for u in candidates:
                try:
                    scores.append(self._log_joint_at(u, *args, **kwargs))
                except (ValueError, RuntimeError):
                    scores.append(-math.inf)  # e.g. outside a support the model checks
            scores = torch.tensor(scores)
            scores = torch.where(torch.isfinite(scores), scores, torch.tensor(-math.inf))
            if not bool(torch.isfinite(scores).any()):
                return init_loc, self._component_inits(init_loc, *args, **kwargs)
            top = candidates[scores.argsort(descending=True)[: 4 * self.num_components]]
            modes = self._distinct_modes(top[: 2 * self.num_components], *args, **kwargs)
            best = top[0]
            placement = None
            if self.mode_weighting and len(modes):
                # its own torch random stream: where it declines, the rest of the setup
                # draws exactly what it drew without it (Python's and NumPy's generators
                # are not forked; the search draws from torch's only)
                devices = [init_loc.device] if init_loc.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    explored = self._explored_modes(modes, candidates, scores, *args,
                                                    **kwargs)
                    placement = self._components_by_mass(explored, *args,
                                                         required=len(modes), **kwargs)
            points, weighted = placement if placement is not None else (modes, False)
            if weighted:
                starts = points
            else:
                # one component per mode (verified ones where the weighting found modes of
                # equal mass), then the farthest-first fill from the raw candidates
                pool = torch.cat([points, top]) if len(points) else top
                chosen = list(range(min(len(points), self.num_components))) or [0]
                distance = torch.stack([(pool - pool[i]).norm(dim=-1) for i in chosen]).amin(0)
                chosen += _farthest_first(pool, distance, self.num_components - len(chosen))
                starts = pool[chosen]
            means = (starts - best) / self._init_scale
        aux = torch.zeros(self.num_components, self.aux_dim).to(init_loc)
        width = min(self.aux_dim, self.latent_dim)
        aux[:, :width] = means[:, :width]
        return best.clone(), aux

    def _distinct_modes(self, points: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Local maxima of the joint density near ``points`` (best first), one per basin:
        each point climbs ``mode_search_steps`` Adam steps of size ``0.1 · init_scale``, and
        a climbed point counts as a new mode when it is farther than ``0.5 · init_scale``
        from every mode kept so far. A point whose density cannot be differentiated, or
        climbs to a non-finite value, is dropped. Shape ``(M, D)``, ``M`` possibly 0.

        A density that grows without bound (the neck of centered eight schools as
        ``tau -> 0``) has no mode, and climbs of the density itself end wherever Adam's
        jitter balances the pull: components started there cost eight schools about 2
        nats (seeds 0 and 2). So each climb maximises ``E log p(u + w e)`` over the
        antithetic pair ``e, -e``, ``e ~ N(0, I)`` drawn once per climb, with ``w`` a
        component's initial standard deviation times ``mode_search_smoothing``: the
        location where a component of that width has the best expected log density,
        which is bounded where the density is not (development seeds 0 and 2, 600 steps:
        eight schools ELBO -39.16 -> -37.03 and -39.65 -> -36.51, AutoNormal -38.19; the
        random suites' medians 0.310 -> 0.292 and 0.268 -> 0.264). Rejecting climbs
        still moving over their last steps was tried before and dropped: with a fixed
        step, Adam's jitter at a true mode in 7-10 dimensions moves as much, and the check
        discarded real modes (development seed 0: mixture7d 0.46 -> 0.89, gaussian10d
        1.04 -> 3.31)."""
        if not self.mode_search_steps:
            return points[:0]
        climbed, scores = [], []
        for point in points:
            result = self._climb(point, self.mode_search_steps, *args, **kwargs)
            if result is not None:
                climbed.append(result[0])
                scores.append(result[1])
        modes: list[torch.Tensor] = []
        for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
            if self._is_new_mode(climbed[i], modes):
                modes.append(climbed[i])
        return torch.stack(modes) if modes else points[:0]

    def _is_new_mode(self, point: torch.Tensor, modes: list[torch.Tensor]) -> bool:
        """Whether ``point`` is farther than ``0.5 · init_scale`` from every one of
        ``modes``: the one test of "another mode" for the search and the weighting."""
        return all(float((point - m).norm()) > 0.5 * self._init_scale for m in modes)

    def _climb(self, point: torch.Tensor, steps: int, *args, anneal: bool = False,
               **kwargs) -> tuple[torch.Tensor, float] | None:
        """``(end point, smoothed log density there)`` of ``steps`` Adam steps of size
        ``0.1 · init_scale`` up the smoothed density from ``point`` (see
        :meth:`_distinct_modes`); ``None`` if the density cannot be differentiated there
        or climbs to a non-finite value. With ``anneal`` the step size falls linearly to
        zero, so that the climb ends at the maximum rather than within Adam's jitter of
        it (about one step size)."""
        width = self.mode_search_smoothing * self._component_scale * self._init_scale
        u = point.detach().clone().requires_grad_(True)
        optim = torch.optim.Adam([u], lr=0.1 * self._init_scale)
        # fixed draws: each climb maximises E log p(u + w e) over a ball of a
        # component's initial width w, bounded where the density itself is not
        if width > 0:
            shift = width * torch.randn(self.latent_dim).to(point)
            shifts = torch.stack([shift, -shift])  # antithetic: no first-order noise
        else:
            shifts = point[:0]
        try:
            for step in range(steps):
                if anneal:
                    optim.param_groups[0]["lr"] = 0.1 * self._init_scale * (1 - step / steps)
                optim.zero_grad()
                with torch.enable_grad():  # the search runs under no_grad
                    loss = -self._smoothed_log_joint(u, shifts, *args, **kwargs)
                if not torch.isfinite(loss):
                    raise ValueError("non-finite density")
                loss.backward()
                optim.step()
            score = float(self._smoothed_log_joint(u.detach(), shifts, *args,
                                                   **kwargs).detach())
        except (ValueError, RuntimeError, NotImplementedError):
            return None
        return (u.detach(), score) if math.isfinite(score) else None

    def _explored_modes(self, modes: torch.Tensor, candidates: torch.Tensor,
                        scores: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``modes`` and those found by ``num_components`` further climbs, started from
        the searched candidates in the better half by density that lie farthest from every
        mode found so far (farthest-first): the density-ranked climbs all start in the
        basins of the broadest modes, and a narrow mode's basin holds few candidates."""
        finite = torch.isfinite(scores)
        pool = candidates[finite][scores[finite] >= scores[finite].median()]
        picks = _farthest_first(pool, torch.cdist(pool, modes).amin(-1),
                                min(self.num_components, len(pool)))
        found = self._distinct_modes(pool[picks], *args, **kwargs)
        return torch.cat([modes, found]) if len(found) else modes

    def _components_by_mass(self, modes: torch.Tensor, *args, required: int | None = None,
                            **kwargs) -> tuple[torch.Tensor, bool] | None:
        """Where the components start, from the modes found. Each mode is climbed further
        (annealed steps) and then reached exactly by Newton's method on the log joint;
        its mass is estimated by Laplace's method
        (``p(m) (2π)^{D/2} det(-∇² log p(m))^{-1/2}``, :meth:`_laplace_log_mass`); and
        the ``num_components`` equal components are shared out among the modes by the
        integer counts whose mode weights are closest to the masses in the reverse KL
        that the ELBO minimises (:func:`_allocate_components`): a heavy mode gets several
        components and a light one may get none. Without this every mode found got one
        component, so a mode holding half the mass got 1/8 of ``q``.

        Returns ``(the num_components starting points, True)``; or ``(the verified modes,
        False)`` when all their masses agree to rounding error (``_EQUAL_MASSES``, 1e-3
        nats, or a few float steps of the model's dtype at large ``|log p|``: symmetric
        copies of one mode, of which the search finds only some), and the caller gives
        each one component and places the spare ones farthest-first among the search's
        candidates, where they find further copies while training; or ``None`` (the
        caller does the same with the modes of the climbs it had) where fewer than two
        distinct modes remain once converged, wherever one of the first ``required`` modes
        (the search's own; default all) cannot be verified: Newton's method does not
        converge, a Hessian is not negative definite (no mode there, e.g. a funnel's
        neck), the density cannot be differentiated twice; or where the model has more
        than ``_LAPLACE_MAX_DIM`` latent dimensions. An unverified mode after the first
        ``required`` (an exploring climb's, :meth:`_explored_modes`) is left out."""
        if self.latent_dim > _LAPLACE_MAX_DIM:
            return None
        refined: list[torch.Tensor] = []
        log_masses: list[float] = []
        required = len(modes) if required is None else required
        for i, mode in enumerate(modes):
            result = self._climb(mode, _MODE_REFINE_FACTOR * self.mode_search_steps,
                                 *args, anneal=True, **kwargs)
            laplace = None if result is None else self._laplace_log_mass(result[0], *args,
                                                                         **kwargs)
            if laplace is None:
                if i < required:
                    return None
                continue  # an exploring climb that ended off any mode
            u, log_mass = laplace
            if not self._is_new_mode(u, refined):
                continue  # two climbs of one mode, met once converged
            refined.append(u)
            log_masses.append(log_mass)
        if len(refined) < 2:
            return None
        rounding = _EQUAL_MASSES_ULPS * torch.finfo(modes.dtype).eps * max(map(abs, log_masses))
        if max(log_masses) - min(log_masses) < max(_EQUAL_MASSES, rounding):
            # Equal masses mean symmetric copies of one mode (sign flips, relabellings),
            # of which the search usually found only some: one component each weights
            # them right, and the spare components find more copies while training.
            return torch.stack(refined), False
        counts = _allocate_components(torch.tensor(log_masses, dtype=torch.float64),
                                      self.num_components)
        points = torch.cat([m.expand(n, -1) for m, n in zip(refined, counts, strict=True)
                            if n > 0])
        return points, True

    def _laplace_log_mass(self, u: torch.Tensor, *args, **kwargs
                          ) -> tuple[torch.Tensor, float] | None:
        """``(m, log p(m) + (D/2) log 2π - (1/2) log det(-H))``: ``m`` the mode of the log
        joint that Newton's method reaches from ``u`` (the smoothed climbs end near a mode,
        not at it, by an amount that depends on their random smoothing draws), ``H`` the
        Hessian there. ``None`` unless Newton's method converges within
        ``_NEWTON_STEPS`` steps, none lowering the density, with ``-H`` positive definite
        and everything finite on the way: only verified modes get a mass."""
        u = u.detach().clone()
        local = self._newton_step(u, *args, **kwargs)
        for iteration in range(_NEWTON_STEPS):
            if local is None:
                return None
            log_p, step, log_det = local
            if float(step.norm()) < _NEWTON_TOLERANCE * self._init_scale:
                mass = log_p + 0.5 * self.latent_dim * math.log(2 * math.pi) - 0.5 * log_det
                return u, mass
            if iteration == _NEWTON_STEPS - 1:
                return None  # not converged
            u = u + step.to(u)
            local = self._newton_step(u, *args, **kwargs)
            # near the mode the gain is below float32's resolution of log p: allow for it
            if local is not None and not local[0] >= log_p - 1e-5 * max(1.0, abs(log_p)):
                return None  # outside Newton's basin: not verified as a mode
        return None

    def _newton_step(self, u: torch.Tensor, *args, **kwargs
                     ) -> tuple[float, torch.Tensor, float] | None:
        """``(log p(u), Newton step (-H)^{-1} ∇ log p(u), log det(-H))`` at ``u``: the model
        evaluates ``log p``, its gradient and Hessian in its own dtype, and the linear
        algebra runs in float64; ``None`` where ``-H`` is not positive definite or anything
        is not finite."""
        def log_joint(v):
            return self._log_joint_tensor(v, *args, **kwargs)

        try:
            with torch.enable_grad():  # the search runs under no_grad
                point = u.detach().requires_grad_()
                value = log_joint(point)
                (gradient,) = torch.autograd.grad(value, point)
            log_p, gradient = float(value.detach()), gradient.double()
            hessian = torch.autograd.functional.hessian(log_joint, u).detach().double()
        except (ValueError, RuntimeError, NotImplementedError):
            return None
        precision = -(hessian + hessian.T) / 2
        if not (math.isfinite(log_p) and bool(torch.isfinite(gradient).all())
                and bool(torch.isfinite(precision).all())):
            return None
        cholesky, info = torch.linalg.cholesky_ex(precision)
        if int(info) != 0:
            return None
        step = torch.cholesky_solve(gradient.unsqueeze(-1), cholesky).squeeze(-1)
        return log_p, step, 2 * float(cholesky.diagonal().log().sum())

    def _smoothed_log_joint(self, u: torch.Tensor, shifts: torch.Tensor, *args, **kwargs):
        """The mean of :meth:`_log_joint_tensor` at ``u + shift`` over the rows of
        ``shifts``; the density at ``u`` itself when there are none."""
        if not len(shifts):
            return self._log_joint_tensor(u, *args, **kwargs)
        return torch.stack([self._log_joint_tensor(u + e, *args, **kwargs)
                            for e in shifts]).mean()

    def _component_inits(
        self, init_loc: torch.Tensor, *args, _count: int | None = None, _raw: bool = False, **kwargs
    ) -> torch.Tensor:
        """Initial mixture means: ``component_spread · N(0, I)``, or (``None``) prior draws
        of ``(u - u0) / s`` on ``a``'s first coordinates."""
        if self.component_spread is not None and not _raw:
            spread = self.component_spread * torch.randn(self.num_components, self.aux_dim)
            return spread.to(init_loc)
        hidden_model = poutine.block(self._original_model[0], self._prototype_hide_fn)
        draws = []
        for _ in range(self.num_components if _count is None else _count):
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
            draws.append(draw if _raw else draw / self._init_scale)
        draws = torch.stack(draws)
        if _raw:
            return draws
        aux = torch.zeros(self.num_components, self.aux_dim).to(init_loc)
        width = min(self.aux_dim, self.latent_dim)
        aux[:, :width] = draws[:, :width]
        return aux

    def aux_prior(self, detach: bool = False) -> EqualMixtureNormal:
        """q(a)."""
        locs, log_scales = self.aux_locs, self.aux_log_scales
        if detach:
            locs, log_scales = locs.detach(), log_scales.detach()
        return EqualMixtureNormal(locs, log_scales.exp() + MIN_SCALE)

    def conditional(self, a: torch.Tensor, detach: bool = False) -> dist.Distribution:
        """q(v | a), the Gaussian before the global affine map and the flows."""
        loc, scale = self.forward_net(a, detach=detach)
        return dist.Normal(loc, scale).to_event(1)

    def transform(self) -> dist.transforms.Transform:
        """``T``: ``v -> flows(u0 + s ⊙ v)``."""
        affine = dist.transforms.AffineTransform(self.loc0, self.log_scale0.exp(), event_dim=1)
        if not self.num_flows:
            return affine
        # the affine map first: inverting u then walks back through each flow's cache
        return dist.transforms.ComposeTransform([affine, *self.flows])

    def _reverse_params(self, v: torch.Tensor, detach: bool):
        return self.reverse_net(v, detach=detach)

    def reverse(self, v: torch.Tensor) -> dist.Distribution:
        """r(a | v)."""
        if self._custom_reverse is not None:
            r = self._custom_reverse(v)
        else:
            loc, scale = self.reverse_net(v)
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

    def log_correction(
        self,
        a0: torch.Tensor,
        v: torch.Tensor,
        log_q_a0: torch.Tensor | None,
        log_q_v: torch.Tensor | None,
        num_aux_samples: int | None = None,
    ) -> torch.Tensor:
        """``log q̂(v) - log q(a0) - log q(v | a0)``: the reverse factor's log density, with
        ``log q̂`` the IWHVI estimate (:func:`iwhvi_log_q_hat`) from ``num_aux_samples``
        reverse draws (default: the guide's)."""
        K = self.num_aux_samples if num_aux_samples is None else num_aux_samples
        if K == 0 and self._custom_reverse is None:
            # log q̂ - log q(a0, v) = -log r(a0 | v) exactly, and DReG's gradient for r is
            # the plain one here (w̃_0 = 1): no need for the two-pass surrogate
            loc, scale = self.reverse_net(v)
            return -dist.Normal(loc, scale).to_event(1).log_prob(a0)
        if log_q_a0 is None or log_q_v is None:
            log_q_a0 = self.aux_prior().log_prob(a0)
            log_q_v = self.conditional(a0).log_prob(v)
        log_joint_a0 = log_q_a0 + log_q_v

        def log_joint(a: torch.Tensor, detach: bool) -> torch.Tensor:
            v_ = v.detach() if detach else v
            return self.aux_prior(detach).log_prob(a) + self.conditional(a, detach).log_prob(v_)

        if self._custom_reverse is not None:
            r = self.reverse(v)
            if K == 0:  # the plain auxiliary bound: the ancestral term alone
                return -r.log_prob(a0)
            extra = r.rsample((K,))
            log_w = torch.cat(
                [
                    (log_joint_a0 - r.log_prob(a0)).unsqueeze(0),
                    log_joint(extra, False) - r.log_prob(extra),
                ],
                0,
            )
            return torch.logsumexp(log_w, 0) - math.log(K + 1) - log_joint_a0
        log_q_hat = iwhvi_log_q_hat(
            log_joint, self._reverse_params, a0, v, K, dreg=self.dreg, log_joint_a0=log_joint_a0
        )
        return log_q_hat - log_joint_a0

    def sample_latent(self, *args, **kwargs) -> torch.Tensor:
        prefix = f"_{self._pyro_name}"
        q_a = self.aux_prior()
        a0 = pyro.sample(f"{prefix}_aux", q_a, infer={"is_auxiliary": True})
        q_v = self.conditional(a0)
        q_u = dist.TransformedDistribution(q_v, self.transform())
        u = pyro.sample(f"{prefix}_latent", q_u, infer={"is_auxiliary": True})
        v = q_u.transforms[0].inv(u)  # the flows' cache holds the v that generated u
        # log q(u | a0) = log q(v | a0) - log|det T'(v)| and log q̂(u) likewise: the
        # Jacobian cancels in the correction log q̂(u) - log q(a0) - log q(u | a0)
        if self.num_aux_samples == 0 and self._custom_reverse is None:
            correction = self.log_correction(a0, v, None, None)  # needs neither density
        else:
            correction = self.log_correction(a0, v, q_a.log_prob(a0), q_v.log_prob(v))
        reverse_factor(f"{prefix}_reverse", correction, [f"{prefix}_aux"])
        return u

    def _loc_scale(self, *args, **kwargs):
        # Moments of q(u) by Monte Carlo: the marginal has no closed form.
        with torch.no_grad():
            a = self.aux_prior().sample((1000,))
            u = self.transform()(self.conditional(a).sample())
        return u.mean(0), u.std(0)


def _check_count(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def _context_mlp(
    net: nn.Sequential, context: torch.Tensor, y: torch.Tensor, detach: bool = False
) -> torch.Tensor:
    """``net(cat([x, y], -1))`` given ``context = x @ W_x^T``, the first layer's product
    with the ``x`` columns, computed once for all the draws ``y`` (shape ``(S, B, d)``, ``x``
    broadcast): the same values without repeating the ``D``-wide product for every draw.
    ``detach=True`` holds the net's parameters fixed (not ``y``)."""
    layers = list(net)
    first = layers[0]
    weight, bias = first.weight, first.bias
    if detach:
        weight, bias, context = weight.detach(), bias.detach(), context.detach()
    h = context + F.linear(y, weight[:, weight.shape[1] - y.shape[-1]:], bias)
    for layer in layers[1:]:
        if detach and isinstance(layer, nn.Linear):
            h = F.linear(h, layer.weight.detach(), layer.bias.detach())
        else:
            h = layer(h)
    return h


class AuxiliaryEncoder(PyroModule):
    """Amortized hierarchical guide for a model with latent site ``"z"`` (e.g. ``VAE``).

    ``q(a | x) q(z | a, x)`` with reverse model ``r(a | x, z)``, all diagonal Gaussians with
    tanh-MLP parameters (the auxiliary VAE of Maaløe et al. 2016 without labels; Salimans et
    al. 2015). Sites, inside ``pyro.plate("data", N)``: ``"a"`` (auxiliary), ``"z"``, and
    the factor ``"a_reverse"``. ``num_aux_samples=K > 0`` uses the IWHVI estimate of
    ``log q(z | x)`` with ``K`` reverse draws plus the ancestral ``a`` (Sobolev & Vetrov
    2019); ``K = 0`` is the auxiliary (HVM) bound. Valid with every Pyro ELBO and with
    ``lvmkit.inference.log_likelihood`` (see the module docstring).

    :param x_dim: pixels D.
    :param z_dim: latent dimensions (the model's site ``"z"``).
    :param a_dim: auxiliary dimensions.
    :param hidden: tanh hidden layers of each of the three MLPs.
    :param num_aux_samples: reverse draws K for the IWHVI bound.
    :param dreg: with ``K > 0``, train the reverse model with doubly-reparameterised
        gradients (:func:`iwhvi_log_q_hat`); ``False`` differentiates the IWHVI estimate
        through everything (the IWAE-style gradient, whose signal-to-noise ratio for the
        reverse model falls as ``K`` grows).
    :param name: prefix of the parameter names in Pyro's param store.

    Example:

    >>> import torch
    >>> from lvmkit.guides import AuxiliaryEncoder
    >>> from lvmkit.inference import fit, log_likelihood
    >>> from lvmkit.models import VAE
    >>> x = torch.bernoulli(torch.full((30, 16), 0.3))
    >>> model = VAE(16, z_dim=2, hidden=(8,))
    >>> guide = AuxiliaryEncoder(16, z_dim=2, a_dim=2, hidden=(8,))
    >>> history = fit(model, guide, x, steps=5, batch_size=10, progress=False)
    >>> log_likelihood(model, guide, x[:4], num_samples=10).shape
    torch.Size([4])
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        a_dim: int,
        hidden: Sequence[int] = (200,),
        num_aux_samples: int = 0,
        *,
        dreg: bool = True,
        name: str = "aux_encoder",
    ) -> None:
        super().__init__(name)
        self.x_dim = check_size(x_dim, "x_dim")
        self.z_dim = check_size(z_dim, "z_dim")
        self.a_dim = check_size(a_dim, "a_dim")
        self.num_aux_samples = _check_count(num_aux_samples, "num_aux_samples")
        self.dreg = bool(dreg)
        hidden = tuple(hidden)
        self.aux_net = mlp(x_dim, hidden, 2 * a_dim)
        self.z_net = mlp(x_dim + a_dim, hidden, 2 * z_dim)
        self.reverse_net = mlp(x_dim + z_dim, hidden, 2 * a_dim)

    def _q_z(self, context: torch.Tensor, a: torch.Tensor, detach: bool = False
             ) -> dist.Distribution:
        """q(z | a, x); ``context`` is the first layer's product with ``x``."""
        loc, scale = gaussian_params(_context_mlp(self.z_net, context, a, detach))
        return dist.Normal(loc, scale).to_event(1)

    def _r_params(self, context: torch.Tensor, z: torch.Tensor, detach: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of r(a | x, z); ``context`` as for :meth:`_q_z`."""
        return gaussian_params(_context_mlp(self.reverse_net, context, z, detach))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_observations(x, site="x", event_shape=(self.x_dim,), support="unit")
        loc, scale = gaussian_params(self.aux_net(x))
        q_a = dist.Normal(loc, scale).to_event(1)
        # the x columns of the first layers, once per datum rather than once per draw
        z_context = F.linear(x, self.z_net[0].weight[:, : self.x_dim])
        r_context = F.linear(x, self.reverse_net[0].weight[:, : self.x_dim])
        with pyro.plate("data", x.shape[0]):
            a0 = pyro.sample("a", q_a, infer={"is_auxiliary": True})
            q_z = self._q_z(z_context, a0)
            z = pyro.sample("z", q_z)
            if self.num_aux_samples == 0:
                # the HVM bound: log q̂ - log q(a0, z) = -log r(a0 | x, z)
                r_loc, r_scale = self._r_params(r_context, z)
                correction = -dist.Normal(r_loc, r_scale).to_event(1).log_prob(a0)
            else:
                log_joint_a0 = q_a.log_prob(a0) + q_z.log_prob(z)

                def log_joint(a: torch.Tensor, detach: bool) -> torch.Tensor:
                    q = dist.Normal(loc.detach(), scale.detach()) if detach else dist.Normal(
                        loc, scale)
                    z_ = z.detach() if detach else z
                    return q.to_event(1).log_prob(a) + self._q_z(z_context, a, detach).log_prob(z_)

                def reverse_params(z_: torch.Tensor, detach: bool):
                    return self._r_params(r_context, z_, detach)

                # K reverse draws plus a0, DReG gradients for r (Sobolev & Vetrov 2019)
                log_q_hat = iwhvi_log_q_hat(
                    log_joint, reverse_params, a0, z, self.num_aux_samples,
                    dreg=self.dreg, log_joint_a0=log_joint_a0,
                )
                correction = log_q_hat - log_joint_a0
            reverse_factor("a_reverse", correction, ["a"])
        return z
