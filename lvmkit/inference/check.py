"""Exact ELBO gradients by enumeration, and a z-test of a gradient estimator against them.

The ELBO of a guide with discrete latents ``z`` (and possibly reparameterized continuous
latents ``e = g(eps)``) is

.. math::

    \\mathcal{L}(\\phi, \\theta) = \\mathbb{E}_{\\epsilon}\\Big[\\sum_{z} q_\\phi(z \\mid e, x)
        \\big(\\log p_\\theta(x, z, e) - \\log q_\\phi(z, e \\mid x)\\big)\\Big].

The sum over every joint configuration of every element of every discrete guide site is
computed exactly and differentiated with autograd; the expectation over continuous noise
(when there is any) is a Monte-Carlo average with common random numbers across
configurations, whose standard error is reported and added to the z-test's.

An unbiased estimator ``g`` of :math:`-\\nabla \\mathcal{L}` (the gradient of the *loss*, as
``elbo.loss_and_grads`` leaves it in ``.grad``) has, for draws ``g_1..g_n``, coordinate-wise
``z = (mean(g) - exact) / sqrt(var(g)/n + se_exact^2)`` approximately standard normal;
:func:`check_unbiased` rejects when any ``|z|`` exceeds the Bonferroni-corrected two-sided
threshold.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from statistics import NormalDist

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer import ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites, site_is_subsample

from lvmkit._validation import (
    PROGRAM_ERRORS,
    check_count,
    check_observed_values,
    check_tensor_arguments,
    describe,
    program_error,
)
from lvmkit.inference.estimators.sites import (
    BERNOULLI,
    ONEHOT,
    discrete_kind,
    innermost,
    plate_nesting,
    sample_sites,
)
from lvmkit.inference.estimators.vimco import _common_scale, _sum_to

__all__ = [
    "UnbiasedCheck",
    "check_unbiased",
    "exact_elbo_gradient",
    "exact_iwae_gradient",
    "gradient_variance",
]

MAX_CONFIGURATIONS = 2**16


# --------------------------------------------------------------------------------------
# Distribution inspection
# --------------------------------------------------------------------------------------


def _strip_masks(fn: dist.Distribution) -> dist.Distribution:
    """``fn`` without its masks: the distribution the site's value is really drawn from."""
    if isinstance(fn, dist.MaskedDistribution):
        return _strip_masks(fn.base_dist)
    if isinstance(fn, dist.Independent | torch.distributions.Independent):
        return dist.Independent(_strip_masks(fn.base_dist), fn.reinterpreted_batch_ndims)
    if isinstance(fn, dist.ExpandedDistribution):
        return _strip_masks(fn.base_dist).expand(fn.batch_shape)
    return fn


def _is_latent(site: dict) -> bool:
    return site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)


@dataclass(frozen=True)
class _DiscreteSite:
    """One discrete guide site: how many independent "digits" one unit of it has (a unit
    is one element of the plates every site shares) and their radix."""

    name: str
    kind: str
    shape: torch.Size  # full value shape
    unit_shape: torch.Size  # value shape of one unit (size 1 along the shared plates)
    num_groups: int  # elements for Bernoulli, one-hot vectors / indices otherwise, per unit
    radix: int  # values per group
    dtype: torch.dtype
    device: torch.device

    def decode(self, digits: torch.Tensor) -> torch.Tensor:
        """Turn ``num_groups`` digits in ``[0, radix)`` into a value of the site's shape,
        the same in every unit."""
        digits = digits.to(self.device)
        if self.kind == ONEHOT:
            digits = torch.nn.functional.one_hot(digits, self.radix)
        return digits.to(self.dtype).reshape(self.unit_shape).expand(self.shape).clone()


def _describe_discrete(name: str, site: dict, frames: frozenset) -> _DiscreteSite:
    kind = discrete_kind(site["fn"])
    value = site["value"]
    unit = value
    for frame in frames:
        axis = frame.dim - site["fn"].event_dim
        if unit.dim() >= -axis:
            unit = unit.narrow(axis, 0, 1)
    shape, unit_shape = value.shape, unit.shape
    if kind == BERNOULLI:
        return _DiscreteSite(name, kind, shape, unit_shape, unit.numel(), 2, value.dtype,
                             value.device)
    k = innermost(site["fn"]).logits.shape[-1]
    groups = unit.numel() // k if kind == ONEHOT else unit.numel()
    return _DiscreteSite(name, kind, shape, unit_shape, groups, k, value.dtype, value.device)


# --------------------------------------------------------------------------------------
# Exact gradient
# --------------------------------------------------------------------------------------


def _touched_params(model: Callable, guide: Callable, args, kwargs) -> tuple[list[str], list[str]]:
    """Param-store names used by the guide, and by model-or-guide (in first-use order)."""
    guide_trace = poutine.trace(guide, param_only=True).get_trace(*args, **kwargs)
    model_trace = poutine.trace(
        poutine.replay(model, trace=poutine.trace(guide).get_trace(*args, **kwargs)),
        param_only=True,
    ).get_trace(*args, **kwargs)
    guide_names = [n for n, s in guide_trace.nodes.items() if s["type"] == "param"]
    names = list(guide_names)
    for n, s in model_trace.nodes.items():
        if s["type"] == "param" and n not in names:
            names.append(n)
    return guide_names, names


def _param_tensors(names: list[str]) -> dict[str, torch.Tensor]:
    """Unconstrained leaf tensors of the param store (those ``.grad`` is written to)."""
    store = dict(pyro.get_param_store().named_parameters())
    missing = [n for n in names if n not in store]
    if missing:
        raise KeyError(f"params {missing} are not in the param store (known: {sorted(store)})")
    return {n: store[n] for n in names}


def _resolve_params(model, guide, args, kwargs, params: list[str] | None) -> list[str]:
    if params is not None:
        return list(params)
    return _touched_params(model, guide, args, kwargs)[1]


def _subsample_values(trace) -> dict[str, torch.Tensor]:
    return {n: s["value"] for n, s in trace.nodes.items() if site_is_subsample(s)}


def _configurations(sites: list[_DiscreteSite]) -> Iterator[dict]:
    """Every joint value of all discrete sites, as ``{name: value}`` dicts."""
    digits_per_site = [s.num_groups for s in sites]
    radices = torch.tensor(
        [s.radix for s in sites for _ in range(s.num_groups)], dtype=torch.long
    )
    total = int(torch.prod(radices).item()) if len(radices) else 1
    for index in range(total):
        digits = torch.empty(len(radices), dtype=torch.long)
        rest = index
        for i in range(len(radices) - 1, -1, -1):
            digits[i] = rest % int(radices[i])
            rest //= int(radices[i])
        config, start = {}, 0
        for site, n in zip(sites, digits_per_site, strict=True):
            config[site.name] = site.decode(digits[start : start + n])
            start += n
        yield config


def _count_configurations(sites: list[_DiscreteSite]) -> int:
    return math.prod(s.radix**s.num_groups for s in sites)


class _SetValues(Messenger):
    """Give sample sites fixed values *without* marking them observed.

    ``poutine.condition`` would mark them observed, and ``poutine.replay`` of the model
    refuses to replay observed guide sites.
    """

    def __init__(self, values: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg) -> None:
        if msg["name"] in self.values and not msg["is_observed"]:
            msg["value"] = self.values[msg["name"]]


def _sample_sites(trace) -> list[dict]:
    return [site for _, site in sample_sites(trace)]


def _independent_frames(model_trace, guide_trace) -> frozenset:
    """The vectorized plates that every sample site of the model and guide sits in (the
    ``"data"`` plate, typically): their elements are independent units, enumerated once
    each instead of jointly, and the K-sample bound is taken per unit as VIMCO takes it."""
    sites = _sample_sites(model_trace) + _sample_sites(guide_trace)
    if not sites:
        return frozenset()
    return frozenset.intersection(*(
        frozenset(f for f in s["cond_indep_stack"] if f.vectorized) for s in sites
    ))


def _per_unit(tensor, keep: set[int], ndim: int) -> torch.Tensor:
    """Sum a batch-shaped ``tensor`` over every dim but the units' (``keep``)."""
    tensor = torch.as_tensor(tensor)
    if tensor.dim() > ndim:
        tensor = tensor.sum(tuple(range(tensor.dim() - ndim)))
    return _sum_to(tensor, keep, ndim)


def _unit_terms(model, guide, args, kwargs, data, discrete_names, keep, ndim, scale):
    """``(log q(config), log p - log q)`` per unit for the guide with values ``data``;
    ``log p - log q`` divided by ``scale`` (the common subsampling scale, for the K-sample
    bound of the unscaled weights; 1 for the ELBO)."""
    guide_trace = poutine.trace(_SetValues(data)(guide)).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
        *args, **kwargs
    )
    guide_trace = prune_subsample_sites(guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    log_w = torch.zeros((1,) * ndim)
    for site in _sample_sites(model_trace):
        log_w = log_w + _per_unit(site["log_prob"], keep, ndim)
    for site in _sample_sites(guide_trace):
        log_w = log_w - _per_unit(site["log_prob"], keep, ndim)
    log_q = torch.zeros((1,) * ndim)
    for name in discrete_names:
        site = guide_trace.nodes[name]
        # The weight is the probability of drawing the configuration: no scale, no mask.
        lq = _strip_masks(site["fn"]).log_prob(site["value"])
        log_q = log_q + _per_unit(lq, keep, ndim)
    return log_q, log_w / scale


def _exact_gradient_draws(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    params: list[str] | None,
    num_continuous_draws: int,
    max_configurations: int,
    seed: int,
    num_particles: int = 1,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Exact gradient of the loss ``-L_K`` (``K = num_particles``; ``L_1`` is the ELBO),
    the mean over continuous draws, its standard error, and the subsample indices used
    (fixed to those of a reference trace). The one enumeration engine of the package."""
    names = _resolve_params(model, guide, args, kwargs, params)
    tensors = _param_tensors(names)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        reference = poutine.trace(guide).get_trace(*args, **kwargs)
        reference_model = poutine.trace(poutine.replay(model, trace=reference)).get_trace(
            *args, **kwargs
        )
    fixed = _subsample_values(reference)
    reference = prune_subsample_sites(reference)
    reference_model = prune_subsample_sites(reference_model)
    frames = _independent_frames(reference_model, reference)
    keep = {f.dim for f in frames}
    ndim = plate_nesting(reference_model, reference)
    sites, continuous = [], []
    for name, site in reference.nodes.items():
        if not _is_latent(site):
            continue
        if discrete_kind(site["fn"]) is not None:
            sites.append(_describe_discrete(name, site, frames))
        elif site["fn"].has_rsample:
            continuous.append(name)
        else:
            raise ValueError(
                f"site {name!r}: {type(site['fn']).__name__} is continuous but not "
                "reparameterizable, so its expectation cannot be enumerated or differentiated "
                "pathwise"
            )
    k = num_particles
    count = _count_configurations(sites)
    if count**k > max_configurations:
        detail = ", ".join(f"{s.name!r}: {s.radix}^{s.num_groups}" for s in sites)
        per = f" per element of plates {sorted(f.name for f in frames)}" if frames else ""
        tuples = f" ({count}^{k} particle tuples)" if k > 1 else ""
        raise ValueError(
            f"exact gradient needs {count} configurations of the discrete guide sites{per}"
            f" ({detail}){tuples}, more than max_configurations={max_configurations}; use a"
            " smaller batch or fewer latent units"
        )
    # The K-sample bound weighs unscaled log-weights (as VIMCOELBO does); the ELBO is linear.
    scale = 1.0
    if k > 1:
        scale = _common_scale([(s["name"], s) for s in
                               _sample_sites(reference_model) + _sample_sites(reference)])
    discrete_names = [s.name for s in sites]
    configs = list(_configurations(sites))
    tuples = torch.tensor(list(itertools.product(range(len(configs)), repeat=k)),
                          dtype=torch.long).reshape(-1, k)
    particle = torch.arange(k)
    draws = num_continuous_draws if continuous else 1
    leaves = list(tensors.values())
    sums = [torch.zeros_like(t, dtype=torch.float64) for t in leaves]
    squares = [torch.zeros_like(t, dtype=torch.float64) for t in leaves]
    for draw in range(draws):
        log_q, log_w = [], []
        for j in range(k):
            q_j, w_j = [], []
            for config in configs:
                with torch.random.fork_rng():
                    # Common random numbers: every configuration of particle j sees the
                    # same continuous noise.
                    torch.manual_seed(seed + 1 + draw * k + j)
                    lq, lw = _unit_terms(model, guide, args, kwargs, {**fixed, **config},
                                         discrete_names, keep, ndim, scale)
                q_j.append(lq)
                w_j.append(lw)
            log_q.append(torch.stack(torch.broadcast_tensors(*q_j)))
            log_w.append(torch.stack(torch.broadcast_tensors(*w_j)))
        log_q = torch.stack(torch.broadcast_tensors(*log_q))  # (K, C, *units)
        log_w = torch.stack(torch.broadcast_tensors(*log_w))
        weight = log_q[particle, tuples].sum(1).exp()  # (T, *units)
        bound = torch.logsumexp(log_w[particle, tuples], 1) - math.log(k)
        loss = -scale * (weight * bound).sum()
        grads = (torch.autograd.grad(loss, leaves, allow_unused=True)
                 if leaves and loss.requires_grad else [None] * len(leaves))
        for i, g in enumerate(grads):
            g = torch.zeros_like(leaves[i]) if g is None else g
            sums[i] += g.double()
            squares[i] += g.double() ** 2
    mean, stderr = {}, {}
    for name, t, s, sq in zip(names, leaves, sums, squares, strict=True):
        m = s / draws
        if draws > 1:
            var = (sq - draws * m**2).clamp_min(0) / (draws - 1)
            se = (var / draws).sqrt()
        else:
            se = torch.zeros_like(m)
        mean[name] = m.to(t.dtype)
        stderr[name] = se.to(t.dtype)
    return mean, stderr, fixed


def exact_elbo_gradient(
    model: Callable,
    guide: Callable,
    *args,
    params: list[str] | None = None,
    num_continuous_draws: int = 256,
    max_configurations: int = MAX_CONFIGURATIONS,
    seed: int = 0,
    **kwargs,
) -> dict[str, torch.Tensor]:
    """Exact gradient of the ELBO *loss* ``-E_q[log p(x, z) - log q(z | x)]``.

    The guide is traced once to find its discrete sample sites (``Bernoulli``,
    ``OneHotCategorical`` or ``Categorical``, possibly wrapped by ``.to_event``,
    ``.expand`` or ``.mask``). Every joint configuration of all their elements is
    enumerated; for each, the guide is conditioned on it (so lower layers see the upper
    values), the model is replayed, and ``q(config) * (log p - log q)`` is accumulated.
    The elements of plates that every sample site of the model and guide sits in (the
    ``"data"`` plate) are independent: one unit's configurations are enumerated, the same
    in every unit at once, rather than all units' jointly.
    Scales from subsampled plates and masks enter ``log p - log q`` exactly as in
    ``Trace_ELBO``; the weight ``q(config)`` is the unscaled, unmasked probability.
    Subsample indices are fixed to those of the reference trace (drawn with ``seed``).

    Reparameterized continuous guide sites cannot be enumerated: their expectation is a
    Monte-Carlo mean over ``num_continuous_draws`` noise draws, the same noise for every
    configuration (common random numbers). The result is then exact only up to that
    Monte-Carlo error; :func:`check_unbiased` accounts for it.

    :param params: param-store names to differentiate (default: all params touched by the
        model and the guide). Gradients are w.r.t. the unconstrained tensors, like ``.grad``
        after ``SVI``.
    :raises ValueError: if there are more than ``max_configurations`` configurations, or a
        continuous guide site is not reparameterizable.

    Example: one binary latent per datum; ``z = 1`` explains ``x = 2`` and not ``x = 0``,
    so raising ``phi`` lowers the loss of the second datum and raises the first's.

    >>> import pyro
    >>> import pyro.distributions as dist
    >>> import torch
    >>> def model(x):
    ...     with pyro.plate("data", len(x)):
    ...         z = pyro.sample("z", dist.Bernoulli(0.5))
    ...         pyro.sample("x", dist.Normal(2.0 * z, 1.0), obs=x)
    >>> def guide(x):
    ...     phi = pyro.param("phi", torch.zeros(len(x)))
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("z", dist.Bernoulli(logits=phi))
    >>> x = torch.tensor([0.0, 2.0])
    >>> from lvmkit.inference import exact_elbo_gradient
    >>> exact_elbo_gradient(model, guide, x)
    {'phi': tensor([ 0.5000, -0.5000])}
    """
    mean, _, _ = _exact_gradient_draws(
        model, guide, args, kwargs, params, num_continuous_draws, max_configurations, seed
    )
    return mean


def exact_iwae_gradient(
    model: Callable,
    guide: Callable,
    *args,
    num_particles: int,
    params: list[str] | None = None,
    num_continuous_draws: int = 256,
    max_configurations: int = MAX_CONFIGURATIONS,
    seed: int = 0,
    **kwargs,
) -> dict[str, torch.Tensor]:
    """Exact gradient of the loss ``-s sum_i L_K(x_i)``, the K-sample importance-weighted
    bound (Burda et al. 2016) that :class:`~lvmkit.inference.estimators.vimco.VIMCOELBO`
    estimates, by the enumeration of :func:`exact_elbo_gradient`.

    The bound is taken per unit ``i`` (an element of the plates every sample site sits
    in; one joint bound if there are none), ``s`` is the sites' common subsampling scale,
    and ``L_K(x_i) = sum_{c_1..c_K} prod_k q(c_k | x_i) log mean_k w_i(c_k)`` is summed over
    all ``C^K`` particle tuples of one unit's ``C`` configurations. ``K = 1`` gives the
    ELBO's gradient. Continuous sites: as in :func:`exact_elbo_gradient`, with independent
    noise per particle.

    :raises ValueError: as :func:`exact_elbo_gradient`, where ``C^K`` exceeds
        ``max_configurations``, and for sites with different scales when ``K > 1``.

    Example: the pair of :func:`exact_elbo_gradient`'s example; ``K = 1`` is the ELBO.

    >>> import pyro
    >>> import pyro.distributions as dist
    >>> import torch
    >>> def model(x):
    ...     with pyro.plate("data", len(x)):
    ...         z = pyro.sample("z", dist.Bernoulli(0.5))
    ...         pyro.sample("x", dist.Normal(2.0 * z, 1.0), obs=x)
    >>> def guide(x):
    ...     phi = pyro.param("phi", torch.zeros(len(x)))
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("z", dist.Bernoulli(logits=phi))
    >>> x = torch.tensor([0.0, 2.0])
    >>> from lvmkit.inference import exact_iwae_gradient
    >>> exact_iwae_gradient(model, guide, x, num_particles=1)
    {'phi': tensor([ 0.5000, -0.5000])}
    >>> exact_iwae_gradient(model, guide, x, num_particles=3)
    {'phi': tensor([ 0.2010, -0.2010])}
    """
    mean, _, _ = _exact_gradient_draws(
        model, guide, args, kwargs, params, num_continuous_draws, max_configurations, seed,
        num_particles=num_particles,
    )
    return mean


# --------------------------------------------------------------------------------------
# Estimator draws
# --------------------------------------------------------------------------------------


def _fix_subsamples(fn: Callable, fixed: dict[str, torch.Tensor]) -> Callable:
    return _SetValues(fixed)(fn) if fixed else fn


def _gradient_draws(
    elbo: ELBO,
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    tensors: dict[str, torch.Tensor],
    num_draws: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``num_draws`` gradient estimates from ``elbo.loss_and_grads``.

    ``loss_and_grads`` writes ``.grad`` of every parameter it reaches, the model's too: the
    ``.grad`` of every parameter in the param store or in ``model`` / ``guide`` (if they
    are modules) is put back as it was afterwards, so that measuring inside a training
    loop does not add the draws to the next step's gradient.
    """
    leaves = list(tensors.values())
    saved = [(p, p.grad) for p in _all_params(model, guide, leaves)]
    try:
        for _ in range(num_draws):
            for p, _ in saved:
                p.grad = None
            elbo.loss_and_grads(model, guide, *args, **kwargs)
            yield {
                n: (torch.zeros_like(t) if t.grad is None else t.grad.detach().clone())
                for n, t in tensors.items()
            }
    finally:
        for p, grad in saved:
            p.grad = grad


def _all_params(model: Callable, guide: Callable, extra: list[torch.Tensor]
                ) -> list[torch.Tensor]:
    found = {id(p): p for p in extra}
    for _, p in pyro.get_param_store().named_parameters():
        found.setdefault(id(p), p)
    for fn in (model, guide):
        if isinstance(fn, torch.nn.Module):
            for p in fn.parameters():
                found.setdefault(id(p), p)
    return list(found.values())


class _Moments:
    """Coordinate-wise running mean and variance in float64 (Welford)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: dict[str, torch.Tensor] = {}
        self.m2: dict[str, torch.Tensor] = {}

    def add(self, sample: dict[str, torch.Tensor]) -> None:
        self.n += 1
        for k, v in sample.items():
            v = v.double()
            if k not in self.mean:
                self.mean[k] = torch.zeros_like(v)
                self.m2[k] = torch.zeros_like(v)
            delta = v - self.mean[k]
            self.mean[k] += delta / self.n
            self.m2[k] += delta * (v - self.mean[k])

    def variance(self) -> dict[str, torch.Tensor]:
        return {k: m2 / max(self.n - 1, 1) for k, m2 in self.m2.items()}


@dataclass
class UnbiasedCheck:
    """Result of :func:`check_unbiased`.

    ``exact``, ``mean``, ``stderr`` and ``z`` map param names to tensors shaped like the
    parameters. ``stderr`` combines the estimator's standard error with the Monte-Carlo
    error of the exact gradient (nonzero only for guides with continuous sites).

    Example:

    >>> import pyro
    >>> import pyro.distributions as dist
    >>> import torch
    >>> def model(x):
    ...     with pyro.plate("data", len(x)):
    ...         z = pyro.sample("z", dist.Bernoulli(0.5))
    ...         pyro.sample("x", dist.Normal(2.0 * z, 1.0), obs=x)
    >>> def guide(x):
    ...     phi = pyro.param("phi", torch.zeros(len(x)))
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("z", dist.Bernoulli(logits=phi))
    >>> x = torch.tensor([0.0, 2.0])
    >>> from pyro.infer import Trace_ELBO
    >>> from lvmkit.inference import check_unbiased
    >>> result = check_unbiased(model, guide, Trace_ELBO(), x, num_draws=200)
    >>> result.exact["phi"], result.mean["phi"].shape, result.num_draws
    (tensor([ 0.5000, -0.5000]), torch.Size([2]), 200)
    >>> print(result.summary())
    PASSED: max |z| = ... (threshold ..., 200 draws)
      phi: max |z| ...; worst coordinate exact ... mean ... ± ...
    """

    exact: dict[str, torch.Tensor]
    mean: dict[str, torch.Tensor]
    stderr: dict[str, torch.Tensor]
    z: dict[str, torch.Tensor]
    max_abs_z: float
    threshold: float
    num_draws: int
    passed: bool

    def summary(self) -> str:
        lines = [
            f"{'PASSED' if self.passed else 'FAILED'}: max |z| = {self.max_abs_z:.2f} "
            f"(threshold {self.threshold:.2f}, {self.num_draws} draws)"
        ]
        for name in self.exact:
            z = self.z[name].abs()
            worst = int(z.reshape(-1).argmax()) if z.numel() else 0
            lines.append(
                f"  {name}: max |z| {float(z.max()) if z.numel() else 0.0:.2f}; worst coordinate"
                f" exact {self.exact[name].reshape(-1)[worst].item():+.5g}"
                f" mean {self.mean[name].reshape(-1)[worst].item():+.5g}"
                f" ± {self.stderr[name].reshape(-1)[worst].item():.3g}"
            )
        return "\n".join(lines)


def _two_sided_threshold(alpha: float, dof: int) -> float:
    """``|z|`` threshold of a two-sided level-``alpha`` test: Student's t with ``dof`` degrees
    of freedom (the standard error is estimated from the draws), normal if SciPy (installed
    with scikit-learn) is missing."""
    try:
        from scipy.stats import t as student_t
    except ImportError:  # pragma: no cover
        return NormalDist().inv_cdf(1 - alpha / 2)
    return float(student_t.ppf(1 - alpha / 2, max(dof, 1)))


OBJECTIVES = ("elbo", "iwae")


def _objective_particles(elbo) -> int:
    """``K`` of the K-sample bound whose gradient ``elbo`` estimates (1: the ELBO)."""
    objective = getattr(elbo, "objective", "elbo")
    if objective not in OBJECTIVES:
        raise ValueError(
            f"{type(elbo).__name__}.objective is {objective!r}; check_unbiased knows "
            f"{OBJECTIVES}"
        )
    return int(elbo.num_particles) if objective == "iwae" else 1


# Pyro seeds NumPy's legacy generator (seeds in [0, 2**32 - 1]); the estimator's draws use
# seed + 7919.
_SEED_OFFSET = 7919
_MAX_SEED = 2**32 - 1 - _SEED_OFFSET


def _check_arguments(model, guide, elbo, args, kwargs, num_draws, alpha, params, seed,
                     num_continuous_draws) -> None:
    """Refuse bad arguments of :func:`check_unbiased` before anything runs, naming them."""
    for name, fn in (("model", model), ("guide", guide)):
        if not callable(fn):
            raise TypeError(f"{name} must be a callable Pyro program, got {type(fn).__name__}")
    if isinstance(elbo, type):
        raise TypeError(f"elbo must be an ELBO instance, got the class {elbo.__name__}; pass "
                        f"{elbo.__name__}()")
    if not hasattr(elbo, "loss_and_grads"):
        raise TypeError(f"elbo must be a Pyro ELBO (with loss_and_grads), got {elbo!r}")
    # one draw has no variance: its z-test would be of nothing
    check_count("num_draws", num_draws, minimum=2)
    check_count("num_continuous_draws", num_continuous_draws)
    if (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)
            or not 0.0 < alpha < 1.0):  # NaN fails too
        raise ValueError(f"alpha must be a level in (0, 1), got {alpha!r}")
    if (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
            or not 0 <= seed <= _MAX_SEED):
        raise ValueError(f"seed must be an int in [0, 2**32 - {_SEED_OFFSET + 1}], got {seed!r}")
    if params is not None and (isinstance(params, str) or not isinstance(params, list | tuple)
                               or not all(isinstance(p, str) for p in params)):
        raise TypeError(f"params must be None or a list of param-store names, got {params!r}")
    named = {f"args[{i}]": value for i, value in enumerate(args)} | dict(kwargs)
    check_tensor_arguments(named)
    described = ", ".join(f"{name}: {describe(value)}" for name, value in named.items())
    try:
        with torch.random.fork_rng():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs)
            guide_trace.compute_log_prob()
            model_trace.compute_log_prob()
    except PROGRAM_ERRORS as err:
        wrapped = program_error(
            err, f"running the guide and the model on ({described or 'no arguments'}) failed")
        if wrapped is None:
            raise
        raise wrapped from err
    guide_latents = {name for name, site in guide_trace.nodes.items() if _is_latent(site)}
    missing = [name for name, site in model_trace.nodes.items()
               if _is_latent(site) and name not in guide_latents]
    if missing:
        raise ValueError(
            f"the guide does not sample the model's latent site(s) {missing} (Pyro's 'Found "
            "vars in model but not guide'): the model would draw them from their prior, and "
            "neither the estimator nor the enumeration would be of the ELBO; sample them in "
            "the guide, or observe them in the model"
        )
    check_observed_values(model_trace, "data", f"the arguments are ({described})")
    if params is not None:
        store = {name for name, _ in pyro.get_param_store().named_parameters()}
        unknown = [p for p in params if p not in store]
        if unknown:
            raise ValueError(
                f"params {unknown} are not params of the model or the guide (the param store "
                f"holds {sorted(store)})"
            )


def check_unbiased(
    model: Callable,
    guide: Callable,
    elbo: ELBO,
    *args,
    num_draws: int = 2000,
    alpha: float = 1e-3,
    params: list[str] | None = None,
    seed: int = 0,
    num_continuous_draws: int = 256,
    **kwargs,
) -> UnbiasedCheck:
    """z-test ``elbo``'s gradient estimates against the exact gradient (by enumeration) of
    the objective the estimator declares: ``elbo.objective``, ``"elbo"`` (the default, and
    for Pyro's own ELBOs) or ``"iwae"`` (the ``elbo.num_particles``-sample bound of
    :func:`exact_iwae_gradient`, as VIMCO estimates).

    Draws ``num_draws`` gradients of the loss with ``elbo.loss_and_grads`` (parameters are
    not stepped; an ELBO with ``num_particles > 1`` contributes its particle average per
    draw, so a vectorized ELBO makes the check cheaper), and compares their mean with
    :func:`exact_elbo_gradient`. For every coordinate with nonzero standard error,
    ``z = (mean - exact) / stderr``; the check passes when all ``|z|`` are below the
    two-sided Bonferroni threshold ``T^{-1}(1 - alpha / (2 m))`` over those ``m``
    coordinates, ``T`` Student's t with ``num_draws - 1`` degrees of freedom since the
    standard error is estimated from the draws. Coordinates with zero standard error must
    match the exact value to ``1e-5`` relative / ``1e-6`` absolute tolerance (else their
    ``z`` is ``inf``).

    Random subsample indices are fixed to those of one reference trace, for both the exact
    gradient and the estimator: the check is conditional on the subsample. ``torch`` and
    ``pyro`` RNGs are seeded with ``seed``.

    :raises TypeError, ValueError: before any draw, naming the argument or site: a model,
        guide or ``elbo`` of the wrong kind, ``num_draws < 2``, ``alpha`` outside (0, 1), a
        seed outside [0, 2**32 - 7920], ``params`` that are not names of the param store,
        meta-device, empty or non-finite tensor arguments, model latents the guide lacks;
        errors of the program on its arguments name them.

    Example: Pyro's score-function ELBO and VIMCO (against the 3-sample bound) pass.

    >>> import pyro
    >>> import pyro.distributions as dist
    >>> import torch
    >>> def model(x):
    ...     with pyro.plate("data", len(x)):
    ...         z = pyro.sample("z", dist.Bernoulli(0.5))
    ...         pyro.sample("x", dist.Normal(2.0 * z, 1.0), obs=x)
    >>> def guide(x):
    ...     phi = pyro.param("phi", torch.zeros(len(x)))
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("z", dist.Bernoulli(logits=phi))
    >>> x = torch.tensor([0.0, 2.0])
    >>> from pyro.infer import Trace_ELBO
    >>> from lvmkit.inference import VIMCOELBO, check_unbiased
    >>> check_unbiased(model, guide, Trace_ELBO(), x, num_draws=200).passed
    True
    >>> check_unbiased(model, guide, VIMCOELBO(num_particles=3), x, num_draws=200).passed
    True
    """
    _check_arguments(model, guide, elbo, args, kwargs, num_draws, alpha, params, seed,
                     num_continuous_draws)
    pyro.set_rng_seed(seed)
    num_particles = _objective_particles(elbo)
    names = _resolve_params(model, guide, args, kwargs, params)
    exact, exact_se, fixed = _exact_gradient_draws(
        model, guide, args, kwargs, names, num_continuous_draws, MAX_CONFIGURATIONS, seed,
        num_particles=num_particles,
    )
    tensors = _param_tensors(names)
    pyro.set_rng_seed(seed + _SEED_OFFSET)
    moments = _Moments()
    for grads in _gradient_draws(
        elbo, _fix_subsamples(model, fixed), _fix_subsamples(guide, fixed), args, kwargs,
        tensors, num_draws,
    ):
        moments.add(grads)
    variance = moments.variance()
    mean, stderr, z = {}, {}, {}
    tested = 0
    for name in names:
        m = moments.mean[name]
        se = (variance[name] / num_draws + exact_se[name].double() ** 2).sqrt()
        diff = m - exact[name].double()
        nonzero = se > 0
        tested += int(nonzero.sum())
        close = diff.abs() <= 1e-6 + 1e-5 * exact[name].double().abs()
        zz = torch.where(nonzero, diff / se.where(nonzero, torch.ones_like(se)), diff * 0)
        zz = torch.where(~nonzero & ~close, torch.full_like(zz, math.inf), zz)
        mean[name] = m.to(exact[name].dtype)
        stderr[name] = se.to(exact[name].dtype)
        z[name] = zz.to(exact[name].dtype)
    threshold = _two_sided_threshold(alpha / max(tested, 1), num_draws - 1)
    max_abs_z = max((float(v.abs().max()) for v in z.values() if v.numel()), default=0.0)
    return UnbiasedCheck(
        exact=exact,
        mean=mean,
        stderr=stderr,
        z=z,
        max_abs_z=max_abs_z,
        threshold=threshold,
        num_draws=num_draws,
        passed=bool(max_abs_z < threshold),
    )


def gradient_variance(
    model: Callable,
    guide: Callable,
    estimators: dict[str, ELBO],
    *args,
    num_draws: int = 100,
    params: list[str] | None = None,
    seed: int = 0,
    **kwargs,
) -> dict[str, float]:
    """Log gradient variance of each estimator, on the same arguments, parameters fixed.

    For each estimator, ``num_draws`` gradients of the guide parameters are drawn with
    ``loss_and_grads``; the per-coordinate variance is averaged over all coordinates and
    its natural log returned, as the gradient-variance tracker of the REBAR reference code
    (Tucker et al. 2017) reports it. ``params`` defaults to the params the guide touches.
    Every estimator starts from the same seed.

    Example: REBAR's control variate lowers the variance of the score-function estimate.

    >>> import pyro
    >>> import pyro.distributions as dist
    >>> import torch
    >>> def model(x):
    ...     with pyro.plate("data", len(x)):
    ...         z = pyro.sample("z", dist.Bernoulli(0.5))
    ...         pyro.sample("x", dist.Normal(2.0 * z, 1.0), obs=x)
    >>> def guide(x):
    ...     phi = pyro.param("phi", torch.zeros(len(x)))
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("z", dist.Bernoulli(logits=phi))
    >>> x = torch.tensor([0.0, 2.0])
    >>> from pyro.infer import Trace_ELBO
    >>> from lvmkit.inference import RebarELBO, gradient_variance
    >>> log_var = gradient_variance(
    ...     model, guide, {"score": Trace_ELBO(), "rebar": RebarELBO()}, x, num_draws=20
    ... )
    >>> sorted(log_var), log_var["rebar"] < log_var["score"]
    (['rebar', 'score'], True)
    """
    if num_draws < 2:
        raise ValueError(f"num_draws must be at least 2 to estimate a variance, got {num_draws}")
    if params is None:
        params = _touched_params(model, guide, args, kwargs)[0]
    tensors = _param_tensors(list(params))
    result = {}
    for label, elbo in estimators.items():
        pyro.set_rng_seed(seed)
        moments = _Moments()
        for grads in _gradient_draws(elbo, model, guide, args, kwargs, tensors, num_draws):
            moments.add(grads)
        variances = torch.cat([v.reshape(-1) for v in moments.variance().values()])
        result[label] = math.log(float(variances.mean())) if variances.numel() else -math.inf
    return result
