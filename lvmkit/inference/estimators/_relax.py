"""Shared machinery of the relaxation-based estimators (REBAR, RELAX, Concrete).

Three kinds of guide passes are needed:

* a *hard* pass, which samples every discrete site through its noise, ``b = H(z)`` with
  ``z = logits + n`` (logistic noise ``n = logit(u)`` for Bernoulli sites, Gumbel noise
  ``n = -log(-log u)`` for one-hot sites), and records ``n``, the logits and, for
  reparameterized continuous sites (sampled by Pyro as ``Trace_ELBO`` samples them) the RNG
  state that reproduces their noise;
* *relaxed* passes, which replay the guide with ``sigma_lambda(logits' + n)`` (sigmoid or
  softmax at temperature ``lambda``) where ``logits'`` is recomputed by the guide from the
  relaxed upstream values, continuous sites redrawn with the recorded noise, and the
  discrete log-probabilities replaced by their continuous extensions;
* the noise for the *conditional* relaxed pass, ``n~ ~ p(n | b)`` (Tucker et al. 2017,
  Appendix), computed from the hard-pass logits so that it stays differentiable in them.

REBAR and RELAX run the hard pass, then the two relaxed passes as one *fused* evaluation
where they are asked to (:func:`fused_traces`: a size-2 plate left of the model's plates,
each site sampling both relaxed passes at once; the fast path), else one after the other
(the reference path), decided once per model and guide from the first trace
(``RebarELBO._decide_path``). On the fast path a guide whose logits depend on no other
latent is not run again (:func:`guide_is_reusable`, :func:`reused_guide_traces`): only
the model runs on the relaxed values. All noise comes from one keyed source per step
(:class:`StepNoise`), so every path sees the same numbers.

Numerics: uniforms are clamped to ``[tiny, 1 - eps]`` and every formula is written with
``logsigmoid`` / ``logaddexp`` so that logits of +-50 give finite values and gradients.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import torch.nn.functional as F
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import MultiFrameTensor, get_plate_stacks, is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import check_if_enumerated

from lvmkit.inference.estimators import EstimatorError
from lvmkit.inference.estimators.sites import (  # noqa: F401  (re-exported for the estimators)
    BERNOULLI,
    CATEGORICAL,
    ONEHOT,
    discrete_kind,
    innermost,
    plate_nesting,
)

# --------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------


def uniform_like(shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """Uniform draws clamped away from 0 and 1 so that logs of them stay finite."""
    finfo = torch.finfo(like.dtype)
    u = torch.rand(shape, dtype=like.dtype, device=like.device)
    return u.clamp(finfo.tiny, 1 - finfo.eps)


class StepNoise:
    """The keyed noise source of one step (one particle): the uniforms of every
    ``(site, role)`` come from a generator seeded by ``(key, site, role)``, so every path
    (fused, reference, ``loss()``) sees the same numbers whatever order it draws
    them in. ``key`` is drawn from torch's RNG at the first discrete site, so a guide whose
    continuous sites come first draws exactly what ``Trace_ELBO`` draws for them."""

    def __init__(self) -> None:
        self.key: int | None = None

    def __enter__(self) -> StepNoise:
        _STEPS.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _STEPS.remove(self)

    def uniform(self, shape: torch.Size, like: torch.Tensor, site: str, role: str
                ) -> torch.Tensor:
        if self.key is None:
            self.key = int(torch.randint(0, 2**62, ()))
        generator = torch.Generator(device=like.device)
        generator.manual_seed((self.key + zlib.crc32(f"{site}/{role}".encode())) % 2**63)
        u = torch.rand(shape, generator=generator, dtype=like.dtype, device=like.device)
        finfo = torch.finfo(like.dtype)
        return u.clamp(finfo.tiny, 1 - finfo.eps)


_STEPS: list[StepNoise] = []


def draw_uniform(shape: torch.Size, like: torch.Tensor, site: str, role: str) -> torch.Tensor:
    """The uniforms behind one site's noise; ``role`` is ``"hard"`` or ``"conditional"``:
    from the active :class:`StepNoise`, else straight from torch's RNG.

    Every pass draws through here, so a test can substitute fixed uniforms per site and
    role and compare two code paths that draw in different orders.
    """
    if _STEPS:
        return _STEPS[-1].uniform(shape, like, site, role)
    return uniform_like(shape, like)


def logistic_noise(u: torch.Tensor) -> torch.Tensor:
    """``logit(u)``: ``logits + logit(u) > 0`` has probability ``sigmoid(logits)``."""
    return torch.logit(u)


def gumbel_noise(u: torch.Tensor) -> torch.Tensor:
    """``-log(-log u)``: ``argmax(log_softmax(logits) + g)`` is a categorical draw."""
    return -torch.log(-torch.log(u))


def conditional_logistic_noise(
    logits: torch.Tensor, b: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """``logit(u~)`` for ``u~ ~ U(0, 1)`` conditioned on ``H(logits + logit(u~)) = b``.

    With ``p = sigmoid(logits)``, ``u~ = v (1 - p)`` if ``b = 0`` and ``u~ = 1 - p + v p``
    if ``b = 1`` (Tucker et al. 2017, Appendix). Written in log space:
    for ``b = 1``, ``log(1 - u~) = log p + log(1 - v)`` and
    ``log u~ = logaddexp(log(1 - p), log v + log p)``; for ``b = 0``,
    ``log u~ = log v + log(1 - p)`` and ``log(1 - u~) = logaddexp(log p, log(1-v) + log(1-p))``.
    Differentiable in ``logits``; finite for logits of any size.
    """
    # Dividing through by p (b = 1) or 1 - p (b = 0), with p / (1 - p) = exp(logits):
    # b = 1: logaddexp(-logits, log v) - log(1 - v); b = 0: log v - logaddexp(logits,
    # log(1 - v)). One logaddexp on the selected arguments serves both branches. The
    # branches are selected by arithmetic on b in {0, 1} (lerp with weight 0 or 1 returns
    # an end exactly), not torch.where: the same numbers and gradients, bit for bit, at a
    # quarter of the time on CPU, where three wheres and their backwards dominated.
    log_v = torch.log(v)
    log_1mv = torch.log1p(-v)
    sign = 2 * b - 1
    both = torch.logaddexp(-sign * logits, torch.lerp(log_1mv, log_v, b))
    return sign * both + torch.lerp(log_v, -log_1mv, b)


def conditional_gumbel_noise(
    log_probs: torch.Tensor, b: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """Gumbel noise ``g~`` conditioned on ``argmax(log_probs + g~) = argmax(b)``.

    For the perturbed logits ``z = log p + g``: ``z_b = -log(-log v_b)`` and, for
    ``i != b``, ``z_i = -log(-log v_i / p_i - log v_b)`` (Tucker et al. 2017, Appendix),
    computed as ``-logaddexp(log(-log v_i) - log p_i, log(-log v_b))``. Returns
    ``z - log p``, the noise to add to (normalized) logits. ``log_probs`` must be
    normalized (``log_softmax``).
    """
    log_neg_log_v = torch.log(-torch.log(v))
    top = (b * log_neg_log_v).sum(-1, keepdim=True)  # log(-log v_b)
    others = -torch.logaddexp(log_neg_log_v - log_probs, top)
    z = torch.lerp(others, -top, b)  # b's 0/1 select exactly, as in the Bernoulli case
    return z - log_probs


def relax(kind: str, logits: torch.Tensor, noise: torch.Tensor, temperature) -> torch.Tensor:
    """``sigmoid((logits + n) / lambda)`` or ``softmax((logits + n) / lambda)``."""
    z = (logits + noise) / temperature
    return torch.sigmoid(z) if kind == BERNOULLI else torch.softmax(z, dim=-1)


def harden(kind: str, logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``H(logits + n)``: a Bernoulli value, or the one-hot argmax."""
    z = logits + noise
    if kind == BERNOULLI:
        return (z > 0).to(logits.dtype)
    return F.one_hot(z.argmax(-1), z.shape[-1]).to(logits.dtype)


# --------------------------------------------------------------------------------------
# Distributions
# --------------------------------------------------------------------------------------

def full_logits(fn: dist.Distribution) -> torch.Tensor:
    """The (normalized, for one-hot) logits of a discrete site, broadcast to its value shape."""
    return innermost(fn).logits.expand(fn.shape())


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` without the repeats of its broadcast (stride-0) dimensions, which broadcast
    back in arithmetic: an expanded prior's logits are evaluated once, not per datum."""
    for dim, (size, stride) in enumerate(zip(t.shape, t.stride(), strict=True)):
        if stride == 0 and size > 1:
            t = t.narrow(dim, 0, 1)
    return t


class _RelaxedBernoulliScore(dist.Bernoulli):
    """Bernoulli whose ``log_prob`` is the continuous extension ``v log p + (1-v) log(1-p)``,
    computed as ``v l + log(1 - p)`` (``log p - log(1-p) = l``: one ``logsigmoid``)."""

    def log_prob(self, value):
        logits = _compact(self.logits)
        out = value * logits + F.logsigmoid(-logits)
        if out.shape == self.logits.shape:  # the usual case: no broadcast to restore
            return out
        return out.expand(torch.broadcast_shapes(out.shape, self.logits.shape))


class _RelaxedOneHotScore(dist.OneHotCategorical):
    """One-hot categorical whose ``log_prob`` is ``sum_i v_i log p_i`` for relaxed ``v``."""

    def log_prob(self, value):
        return (value * self.logits).sum(-1)


def with_relaxed_scores(fn: dist.Distribution, detach: bool = False) -> dist.Distribution:
    """Rebuild ``fn`` (keeping ``.to_event``, ``.expand``, ``.mask``) to score relaxed values.

    Validation must be off for the rebuilt distribution: a ``Bernoulli`` with
    ``validate_args=True`` rejects values in (0, 1) even under ``validation_enabled(False)``.
    With ``detach`` the logits are cut from the graph (the value keeps its gradient).
    """
    if isinstance(fn, dist.MaskedDistribution):
        return dist.MaskedDistribution(
            with_relaxed_scores(fn.base_dist, detach), fn._mask
        )
    if isinstance(fn, dist.Independent | torch.distributions.Independent):
        return dist.Independent(
            with_relaxed_scores(fn.base_dist, detach),
            fn.reinterpreted_batch_ndims,
            validate_args=False,
        )
    if isinstance(fn, dist.ExpandedDistribution):
        return with_relaxed_scores(fn.base_dist, detach).expand(fn.batch_shape)
    kind = discrete_kind(fn)
    if kind not in (BERNOULLI, ONEHOT):
        return fn
    logits = fn.logits.detach() if detach else fn.logits
    cls = _RelaxedBernoulliScore if kind == BERNOULLI else _RelaxedOneHotScore
    return cls(logits=logits, validate_args=False)


# --------------------------------------------------------------------------------------
# Records of the hard pass
# --------------------------------------------------------------------------------------


@dataclass
class SiteRecord:
    """What the hard pass saw at one guide sample site."""

    name: str
    kind: str | None  # discrete kind, or None for a continuous site
    relaxed: bool  # whether relaxed passes relax it (else they replay ``value``)
    value: torch.Tensor | None  # None until an opted-out site has been sampled
    logits: torch.Tensor | None = None  # hard-pass logits (discrete sites)
    noise: torch.Tensor | None = None  # logistic / Gumbel noise (discrete sites)
    # torch's RNG state before a reparameterized continuous site was sampled (its noise)
    seed: RngSnapshot | None = None


@dataclass
class HardPass:
    """Records of every guide site in sampling order."""

    records: dict[str, SiteRecord] = field(default_factory=dict)
    # Subsample indices the hard pass drew, by plate name: every other pass of the same
    # step must see the same mini-batch (REBAR's coupling of b and z~ is per datum).
    subsamples: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def relaxed(self) -> list[SiteRecord]:
        return [r for r in self.records.values() if r.relaxed]

    @property
    def all_relaxed(self) -> bool:
        """Whether every guide latent is relaxed (what the fast path needs)."""
        return all(r.relaxed for r in self.records.values())




@dataclass(frozen=True)
class RngSnapshot:
    """torch's RNG state on one device, taken just before a site was sampled."""

    device: torch.device
    state: torch.Tensor

    @classmethod
    def take(cls, device: torch.device) -> RngSnapshot:
        if device.type == "cuda":
            return cls(device, torch.cuda.get_rng_state(device))
        return cls(device, torch.get_rng_state())

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Run from this state, and restore the outer RNG state afterwards."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            if self.device.type == "cuda":
                torch.cuda.set_rng_state(self.state, self.device)
            else:
                torch.set_rng_state(self.state)
            yield


def _device_of(fn: dist.Distribution) -> torch.device:
    for value in vars(fn).values():
        if torch.is_tensor(value):
            return value.device
    base = getattr(fn, "base_dist", None)
    return _device_of(base) if base is not None else torch.device("cpu")


class HardSampler(Messenger):
    """Sample the guide through recorded noise (see module docstring).

    :param estimator: name used in error messages.
    :param opt_out_key: a site with ``infer={opt_out_key: False}`` is sampled normally and
        gets the plain score-function estimator.
    """

    def __init__(self, estimator: str, opt_out_key: str) -> None:
        super().__init__()
        self.estimator = estimator
        self.opt_out_key = opt_out_key
        self.result = HardPass()

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or msg["value"] is not None or site_is_subsample(msg):
            return
        name, fn = msg["name"], msg["fn"]
        kind = discrete_kind(fn)
        opted_out = msg["infer"].get(self.opt_out_key, True) is False
        if opted_out:
            # Sampled normally; relaxed passes replay its value (recorded after sampling).
            self.result.records[name] = SiteRecord(name, kind, False, None)
            return
        if kind == CATEGORICAL:
            raise EstimatorError(
                f"site {name!r}: {self.estimator} relaxes one-hot vectors, but this Categorical"
                " site is index-valued; use OneHotCategorical (and use the value"
                f" arithmetically), or opt the site out with infer={{{self.opt_out_key!r}: False}}"
            )
        if kind is not None:
            logits = full_logits(fn)
            u = draw_uniform(logits.shape, logits, name, "hard")
            noise = logistic_noise(u) if kind == BERNOULLI else gumbel_noise(u)
            value = harden(kind, logits.detach(), noise)
            msg["value"] = value
            self.result.records[name] = SiteRecord(name, kind, True, value, logits, noise)
            return
        if not fn.has_rsample:
            raise EstimatorError(
                f"site {name!r}: {type(fn).__name__} is continuous but not reparameterizable;"
                f" {self.estimator} needs pathwise gradients for continuous guide sites"
                f" (or opt the site out with infer={{{self.opt_out_key!r}: False}})"
            )
        # Pyro samples it, drawing exactly what Trace_ELBO draws; the relaxed passes redraw
        # it from the same RNG state (same noise, recomputed parameters).
        snapshot = RngSnapshot.take(_device_of(fn))
        self.result.records[name] = SiteRecord(name, None, False, None, seed=snapshot)

    def _pyro_post_sample(self, msg) -> None:
        if site_is_subsample(msg):
            self.result.subsamples[msg["name"]] = msg["value"]
            return
        record = self.result.records.get(msg["name"])
        if record is not None and record.value is None:
            record.value = msg["value"]


_INTEGER_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_NON_ARITHMETIC = {
    torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.__int__,
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy,
    torch.Tensor.long, torch.Tensor.int, torch.Tensor.short, torch.Tensor.byte,
    torch.Tensor.char, torch.Tensor.bool,
    torch.Tensor.nonzero, torch.nonzero, torch.Tensor.argmax, torch.argmax,
    torch.Tensor.__eq__, torch.Tensor.__ne__, torch.Tensor.eq, torch.Tensor.ne, torch.eq,
    torch.ne,
}


_SHAPE_OPS = {
    torch.Tensor.__getitem__, torch.Tensor.squeeze, torch.Tensor.unsqueeze,
    torch.Tensor.view, torch.Tensor.reshape, torch.Tensor.expand, torch.Tensor.expand_as,
    torch.Tensor.permute, torch.Tensor.transpose, torch.Tensor.t, torch.Tensor.flatten,
    torch.Tensor.contiguous, torch.Tensor.clone, torch.Tensor.select, torch.Tensor.narrow,
    torch.Tensor.unbind, torch.Tensor.split, torch.Tensor.chunk, torch.Tensor.movedim,
    torch.squeeze, torch.unsqueeze, torch.reshape, torch.flatten, torch.transpose,
    torch.unbind, torch.split, torch.chunk, torch.movedim, torch.permute,
}


_EQUALITY = {torch.Tensor.__eq__, torch.Tensor.__ne__, torch.Tensor.eq, torch.Tensor.ne,
             torch.eq, torch.ne}


class RelaxedValue(torch.Tensor):
    """A relaxed sample that refuses non-arithmetic use.

    Casting it to an integer or boolean, comparing it for equality, taking an argmax, or
    indexing with it would silently turn the relaxation into a step function (and the
    estimator biased), so these raise an :class:`EstimatorError` naming the site. Shape
    operations (indexing it, ``squeeze``, ``view``, ...) keep the mark; results of any
    other operation (arithmetic) are plain tensors, so a cast after arithmetic is not seen.
    """

    site_name: str = "?"
    estimator: str = "the estimator"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        offender = _non_arithmetic_use(func, args, kwargs)
        if offender is not None:
            raise EstimatorError(
                f"model uses site {offender.site_name!r} as an index/in control flow"
                f" ({getattr(func, '__name__', func)} of its relaxed value); "
                f"{offender.estimator} needs arithmetic use of discrete latents"
            )
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if func in _SHAPE_OPS and args and isinstance(args[0], RelaxedValue):
            return _mark_like(out, args[0])
        return out


def _mark_like(out, source: RelaxedValue):
    if isinstance(out, tuple | list):
        return type(out)(_mark_like(o, source) for o in out)
    if not torch.is_tensor(out):
        return out
    return mark_relaxed(out, source.site_name, source.estimator)


def _non_arithmetic_use(func, args, kwargs) -> RelaxedValue | None:
    first = args[0] if args else None
    if func in _NON_ARITHMETIC and isinstance(first, RelaxedValue):
        # ``value == value`` is the NaN check of torch's argument validation.
        if func in _EQUALITY and len(args) > 1 and args[1] is first:
            return None
        return first
    if func in (torch.Tensor.to, torch.Tensor.type) and isinstance(first, RelaxedValue):
        dtypes = [a for a in (*args[1:], *kwargs.values()) if isinstance(a, torch.dtype)]
        if any(d in _INTEGER_DTYPES for d in dtypes):
            return first
    if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) > 1:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        for item in index:
            if isinstance(item, RelaxedValue):
                return item
    return None


def mark_relaxed(value: torch.Tensor, site: str, estimator: str) -> RelaxedValue:
    marked = value.as_subclass(RelaxedValue)
    marked.site_name = site
    marked.estimator = estimator
    return marked


def hard_record(hard: HardPass, msg: dict) -> SiteRecord | None:
    """The hard pass's record of a relaxed pass's latent sample site; ``None`` for other sites.

    A subsample site is fixed to the hard pass's indices on the way, so that every pass
    sees the same mini-batch.
    """
    if site_is_subsample(msg):
        if msg["name"] in hard.subsamples:
            msg["value"] = hard.subsamples[msg["name"]]
        return None
    if msg["is_observed"]:
        return None
    return hard.records.get(msg["name"])


class RelaxedReplay(Messenger):
    """Replay the guide with relaxed discrete values built from ``noise``.

    Discrete sites to relax get ``relax(kind, logits', noise[name], temperature)`` where
    ``logits'`` is what the guide computes in this pass; their distribution is rebuilt to
    score relaxed values. With ``straight_through`` the value is the hard ``H(logits' + n)``
    in the forward pass with the relaxed gradient. Reparameterized continuous sites are
    redrawn with their recorded seed (same noise, recomputed parameters); other sites are
    replayed with their hard-pass value.

    With ``detach_scores`` a relaxed site's guide density ``q(sigma | ...)`` is evaluated
    with stop-gradient logits when those logits do not depend on the relaxed values of
    earlier sites: the control variate is then ``c(u, theta, theta_bar)`` with the
    density's parameters held fixed, still one differentiable function of the noise (so
    REBAR stays unbiased), minus a direct term ``-grad_theta log q_theta(sigma)`` that only
    adds variance. Logits computed from relaxed upstream values depend on the noise, and
    cutting them would cut the noise's path too: ``c`` would then be a different function
    at each draw and the estimator biased (measured on a two-layer guide), so those
    densities keep their full gradient (see :func:`detach_safe`).
    """

    def __init__(
        self,
        hard: HardPass,
        noise: dict[str, torch.Tensor],
        temperature,
        straight_through: bool = False,
        detach_scores: bool = False,
        estimator: str = "the estimator",
    ) -> None:
        super().__init__()
        self.estimator = estimator
        self.detach_scores = detach_scores
        self.hard = hard
        self.noise = noise
        self.temperature = temperature
        self.straight_through = straight_through
        self.relaxed_values: dict[str, torch.Tensor] = {}
        self._sampled_nodes: list = []  # autograd nodes of values sampled in this pass

    def _pyro_sample(self, msg) -> None:
        record = hard_record(self.hard, msg)
        if record is None:
            return
        if record.relaxed:
            logits = full_logits(msg["fn"])
            value = relax(record.kind, logits, self.noise[record.name], self.temperature)
            self.relaxed_values[record.name] = value
            if self.straight_through:
                hard = harden(record.kind, logits.detach(), self.noise[record.name].detach())
                value = hard + (value - value.detach())
            detach = self.detach_scores and detach_safe(logits, self._sampled_nodes)
            self._remember(value)
            msg["value"] = mark_relaxed(value, record.name, self.estimator)
            msg["fn"] = with_relaxed_scores(msg["fn"], detach=detach)
        elif record.seed is not None:
            with record.seed.replaying():
                msg["value"] = msg["fn"](*msg["args"], **msg["kwargs"])
            self._remember(msg["value"])
        else:
            msg["value"] = record.value

    def _remember(self, value: torch.Tensor) -> None:
        if value.grad_fn is not None:
            self._sampled_nodes.append(value.grad_fn)


def detach_safe(logits: torch.Tensor, sampled_nodes: list) -> bool:
    """Whether a relaxed pass may evaluate a site's guide density with stop-gradient
    ``logits``: only if they do not depend on values sampled earlier in the same pass
    (given by their autograd nodes), as those depend on the noise."""
    if not sampled_nodes or logits.grad_fn is None:
        return True
    targets = set(sampled_nodes)
    return not any(node in targets for node in autograd_nodes([logits.grad_fn]))


class RelaxedScores(Messenger):
    """In the model, score the relaxed sites with the continuous extension of log p (and,
    given the ``hard`` pass, draw its mini-batch where no guide trace replays it)."""

    def __init__(self, names: Iterable[str], hard: HardPass | None = None) -> None:
        super().__init__()
        self.names = set(names)
        self.hard = hard

    def _pyro_sample(self, msg) -> None:
        if self.hard is not None and site_is_subsample(msg):
            hard_record(self.hard, msg)
        elif msg["name"] in self.names and not msg["is_observed"]:
            msg["fn"] = with_relaxed_scores(msg["fn"])


# --------------------------------------------------------------------------------------
# Traces
# --------------------------------------------------------------------------------------


def hard_traces(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    max_plate_nesting: float,
    estimator: str,
    opt_out_key: str,
):
    """Pyro's ``get_importance_trace`` with the guide sampled by noise, and Pyro's checks
    of a Monte-Carlo ELBO (``Trace_ELBO._get_trace``): model/guide match, site shapes and
    a warning for sites marked for enumeration, which are sampled."""
    sampler = HardSampler(estimator, opt_out_key)
    model_trace, guide_trace = get_importance_trace(
        "flat", max_plate_nesting, model, sampler(guide), args, kwargs
    )
    if is_validation_enabled():
        check_if_enumerated(guide_trace)
    return model_trace, guide_trace, sampler.result


def relaxed_traces(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    hard: HardPass,
    noise: dict[str, torch.Tensor],
    temperature,
    estimator: str,
    straight_through: bool = False,
    detach_scores: bool = False,
):
    """Model and guide traces of one relaxed pass, log-probabilities computed.

    Any exception raised while the model or guide runs on relaxed values is re-raised as
    an :class:`EstimatorError` naming the site that triggers it.
    """
    try:
        return _relaxed_traces(model, guide, args, kwargs, hard, noise, temperature,
                               straight_through, detach_scores, estimator)
    except (IndexError, RuntimeError, TypeError, ValueError) as error:
        if isinstance(error, EstimatorError):
            raise
        culprit = _find_culprit(model, guide, args, kwargs, hard, noise, temperature)
        raise EstimatorError(
            f"model uses site {culprit!r} as an index/in control flow; {estimator} needs"
            f" arithmetic use of discrete latents (running on a relaxed value in (0, 1) of"
            f" site {culprit!r} failed with {type(error).__name__}: {error})"
        ) from error


def _relaxed_traces(
    model, guide, args, kwargs, hard, noise, temperature, straight_through,
    detach_scores=False, estimator="the estimator",
):
    replay = RelaxedReplay(hard, noise, temperature, straight_through, detach_scores, estimator)
    guide_trace = poutine.trace(replay(guide)).get_trace(*args, **kwargs)
    names = [r.name for r in hard.relaxed]
    model_trace = poutine.trace(
        RelaxedScores(names)(poutine.replay(model, trace=guide_trace))
    ).get_trace(*args, **kwargs)
    guide_trace = prune_subsample_sites(guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    return model_trace, guide_trace, replay.relaxed_values


# --------------------------------------------------------------------------------------
# The two relaxed passes fused into one evaluation (the fast path)
# --------------------------------------------------------------------------------------

PASS_PLATE = "_lvmkit_passes"
FUSED_PASSES = 2  # relaxed from the hard noise, relaxed from the conditional noise


class NotFusable(Exception):
    """The fused pass cannot run this model and guide (a site it does not handle)."""


class FusedRelaxedReplay(Messenger):
    """Replay the guide for both relaxed passes at once.

    Runs inside ``pyro.plate(PASS_PLATE, 2, dim=pass_dim)``, so each site's distribution
    carries the pass dimension. At a relaxed site with logits ``L`` (pass ``k`` is
    ``L[k]``, recomputed by the guide from pass ``k``'s upstream values) the value is
    ``sigma_lambda(L[k] + n_k)`` with ``n_0`` the hard pass's noise and ``n_1`` the
    conditional noise ``n~ ~ p(n | b)``, exactly as two :class:`RelaxedReplay` passes
    with ``detach_scores=True`` would give; subsample sites get the hard pass's indices.

    Raises :class:`NotFusable` at a site it does not handle (continuous or opted-out
    latents, a site without the pass dimension): the reference path handles those.
    """

    def __init__(
        self,
        hard: HardPass,
        noises: list[dict[str, torch.Tensor]],
        temperature,
        pass_dim: int,
        estimator: str,
    ) -> None:
        super().__init__()
        self.hard = hard
        self.noises = noises
        self.temperature = temperature
        self.pass_dim = pass_dim
        self.estimator = estimator
        self.relaxed_values: list[dict[str, torch.Tensor]] = [{} for _ in noises]
        self._sampled_nodes: list = []

    def _pyro_sample(self, msg) -> None:
        record = hard_record(self.hard, msg)
        if record is None:
            return
        name, fn = msg["name"], msg["fn"]
        if not record.relaxed:
            raise NotFusable(name)
        logits = full_logits(fn)
        axis = self.pass_dim - fn.event_dim  # the pass dimension, counted from the right
        if logits.dim() < -axis or logits.shape[axis] != FUSED_PASSES:
            raise NotFusable(name)
        # A global site's rows may carry leading singleton dimensions the hard pass lacks.
        row = logits.select(axis, 0).shape
        noise = torch.stack([n[name].reshape(row) for n in self.noises], dim=axis)
        value = relax(record.kind, logits, noise, self.temperature)
        for k, values in enumerate(self.relaxed_values):
            values[name] = value.select(axis, k)
        detach = detach_safe(logits, self._sampled_nodes)
        if value.grad_fn is not None:
            self._sampled_nodes.append(value.grad_fn)
        msg["value"] = mark_relaxed(value, name, self.estimator)
        msg["fn"] = with_relaxed_scores(fn, detach=detach)


def fused_traces(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    hard: HardPass,
    noises: list[dict[str, torch.Tensor]],
    temperature,
    pass_dim: int,
    estimator: str,
) -> list[tuple]:
    """Both relaxed passes of REBAR in one model and guide evaluation.

    Both run inside ``pyro.plate(PASS_PLATE, 2, dim=pass_dim)`` (left of every plate of
    the model, as Pyro's vectorized particles are), with :class:`FusedRelaxedReplay` on
    the guide and relaxed sites scored by their continuous extension in the model.
    Returns ``[(model_trace, guide_trace, relaxed_values)] * 2`` like two calls of
    :func:`relaxed_traces`, where every trace is a view of one pass (its slice of each
    site's log-probability, the pass plate removed from the plate stacks). This saves one
    model and guide evaluation per step and runs the networks on one bigger batch; the
    hard pass stays separate, so the model's gradient and the score terms are computed on
    its rows alone.

    Raises :class:`NotFusable` when a site is not handled or a site's log-probability
    lacks the pass dimension; whatever the model or guide raise on the stacked values
    propagates (the caller decides once per model and guide whether to fuse, see
    ``RebarELBO``).
    """
    replay = FusedRelaxedReplay(hard, noises, temperature, pass_dim, estimator)
    passes = pyro.plate(PASS_PLATE, FUSED_PASSES, dim=pass_dim)
    # The replay sits outside the plate so that it sees the broadcast distributions.
    guide_trace = poutine.trace(replay(passes(guide))).get_trace(*args, **kwargs)
    return _fused_model_views(model, guide_trace, args, kwargs, hard, replay.relaxed_values,
                              pass_dim)


def _fused_model_views(model, guide_trace, args, kwargs, hard: HardPass,
                       relaxed_values: list[dict[str, torch.Tensor]], pass_dim: int
                       ) -> list[tuple]:
    """The model replayed on a fused relaxed ``guide_trace`` inside the pass plate (on the
    hard pass's mini-batch), both traces scored, and each pass's view of them with its
    relaxed values: the return value of :func:`fused_traces`."""
    passes = pyro.plate(PASS_PLATE, FUSED_PASSES, dim=pass_dim)
    model_trace = poutine.trace(
        # Replay outside the plate: it marks sites done, which stops broadcasting.
        RelaxedScores([r.name for r in hard.relaxed], hard)(
            poutine.replay(passes(model), trace=guide_trace))
    ).get_trace(*args, **kwargs)
    guide_trace = prune_subsample_sites(guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    # Only our relaxed-score distributions see the marked values here, so the guard
    # against non-arithmetic use (a Python call per torch op) can be off.
    with torch._C.DisableTorchFunctionSubclass():
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        return [
            (_fused_view(model_trace, pass_dim, k), _fused_view(guide_trace, pass_dim, k),
             relaxed_values[k])
            for k in range(FUSED_PASSES)
        ]


def guide_is_reusable(guide: Callable, args: tuple, kwargs: dict, hard: HardPass,
                      guide_trace, noise: dict[str, torch.Tensor], temperature) -> bool:
    """Whether the relaxed passes may reuse the hard pass's guide logits instead of
    running the guide again: its only sample sites are relaxed latents and no site's
    logits depend on another site's value (a one-layer encoder, as in the hand-written
    REBAR). Checked by running the guide once with every relaxed value a fresh leaf
    tensor: a site whose logits reach an earlier leaf in the autograd graph, or differ
    from the hard pass's logits (a dependence that the graph does not show), is not
    reusable. Not a ``try``: the guide ran on these relaxed values in the reference pass.
    """
    latents = {r.name for r in hard.relaxed}
    sample_sites = {name for name, site in guide_trace.nodes.items()
                    if site["type"] == "sample" and not site_is_subsample(site)}
    if sample_sites != latents or not hard.all_relaxed:
        return False
    probe = _LogitsProbe(hard, noise, temperature)
    # with grad on even when the caller's first call has it off (a validation loss under
    # torch.no_grad()): without a graph a dependence is visible only in the values
    with poutine.block(), torch.enable_grad():
        poutine.trace(probe(guide)).get_trace(*args, **kwargs)
    return probe.independent


class _LogitsProbe(Messenger):
    """Replay the guide with relaxed values as fresh leaves; note any site whose logits
    depend on an earlier one (see :func:`guide_is_reusable`)."""

    def __init__(self, hard: HardPass, noise: dict[str, torch.Tensor], temperature) -> None:
        super().__init__()
        self.hard, self.noise, self.temperature = hard, noise, temperature
        self.leaves: list[torch.Tensor] = []
        self.independent = True

    def _pyro_sample(self, msg) -> None:
        record = hard_record(self.hard, msg)
        if record is None:
            return
        logits = full_logits(msg["fn"])
        if self.leaves and any(any(leaf is found for found in graph_leaves([logits]))
                               for leaf in self.leaves):
            self.independent = False
        with torch._C.DisableTorchFunctionSubclass():
            same = (logits.shape == record.logits.shape
                    and torch.equal(logits.detach(), record.logits.detach()))
        self.independent &= same
        value = relax(record.kind, logits.detach(), self.noise[record.name],
                      self.temperature).detach().requires_grad_()
        self.leaves.append(value)
        msg["value"] = value
        msg["fn"] = with_relaxed_scores(msg["fn"], detach=True)


def reused_guide_traces(
    model: Callable,
    guide_trace,
    args: tuple,
    kwargs: dict,
    hard: HardPass,
    noises: list[dict[str, torch.Tensor]],
    temperature,
    pass_dim: int,
    estimator: str,
) -> list[tuple]:
    """Both relaxed passes of REBAR with the guide not run again: what
    :func:`fused_traces` returns, for a guide that :func:`guide_is_reusable` accepts.

    The relaxed values are ``sigma_lambda(L + n_k)`` with ``L`` the hard pass's logits
    (one autograd graph for all three passes, as in the hand-written REBAR), stacked along
    the pass dimension; each guide site keeps the hard pass's distribution, rebuilt to
    score relaxed values with stop-gradient logits (as :class:`RelaxedReplay` does with
    ``detach_scores``). Only the model runs, inside the pass plate, on 2 x B rows.
    """
    relaxed_trace = poutine.Trace(graph_type=guide_trace.graph_type)
    values: list[dict[str, torch.Tensor]] = [{} for _ in noises]
    for record in hard.relaxed:
        site = guide_trace.nodes[record.name]
        axis = pass_dim - site["fn"].event_dim  # the pass dimension, counted from the right
        logits = record.logits
        # a global site gets the leading singleton dimensions that the plates would give
        row = (1,) * max(0, -axis - 1 - logits.dim()) + tuple(logits.shape)
        noise = torch.stack([n[record.name].reshape(row) for n in noises], dim=axis)
        value = relax(record.kind, logits.reshape(row), noise, temperature)
        for k, by_name in enumerate(values):
            by_name[record.name] = value.select(axis, k)
        fields = {key: v for key, v in site.items()
                  if key not in ("value", "fn", "log_prob", "log_prob_sum",
                                 "unscaled_log_prob", "score_parts")}
        relaxed_trace.add_node(
            record.name, **dict(fields, value=mark_relaxed(value, record.name, estimator),
                                fn=with_relaxed_scores(site["fn"], detach=True)))
    return _fused_model_views(model, relaxed_trace, args, kwargs, hard, values, pass_dim)


def _fused_view(trace, pass_dim: int, index: int):
    """A copy of a fused ``trace`` holding pass ``index`` of every sample site."""
    view = poutine.Trace(graph_type=trace.graph_type)
    for name, site in trace.nodes.items():
        if site["type"] == "sample":
            log_prob = site["log_prob"]
            if log_prob.dim() < -pass_dim or log_prob.shape[pass_dim] != FUSED_PASSES:
                raise NotFusable(f"site {name!r} does not carry the pass dimension")
            site = dict(
                site,
                log_prob=log_prob.select(pass_dim, index),
                unscaled_log_prob=site["unscaled_log_prob"].select(pass_dim, index),
                cond_indep_stack=tuple(
                    f for f in site["cond_indep_stack"] if f.name != PASS_PLATE
                ),
                value=_select_pass(site["value"], pass_dim - site["fn"].event_dim, index),
            )
            site["log_prob_sum"] = site["log_prob"].sum()
        view.nodes[name] = site
    return view


def _select_pass(value, axis: int, index: int):
    if torch.is_tensor(value) and value.dim() >= -axis and value.shape[axis] == FUSED_PASSES:
        return value.select(axis, index)
    return value


def _find_culprit(model, guide, args, kwargs, hard, noise, temperature) -> str:
    """The first relaxed site whose relaxation alone makes the model or guide fail."""
    relaxed = hard.relaxed
    for record in relaxed:
        only = HardPass({
            name: (r if name == record.name else SiteRecord(name, r.kind, False, r.value,
                                                            seed=r.seed))
            for name, r in hard.records.items()
        }, subsamples=hard.subsamples)
        try:
            _relaxed_traces(model, guide, args, kwargs, only, noise, temperature, False)
        except (IndexError, RuntimeError, TypeError, ValueError):
            return record.name
    return "+".join(r.name for r in relaxed)


def log_weight_terms(model_trace, guide_trace, detach: bool) -> MultiFrameTensor:
    """``log p - log q`` per site, keyed by plate frames (for Rao-Blackwellization)."""
    terms = MultiFrameTensor()
    stacks = get_plate_stacks(model_trace)
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        term = site["log_prob"]
        if not site["is_observed"] and name in guide_trace.nodes:
            term = term - guide_trace.nodes[name]["log_prob"]
        terms.add((stacks[name], term.detach() if detach else term))
    return terms


def elbo_integrand(model_trace, guide_trace) -> torch.Tensor:
    """``log p(x, z) - log q(z | x)`` summed over the trace (scales and masks applied)."""
    return model_trace.log_prob_sum() - guide_trace.log_prob_sum()


def autograd_nodes(roots: Iterable, stops: Iterable = ()) -> Iterator:
    """The autograd nodes reachable from the nodes ``roots``, each once (depth first), not
    looking past the nodes in ``stops``."""
    stack, seen = list(roots), set(stops)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)


def graph_leaves(tensors: Iterable[torch.Tensor], stops: Iterable = ()) -> list[torch.Tensor]:
    """Leaf tensors requiring grad that ``tensors`` depend on (in discovery order), not
    looking past the autograd nodes in ``stops``."""
    found: dict[int, torch.Tensor] = {}
    roots = []
    for t in tensors:
        if not torch.is_tensor(t) or not t.requires_grad:
            continue
        if t.grad_fn is None:
            found.setdefault(id(t), t)
        else:
            roots.append(t.grad_fn)
    for node in autograd_nodes(roots, stops):
        variable = getattr(node, "variable", None)
        if variable is not None:
            found.setdefault(id(variable), variable)
    return list(found.values())
