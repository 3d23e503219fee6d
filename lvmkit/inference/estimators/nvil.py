"""NVIL: score-function gradients with an input-dependent baseline (Mnih & Gregor, 2014).

Also holds the small trace helpers that the other score-function-style estimators of this
package (:mod:`~lvmkit.inference.estimators.vimco`, :mod:`~lvmkit.inference.estimators.arm`)
share.
"""

from __future__ import annotations

import itertools
import math

import pyro
import torch
from pyro.distributions.util import is_identically_zero
from pyro.infer import Trace_ELBO
from pyro.infer.trace_elbo import _compute_log_r
from pyro.infer.util import torch_item
from pyro.params import param_with_module_name
from pyro.poutine.util import site_is_subsample
from torch import nn

from lvmkit.inference.estimators import EstimatorError
from lvmkit.inference.estimators.sites import PARTICLE_PLATE, discrete_kind, innermost  # noqa: F401

__all__ = ["NVILELBO"]

_instance_ids = itertools.count()


def latent_guide_sites(guide_trace) -> list[tuple[str, dict]]:
    """The guide's latent sample sites in execution order (no subsample sites)."""
    return [
        (name, site)
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    ]


def model_terms(model_trace) -> tuple[float, torch.Tensor | float]:
    """``(value, surrogate)`` of ``sum log p`` over the model's sample sites, as
    ``Trace_ELBO`` starts its ELBO and its surrogate."""
    value = 0.0
    surrogate = 0.0
    for site in model_trace.nodes.values():
        if site["type"] == "sample":
            value = value + torch_item(site["log_prob_sum"])
            surrogate = surrogate + site["log_prob_sum"]
    return value, surrogate


def refuse_enumerated(name: str, site: dict, estimator: str) -> None:
    """Raise if ``site`` asks for enumeration, which these Monte-Carlo estimators ignore."""
    if site["infer"].get("enumerate"):
        raise EstimatorError(
            f"site {name!r}: {estimator} draws Monte-Carlo samples and does not support "
            f"infer={{'enumerate': {site['infer']['enumerate']!r}}}; use TraceEnum_ELBO"
        )


def data_frame(guide_trace, x: torch.Tensor | None):
    """The vectorized plate frame indexing the rows of ``x``, or ``None``.

    The lvmkit convention names it ``"data"``; otherwise any vectorized plate whose
    (subsample) size equals ``x.shape[0]`` is taken.
    """
    if x is None or x.dim() == 0:
        return None
    frames = {
        frame
        for _, site in latent_guide_sites(guide_trace)
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.name != PARTICLE_PLATE and frame.size == x.shape[0]
    }
    named = [f for f in frames if f.name == "data"]
    if named:
        return named[0]
    return min(frames, key=lambda f: f.dim, default=None)


def _first_tensor(args: tuple) -> torch.Tensor | None:
    return next((a for a in args if torch.is_tensor(a)), None)


def _first_batch_moments(signal: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Centring and variance for the first call, before any running statistics exist.

    Each signal is centred on the mean of the *other* signals of the batch (independent of
    its own latent draw, so the score term stays unbiased) and the variance is the batch's.
    The running defaults (0 and 1) would make the first step's score term orders of
    magnitude larger than every later one (learning signals here are in the thousands of
    nats once scaled by N / batch size), and Adam's second-moment estimate would remember
    it for thousands of steps: measured on the nonlinear SBN (MNIST-5k, batch 24), the
    normalised NVIL then never left the independent-pixel plateau in 800 steps.
    """
    flat = signal.reshape(-1)
    n = flat.numel()
    if n < 2:
        return torch.zeros_like(signal), 0.0
    leave_one_out = ((flat.sum() - flat) / (n - 1)).reshape(signal.shape)
    return leave_one_out, float(flat.var(unbiased=False))


class _RunningMoments(nn.Module):
    """Exponential moving mean and variance of the centred learning signal (buffers)."""

    def __init__(self, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("var", torch.ones(()))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, signal: torch.Tensor) -> None:
        # The statistics stay where they were made (their reads are host-side scalars).
        signal = signal.detach().to(device=self.mean.device, dtype=self.mean.dtype)
        batch_mean = signal.mean()
        batch_var = signal.var(unbiased=False) if signal.numel() > 1 else torch.zeros(())
        if int(self.count) == 0:
            # The first batch initialises the statistics instead of decaying from 0 / 1.
            self.mean.copy_(batch_mean)
            self.var.copy_(batch_var)
        else:
            self.mean.mul_(self.decay).add_((1 - self.decay) * batch_mean)
            self.var.mul_(self.decay).add_((1 - self.decay) * batch_var)
        self.count += 1


class NVILELBO(Trace_ELBO, nn.Module):
    """Score-function ELBO gradient with NVIL variance reduction (Mnih & Gregor, 2014).

    For every non-reparameterized guide site ``z`` (any distribution, discrete or not),
    the surrogate objective replaces Trace_ELBO's learning signal
    ``l = log p(x, z) - log q(z | x)`` (Rao-Blackwellised by plate, as in ``Trace_ELBO``) by

    .. math::

        \\hat l(x, z) = \\frac{l(x, z) - s\\,C_\\psi(x) - c}{\\max(1, \\sqrt{v})},

    where ``C_psi`` is a small MLP on the guide's first tensor argument ``x`` (one output
    per datum of the ``"data"`` plate; ``s`` is the sites' subsampling scale), ``c`` and
    ``v`` are exponential moving averages (decay ``decay``, 0.8 in the paper) of the mean
    and variance of ``l - s C_psi(x)``. A site outside the data plate sees the baseline
    summed over the data. Reparameterized sites keep their pathwise gradient.

    The baseline is fitted by squared error: the surrogate loss contains
    ``sum (l - s C_psi(x) - c)^2`` with ``l`` detached, so it moves only ``psi``. The net is
    registered with ``pyro.module`` under ``self.module_name`` on first use, so ``SVI``'s
    optimizer updates it; the estimator is also an ``nn.Module``, so
    ``elbo(model, guide).parameters()`` includes it after the first call (pass ``x_dim`` to
    create it eagerly, before building a plain torch optimizer).

    Bias: ``C_psi(x)`` and ``c`` do not depend on the current ``z`` (``c`` and ``v`` are
    updated only *after* use; on the very first call, before any statistics exist, each
    signal is centred on the mean of the batch's *other* signals and ``v`` is the batch
    variance), so centring keeps the estimator unbiased, and the default
    (``normalize=False``) is an unbiased ELBO gradient. The paper's variance normalisation
    (``normalize=True``) divides the score term by ``max(1, sqrt(v))``: a data-dependent
    positive step-size adaptation of the score term alone, not of the pathwise and model
    terms beside it, so the normalised estimate is **biased** whenever ``v > 1``: it is not
    the gradient of any one objective. Measured with
    :func:`~lvmkit.inference.check.check_unbiased` on a guide with a Bernoulli and a Normal
    site per datum (scaled by 20): max ``|z|`` 20 normalised, 1.8 unnormalised (threshold
    4.2); tests/test_nvil.py keeps both.

    :param normalize: divide the centred signal by ``max(1, sqrt(v))`` (Mnih & Gregor
        2014; biased, see above). Off by default.
    :param decay: decay of the running mean and variance.
    :param hidden: tanh units of the baseline MLP (100 in the paper).
    :param x_dim: input size of the baseline; inferred from the first call if ``None``.
    :param module_name: param-store name of the baseline net (unique per instance).

    Example: one SVI step on a small sigmoid belief net.

    >>> import pyro
    >>> import torch
    >>> from lvmkit.inference import NVILELBO
    >>> from lvmkit.models import build
    >>> model, guide = build("sbn-linear", x_dim=4, layers=(3,))
    >>> x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    >>> elbo = NVILELBO(x_dim=4)  # the baseline net exists now, before the first step
    >>> sum(p.numel() for p in elbo.parameters())
    601
    >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=elbo)
    >>> isinstance(svi.step(x), float)
    True
    """

    objective = "elbo"  # unbiased for the ELBO's gradient with normalize=False

    def __init__(
        self,
        num_particles: int = 1,
        *,
        normalize: bool = False,
        decay: float = 0.8,
        hidden: int = 100,
        x_dim: int | None = None,
        module_name: str | None = None,
        **kwargs,
    ) -> None:
        nn.Module.__init__(self)
        Trace_ELBO.__init__(self, num_particles=num_particles, **kwargs)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if hidden < 1:
            raise ValueError(f"hidden must be a positive number of units, got {hidden}")
        self.normalize = normalize
        self.hidden = hidden
        self.module_name = module_name or f"nvil_baseline_{next(_instance_ids)}"
        self.moments = _RunningMoments(decay)
        self.baseline_net: nn.Module | None = None
        self._x: torch.Tensor | None = None
        if x_dim is not None:
            self._build_baseline(x_dim)

    def _build_baseline(self, x_dim: int) -> None:
        net = nn.Sequential(nn.Linear(x_dim, self.hidden), nn.Tanh(), nn.Linear(self.hidden, 1))
        # A zero output layer makes the initial baseline exactly the running mean.
        nn.init.zeros_(net[-1].weight)
        nn.init.zeros_(net[-1].bias)
        self.baseline_net = net

    def get_extra_state(self) -> dict:
        # saved with the net, so a restored estimator keeps the param-store names (and so
        # the optimizer state) of the run that saved it
        return {"module_name": self.module_name}

    def set_extra_state(self, state: dict) -> None:
        self.module_name = state["module_name"]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, creating the baseline net a saved state holds
        (it is otherwise built on the first call) and registering it in Pyro's param store
        under ``module_name``, so that the store, and so ``SVI``'s optimizer, hold the net's
        own tensors. :func:`lvmkit.inference.fit` calls it when it resumes, before it loads
        the store's saved values into those tensors."""
        weight = state_dict.get("baseline_net.0.weight")
        if weight is not None and self.baseline_net is None:
            self._build_baseline(weight.shape[1])
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if self.baseline_net is not None:
            store = pyro.get_param_store()
            for name, _ in self.baseline_net.named_parameters():
                # a stale entry would shadow the net's own tensor (pyro.module keeps it)
                full_name = param_with_module_name(self.module_name, name)
                if full_name in store:
                    del store[full_name]
            pyro.module(self.module_name, self.baseline_net)
        return result

    def _get_traces(self, model, guide, args, kwargs):
        self._x = _first_tensor(args)
        yield from super()._get_traces(model, guide, args, kwargs)

    def _baseline(self, x: torch.Tensor) -> torch.Tensor:
        """``C_psi(x)``, one value per row of ``x``."""
        flat = x.reshape(x.shape[0], -1)
        if self.baseline_net is None:
            self._build_baseline(flat.shape[1])
        if self.baseline_net[0].weight.device != x.device:
            # in place (the parameters stay the same objects, as the param store needs)
            self.baseline_net.to(x.device)
        net = pyro.module(self.module_name, self.baseline_net)
        if net[0].in_features != flat.shape[1]:
            raise EstimatorError(
                f"NVIL baseline was built for inputs of size {net[0].in_features}, "
                f"got x of shape {tuple(x.shape)}"
            )
        return net(flat.to(net[0].weight.dtype)).squeeze(-1)

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        elbo_particle, surrogate = model_terms(model_trace)

        score_sites = []
        for name, site in latent_guide_sites(guide_trace):
            refuse_enumerated(name, site, "NVILELBO")
            _, score_term, entropy_term = site["score_parts"]
            elbo_particle = elbo_particle - torch_item(site["log_prob_sum"])
            if not is_identically_zero(entropy_term):
                surrogate = surrogate - entropy_term.sum()
            if not is_identically_zero(score_term):
                score_sites.append((name, site, score_term))

        if score_sites:
            surrogate = surrogate + self._score_surrogate(model_trace, guide_trace, score_sites)
        return -elbo_particle, -surrogate

    def _score_surrogate(self, model_trace, guide_trace, score_sites) -> torch.Tensor:
        log_r = _compute_log_r(model_trace, guide_trace)
        frame = data_frame(guide_trace, self._x)
        # One signal per datum and per vectorized particle.
        frames = tuple(
            f
            for f in score_sites[0][1]["cond_indep_stack"]
            if f.name == PARTICLE_PLATE and f.vectorized
        ) + ((frame,) if frame is not None else ())
        per_datum = log_r.sum_to(frames)
        if not torch.is_tensor(per_datum):
            per_datum = torch.as_tensor(per_datum)
        if frame is not None:
            scale = _scalar_scale(*score_sites[0][:2])
            # Put the baseline's data axis at the plate's dim so it broadcasts like the signal.
            baseline = scale * self._baseline(self._x).reshape((-1,) + (1,) * (-1 - frame.dim))
        else:
            baseline = per_datum.new_zeros(())
        if int(self.moments.count) == 0:
            c, var = _first_batch_moments(per_datum.detach() - baseline.detach())
        else:
            c, var = self.moments.mean.to(per_datum.dtype), float(self.moments.var)
        shift = baseline + c
        residual = per_datum.detach() - shift
        baseline_loss = residual.pow(2).sum()
        divisor = max(1.0, math.sqrt(var)) if self.normalize else 1.0
        self.moments.update((per_datum.detach() - baseline.detach()).reshape(-1))

        surrogate = -baseline_loss
        for _, site, score_term in score_sites:
            signal = log_r.sum_to(site["cond_indep_stack"])
            site_shift = shift.detach()
            if frame is not None and frame not in site["cond_indep_stack"]:
                site_shift = site_shift.expand(per_datum.shape).sum(frame.dim, keepdim=True)
            learning_signal = (signal - site_shift) / divisor
            surrogate = surrogate + (learning_signal.detach() * score_term).sum()
        return surrogate


def _scalar_scale(name: str, site: dict) -> float:
    """The site's scale as a float (the data-dependent baseline is scaled by it); a tensor
    scale with several elements (``poutine.scale`` by a weight per datum) is refused
    rather than collapsed."""
    scale = site["scale"]
    if torch.is_tensor(scale) and scale.numel() != 1:
        raise EstimatorError(
            f"site {name!r}: NVILELBO scales its per-datum baseline network by the site's"
            f" scale, which must be a scalar; got a tensor of shape {tuple(scale.shape)}"
            " (poutine.scale)"
        )
    return float(scale)
