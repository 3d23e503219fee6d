"""REBAR: unbiased, low-variance gradients for discrete latent variables.

Tucker, Mnih, Maddison, Lawson, Sohl-Dickstein. "REBAR: Low-variance, unbiased gradient
estimates for discrete latent variable models." NeurIPS 2017.

For a discrete guide site ``b = H(z)``, ``z = logits + logit(u)`` (Gumbel noise for one-hot
sites), a conditional relaxed sample ``z~ ~ p(z | b)`` and the relaxed ELBO integrand
``c(z) = f(sigma_lambda(z))`` where ``f = log p(x, .) - log q(. | x)``, the estimator of
the ELBO gradient is

.. math::

    \\hat g = [f(b) - \\eta\\, c(\\tilde z)]\\, \\nabla \\log q(b)
        + \\eta \\nabla c(z) - \\eta \\nabla c(\\tilde z) + \\nabla f(b),

unbiased for every ``eta`` and ``lambda`` because ``E[c(z~) grad log q(b)] +
E[grad c(z~)] = grad E[c(z)]``. ``eta`` and ``lambda`` are tuned online by descending
``||g||^2`` (whose expectation is the variance plus a constant), as in the reference code
(tensorflow/models, research/rebar).

The estimator follows Pyro's ``Trace_ELBO`` template: :meth:`RebarELBO._get_trace` runs
one particle's three passes (hard, relaxed, conditional relaxed) and
:meth:`RebarELBO._differentiable_loss_particle` turns them into a loss and a surrogate;
``Trace_ELBO`` runs the particles (vectorized or not) and the entry points.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.elbo import ELBOModule
from pyro.infer.util import MultiFrameTensor
from pyro.params import param_with_module_name

from lvmkit.inference.estimators import EstimatorError
from lvmkit.inference.estimators._pairs import PairDecisions
from lvmkit.inference.estimators._relax import (
    BERNOULLI,
    HardPass,
    NotFusable,
    StepNoise,
    conditional_gumbel_noise,
    conditional_logistic_noise,
    draw_uniform,
    elbo_integrand,
    fused_traces,
    graph_leaves,
    guide_is_reusable,
    hard_traces,
    log_weight_terms,
    plate_nesting,
    relaxed_traces,
    reused_guide_traces,
)
from lvmkit.inference.estimators.variance import GradientVariance

__all__ = ["RebarELBO"]

_instance_ids = itertools.count()


def _log_prob_difference(expected, got) -> str | None:
    """Where two traces differ in their sample sites or their log-probabilities (``None``
    where they agree): the first site that differs, and how."""
    sites = [n for n, s in expected.nodes.items() if s["type"] == "sample"]
    others = [n for n, s in got.nodes.items() if s["type"] == "sample"]
    if sites != others:
        return f"the sample sites {others} differ from the separate passes' {sites}"
    for name in sites:
        a, b = expected.nodes[name]["log_prob"], got.nodes[name]["log_prob"]
        # The fused pass's plate may leave leading singleton dimensions (a global site).
        if a.shape != b.shape and (a.dim() > b.dim() or b.shape[b.dim() - a.dim():] != a.shape
                                   or b.numel() != a.numel()):
            return (f"site {name!r} has log-probability shape {tuple(b.shape)} per pass,"
                    f" {tuple(a.shape)} in the separate passes")
        with torch._C.DisableTorchFunctionSubclass():
            if not torch.allclose(a.detach(), b.detach().reshape(a.shape), rtol=1e-4,
                                  atol=1e-5):
                return f"site {name!r} has another log-probability than in the separate passes"
    return None


class ControlParameters(torch.nn.Module):
    """What a REBAR-type estimator learns: log temperature, eta logits, a control net.

    A ``torch.nn.Module``, so that ``elbo(model, guide)`` (the ``nn.Module`` form used by
    Lightning or DDP) exposes these as parameters of the returned module; the estimator
    also registers its learnable ones in Pyro's param store on every call, so that
    ``SVI``'s optimizer steps them.
    """

    def __init__(self, temperature: float, learn_temperature: bool) -> None:
        super().__init__()
        self.log_temperature = torch.nn.Parameter(
            torch.tensor(math.log(temperature)), requires_grad=learn_temperature
        )
        self.eta_logits = torch.nn.ParameterDict()
        self.net: torch.nn.Module | None = None
        self.group_nets = torch.nn.ModuleDict()  # RELAX: one net per other plate group


class _ELBOModuleWithControls(ELBOModule):
    def __init__(self, model, guide, elbo: RebarELBO) -> None:
        super().__init__(model, guide, elbo)
        self.controls = elbo.controls


@dataclass
class _Particle:
    """What ``_differentiable_loss_particle`` needs beside the hard traces: the hard
    pass's records and the two relaxed passes ``[(model_trace, guide_trace, values)]``."""

    hard: HardPass
    passes: list | None
    model: Callable
    guide: Callable


@dataclass
class _Estimate:
    # (leaf, gradient of the ELBO) pairs of the estimate
    grads: list[tuple[torch.Tensor, torch.Tensor]]
    # (control parameter, gradient of the variance objective) pairs; empty if not learning
    control_grads: list[tuple[torch.Tensor, torch.Tensor]]


def _score_weight(terms: MultiFrameTensor, site: dict) -> torch.Tensor:
    return terms.sum_to(site["cond_indep_stack"])


_REFERENCE = "reference"  # the decision for a pair that runs the separate passes


@dataclass(frozen=True)
class _FastPath:
    """The decision for a pair that runs the fast path."""

    pass_dim: int  # where the pass plate goes: left of every plate of the model
    # the guide's latent sites on the first call, in order; every call must have them
    sites: tuple[str, ...]
    # the relaxed passes reuse the hard pass's guide logits (None: not checked yet)
    reuse_guide: bool | None = None


class RebarELBO(Trace_ELBO):
    """REBAR estimator (Tucker et al. 2017) as a drop-in ``Trace_ELBO``.

    Discrete guide sites (``Bernoulli`` / ``OneHotCategorical``, also under ``.to_event``,
    ``.expand``, ``.mask``) are found from the guide trace and relaxed; a site with
    ``infer={"rebar": False}`` keeps the plain score-function estimator. Reparameterized
    continuous guide sites use their pathwise gradient and keep their noise in the relaxed
    passes. The score-function terms are Rao-Blackwellized by plate as in ``Trace_ELBO``,
    and the control variate's score weight ``c(z~)`` is summed the same way.

    Multi-layer guides: the relaxed passes replay the guide with relaxed upstream values,
    so downstream logits are recomputed from them; the conditional noise of a downstream
    site is drawn given its hard value under the hard-pass logits (which is what makes
    ``E[c(z~) | b]`` the conditional expectation of ``c(z)``).

    The control variate only enters the gradients of the guide parameters that the
    discrete sites' logits depend on (the model's parameters get the hard ``grad f(b)``),
    found by walking the autograd graph, so module-local parameters work too. In ``c`` the
    guide's discrete densities are evaluated with stop-gradient logits (``c`` may be any
    differentiable function of the noise; this drops a zero-mean term that only adds
    variance).

    The model and guide must use discrete latents arithmetically. Casting a relaxed value
    to an integer/bool, ``.item()``, equality tests, ``argmax`` or indexing with it raise
    :class:`~lvmkit.inference.estimators.EstimatorError` naming the site; so does any
    exception raised while running on relaxed values. A cast applied after arithmetic
    (``(b * 1).long()``) cannot be seen.

    **Controls.** ``log lambda``, the eta logits (and RELAX's networks) are parameters of
    the module ``controls``, registered in Pyro's param store under ``module_name`` on
    every call: the caller's optimizer steps them like any parameter (``SVI``, or an
    optimizer over ``elbo(model, guide).parameters()``), and each step leaves the gradient
    of the variance objective ``||g||^2`` in their ``.grad``. ``loss_and_grads`` and
    ``differentiable_loss`` change nothing but gradients (and the diagnostics' tracker).
    The reference code trains the controls at 10x the model's learning rate: pass
    ``pyro.optim.Adam(elbo.optim_args({"lr": 1e-3}))`` to give them ``variance_optim_lr``
    (:func:`lvmkit.inference.fit` does this itself).

    **Passes.** Each particle runs a hard pass (Pyro's importance trace, guide sampled
    through its noise) and two relaxed passes. The fast path runs the two relaxed passes as
    one model and guide evaluation inside a plate of size 2 left of the model's plates
    (like Pyro's vectorized particles), and where no guide site's logits depend on
    another latent (checked once) it does not run the guide again but reuses the hard
    pass's logits, as a hand-written REBAR does; the reference path runs the passes one
    after the other.
    All noise comes from one keyed source, ``(site, role) -> uniform``
    (:class:`~lvmkit.inference.estimators._relax.StepNoise`), so both paths see the same
    numbers. The path is decided once per model and guide, from their first trace, and
    never by trying one and catching what it raises. The fast path puts a dimension left of
    the model's plates, which only a model written to broadcast over such dimensions
    survives (one that asserts its own shapes, as Pyro's ``test_dim_allocation_ok`` does,
    does not). Pyro's own way of declaring that is ``vectorize_particles=True``, so the
    fast path runs where ``fuse_passes=True``, or where ``fuse_passes`` is left at ``None``
    and ``vectorize_particles=True``, and every guide latent of the first trace is a
    relaxable discrete site; the reference path runs everywhere else. On the first call
    the fast path is checked against the reference passes on the same noise and
    mini-batch; a model that fails there or gives any site another log-probability raises
    :class:`~lvmkit.inference.estimators.EstimatorError` (pass ``fuse_passes=False``), and
    so does a decided fast path that fails later or whose guide has other latent sites
    than on the first call. A guide whose logits depend on other latents on some calls
    only, with the same sites, is beyond what the first call can see: it needs
    ``fuse_passes=False``. lvmkit's own models broadcast, and
    :func:`lvmkit.workflow.train_and_evaluate` runs them fused. On lvmkit's one-layer
    SBNs the reference path takes about 1.3x the fast path's time per step; both paths
    give the same gradients.

    :param temperature: initial ``lambda`` of ``sigma_lambda`` (stored as ``log lambda``).
    :param eta: initial control-variate scale; learned as ``eta = 2 sigmoid(w)`` (in (0, 2))
        when ``learn_eta``, else any fixed float (``0`` gives the score-function estimator).
    :param eta_per: ``"site"``: one eta per group of discrete sites that a parameter tensor
        feeds (one per site when parameters are not shared); ``"param"``: one per parameter
        tensor (as the reference code). A per-parameter eta keeps each gradient coordinate
        unbiased; a per-site eta on shared parameters would not, hence the grouping.
    :param variance_optim_lr: learning rate of the controls under :meth:`optim_args` (and
        :func:`lvmkit.inference.fit`); the reference uses 10x the model's learning rate.
    :param variance_ema_decay: decay of the gradient-variance tracker in :meth:`diagnostics`.
    :param fuse_passes: ``True`` runs the fast path (the model and guide broadcast over
        dimensions left of their plates), ``False`` the reference path, ``None`` follows
        ``vectorize_particles`` (see **Passes**).
    :param module_name: param-store name of the controls (unique per instance by default).

    Example: one SVI step on a small sigmoid belief net; SVI's Adam steps the estimator's
    temperature and eta with the model.

    >>> import pyro
    >>> import torch
    >>> from lvmkit.inference import RebarELBO
    >>> from lvmkit.models import build
    >>> model, guide = build("sbn-linear", x_dim=4, layers=(3,))
    >>> x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    >>> elbo = RebarELBO(temperature=0.5)
    >>> optim = pyro.optim.Adam(elbo.optim_args({"lr": 1e-3}))  # controls at 1e-2
    >>> svi = pyro.infer.SVI(model, guide, optim, loss=elbo)
    >>> isinstance(svi.step(x), float)
    True
    >>> elbo.temperature != 0.5  # tuned by the step
    True
    >>> sorted(elbo.diagnostics())
    ['eta/b1', 'temperature', 'variance_objective']
    """

    estimator_name = "RebarELBO"
    objective = "elbo"  # unbiased for the ELBO's gradient (see check.check_unbiased)
    opt_out_key = "rebar"

    def __init__(
        self,
        num_particles: int = 1,
        temperature: float = 0.5,
        eta: float = 1.0,
        learn_temperature: bool = True,
        learn_eta: bool = True,
        eta_per: str = "site",
        variance_optim_lr: float = 1e-2,
        variance_ema_decay: float = 0.999,
        fuse_passes: bool | None = None,
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool = False,
        retain_graph: bool | None = None,
        module_name: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            retain_graph=retain_graph,
            **kwargs,
        )
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if learn_eta and not 0 < eta < 2:
            raise ValueError(f"a learned eta = 2 sigmoid(w) lies in (0, 2); got eta={eta}")
        if eta_per not in ("site", "param"):
            raise ValueError(f"eta_per must be 'site' or 'param', got {eta_per!r}")
        if not variance_optim_lr > 0:
            raise ValueError(f"variance_optim_lr must be positive, got {variance_optim_lr}")
        self.learn_temperature = learn_temperature
        self.learn_eta = learn_eta
        self.eta_per = eta_per
        self.initial_eta = float(eta)
        self.variance_optim_lr = variance_optim_lr
        self.variance_ema_decay = variance_ema_decay
        if fuse_passes not in (None, True, False):
            raise ValueError(f"fuse_passes must be True, False or None, got {fuse_passes!r}")
        self.fuse_passes = fuse_passes
        self.module_name = module_name or (
            f"{self.estimator_name.lower()}_controls_{next(_instance_ids)}")
        self.controls = ControlParameters(temperature, learn_temperature)
        self.tracker = GradientVariance(variance_ema_decay)
        # detached tensors, read out as floats on demand: no host sync in the step
        self._last: dict[str, torch.Tensor | float] = {}
        self._keys_seen: list[str] = []
        # per model/guide pair: _REFERENCE or a _FastPath
        self._paths = PairDecisions()
        self._pair: tuple[Callable, Callable] | None = None
        self._hard_only = False

    # ----------------------------------------------------------------------------------
    # Public read-outs, checkpoints, the optimizer's view of the controls
    # ----------------------------------------------------------------------------------

    @property
    def temperature(self) -> float:
        """The current relaxation temperature ``lambda``."""
        return float(self.controls.log_temperature.detach().exp())

    @property
    def eta(self) -> dict[str, float]:
        """Current eta per group (site names joined by ``+``, or parameter names)."""
        if not self.learn_eta or not len(self.controls.eta_logits):
            return {key: self.initial_eta for key in self._keys_seen} or {"*": self.initial_eta}
        return {
            _unsanitize(k): float(2 * torch.sigmoid(w.detach()))
            for k, w in self.controls.eta_logits.items()
        }

    def diagnostics(self) -> dict[str, float]:
        """Floats to log each step: temperature, etas, last variance objective, and the log
        of the EMA per-coordinate gradient variance averaged over guide coordinates."""
        out = {"temperature": self.temperature}
        out.update({f"eta/{k}": v for k, v in self.eta.items()})
        out.update(self._last_floats())
        log_variance = self.tracker.log_variance()
        if log_variance is not None:
            out["log_grad_variance"] = log_variance
        return out

    def _last_floats(self) -> dict[str, float]:
        return {k: float(v) for k, v in self._last.items()}

    def optim_args(self, base: dict) -> Callable[[str], dict]:
        """Per-parameter arguments for a ``pyro.optim`` optimizer: ``base`` for every
        parameter, with ``lr = variance_optim_lr`` for this estimator's controls (the
        reference code's faster rate for eta and lambda).

        :param base: the optimizer's arguments, e.g. ``{"lr": 1e-3}``.
        """
        base = dict(base)
        prefix = self.module_name + "."
        controls = {**base, "lr": self.variance_optim_lr}

        def args(name: str) -> dict:
            return controls if name.startswith(prefix) else base

        return args

    def state_dict(self) -> dict:
        """What the estimator has learned, for checkpoints: the controls (temperature,
        etas, RELAX's network) and the gradient-variance tracker. Their optimizer state
        is the caller's optimizer's (:func:`lvmkit.inference.fit` saves it with the
        param store's)."""
        return {
            "controls": {k: v.detach().clone() for k, v in self.controls.state_dict().items()},
            "tracker": self.tracker.state_dict(),
            "keys_seen": list(self._keys_seen),
            "last": self._last_floats(),
            "module_name": self.module_name,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`, creating the etas (and RELAX's network) that
        are otherwise created on the first call, and registering them in the param store
        under the saved ``module_name`` (so that a checkpoint's saved values and optimizer
        state, kept by parameter name, reach these tensors)."""
        self.module_name = state.get("module_name", self.module_name)
        controls = state["controls"]
        saved = controls["log_temperature"]
        self.controls.to(device=saved.device, dtype=saved.dtype)
        prefix = "eta_logits."
        for key, value in controls.items():
            name = key[len(prefix):]
            if key.startswith(prefix) and name not in self.controls.eta_logits:
                self.controls.eta_logits[name] = torch.nn.Parameter(torch.zeros_like(value))
        self._restore_net(controls)
        self.controls.load_state_dict(controls)
        self.tracker.load_state_dict(state["tracker"])
        self._keys_seen = list(state["keys_seen"])
        self._last = dict(state["last"])
        self._register_controls()

    def path(self, model: Callable, guide: Callable) -> str | None:
        """``"fused"`` or ``"reference"``: the path decided for this model and guide on
        their first call (``None`` before it)."""
        decision = self._paths.get(model, guide)
        if decision is None:
            return None
        return _REFERENCE if decision == _REFERENCE else "fused"

    def _restore_net(self, controls: dict) -> None:
        """Hook for RELAX: build the control network a saved state holds."""

    def __call__(self, model: Callable, guide: Callable) -> ELBOModule:
        return _ELBOModuleWithControls(model, guide, self)

    def initialize(self, model: Callable, guide: Callable, *args, **kwargs) -> None:
        """Create the control parameters (eta per group, control net) without a step, e.g.
        before handing ``elbo(model, guide).parameters()`` to a torch optimizer."""
        self.differentiable_loss(model, guide, *args, **kwargs)  # no backward: no .grad

    def _register_controls(self) -> None:
        """Put the learnable controls in Pyro's param store under ``module_name`` (these
        very tensors: a stale entry, e.g. a deep copy's, is replaced), and read them
        through ``pyro.param`` so that ``SVI`` captures and steps them. Not with
        ``module_local_params``, where parameters live in modules: the controls then reach
        an optimizer through ``elbo(model, guide).parameters()``."""
        if pyro.settings.get("module_local_params"):
            return
        store = pyro.get_param_store()
        for name, p in self.controls.named_parameters():
            if not p.requires_grad:
                continue
            full_name = param_with_module_name(self.module_name, name)
            if store._params.get(full_name) is not p:
                if full_name in store:
                    del store[full_name]
                pyro.param(full_name, p)
            else:
                pyro.param(full_name)

    # ----------------------------------------------------------------------------------
    # Pyro's ELBO template: Trace_ELBO runs the particles and the entry points
    # ----------------------------------------------------------------------------------

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """The negative ELBO estimate of the hard pass, from the draws that
        :meth:`loss_and_grads` and :meth:`differentiable_loss` make under the same seed."""
        with torch.no_grad(), self._hard_passes_only():
            return super().loss(model, guide, *args, **kwargs)

    @contextlib.contextmanager
    def _hard_passes_only(self):
        self._hard_only = True
        try:
            yield
        finally:
            self._hard_only = False

    def _get_traces(self, model, guide, args, kwargs):
        # The pair's decisions are keyed by the callables passed, not by the particle
        # wrappers Pyro builds around them for vectorized particles.
        self._pair = (model, guide)
        try:
            yield from super()._get_traces(model, guide, args, kwargs)
        finally:
            self._pair = None  # held weakly otherwise (see PairDecisions)
        self._register_controls()  # after the particles, which create the etas and nets

    def _get_trace(self, model, guide, args, kwargs):
        """One particle: the hard traces, with the relaxed passes riding on the guide
        trace. All three passes draw their noise from one keyed source."""
        with StepNoise():
            if self._hard_only:
                model_trace, guide_trace, hard = self._hard_traces(model, guide, args, kwargs)
                return model_trace, guide_trace
            model_trace, guide_trace, hard, passes = self._passes(model, guide, args, kwargs)
        guide_trace.rebar_particle = _Particle(hard, passes, model, guide)
        return model_trace, guide_trace

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        """``(loss, surrogate)``: the hard pass's negative ELBO, and a zero-valued surrogate
        whose gradient is minus the REBAR estimate for the model and guide parameters and
        the variance objective's gradient for the controls."""
        loss, surrogate_loss = super()._differentiable_loss_particle(model_trace, guide_trace)
        particle = guide_trace.rebar_particle
        hard = particle.hard
        if not hard.relaxed:
            return loss, surrogate_loss
        cv_f, cv_r = self._control_variate(guide_trace, hard, particle.passes)
        scores = {
            r.name: [guide_trace.nodes[r.name]["score_parts"].score_function]
            for r in hard.relaxed
        }
        estimate = self._combine(-surrogate_loss, cv_f, cv_r, scores, particle.model,
                                 particle.guide)
        if estimate is None:
            # No learnable parameter behind any relaxed site's distribution (fixed probs,
            # say): the control variate has nothing to act on, and the estimate is the
            # hard pass's gradient alone (Trace_ELBO's, whose score terms are then zero).
            return loss, surrogate_loss
        return loss, _linear_surrogate(estimate.grads, estimate.control_grads)

    def _control_variate(self, guide_trace, hard: HardPass, passes: list):
        """``(B_f, B_r)``: surrogates whose guide-parameter gradients are the control-variate
        parts ``-c(z~) grad log q(b) + grad c(z) - grad c(z~)`` of the relaxed ELBO (B_f)
        and of an extra learned control (B_r, RELAX), from the two relaxed passes (``z``
        and ``z~``)."""
        (mt_u, gt_u, values_u), (mt_c, gt_c, values_c) = passes
        f_u = elbo_integrand(mt_u, gt_u)
        f_c = elbo_integrand(mt_c, gt_c)
        terms_c = log_weight_terms(mt_c, gt_c, detach=False)
        cv_f = f_u - f_c + self._score_surrogate(guide_trace, hard, terms_c)
        extra_u = self._extra_control(values_u, guide_trace, hard)
        if extra_u is None:
            return cv_f, 0.0
        extra_c = self._extra_control(values_c, guide_trace, hard)
        cv_r = _total(extra_u) - _total(extra_c) + self._score_surrogate(guide_trace, hard,
                                                                         extra_c)
        return cv_f, cv_r

    # ----------------------------------------------------------------------------------
    # The passes: a fast path and a reference path, decided once per model and guide
    # ----------------------------------------------------------------------------------

    def _passes(self, model, guide, args, kwargs):
        """``(model_trace, guide_trace, hard, passes)``: the hard pass and, if it relaxed
        any site, both relaxed passes (``None`` otherwise), along the path decided for this
        model/guide pair from its first trace (see :meth:`_decide_path`)."""
        model_trace, guide_trace, hard = self._hard_traces(model, guide, args, kwargs)
        if not hard.relaxed:
            # nothing to relax (every discrete site opted out, say): no relaxed pass
            if self._paths.get(*self._pair) is None:
                self._paths.set(*self._pair, _REFERENCE)
            return model_trace, guide_trace, hard, None
        temperature = self._temperature_like(hard.relaxed[0].logits)
        noises = [
            {r.name: r.noise for r in hard.relaxed},
            {r.name: self._conditional_noise(r) for r in hard.relaxed},
        ]
        relaxed = (model, guide, args, kwargs, hard, noises, temperature)
        path = self._paths.get(*self._pair)
        if path is None:
            path = self._decide_path(model_trace, guide_trace, hard)
            if path != _REFERENCE:
                path, passes = self._checked_fast_passes(guide_trace, relaxed, path)
                self._paths.set(*self._pair, path)
                return model_trace, guide_trace, hard, passes
            self._paths.set(*self._pair, path)
        if path == _REFERENCE:
            return model_trace, guide_trace, hard, self._reference_passes(*relaxed)
        try:
            passes = self._fast_passes(guide_trace, relaxed, path)
        except NotFusable as error:
            raise EstimatorError(
                f"{self.estimator_name}: the fused pass ran for this model and guide on"
                f" their first call but not now ({error}); a model whose sites change"
                " from call to call needs fuse_passes=False"
            ) from error
        return model_trace, guide_trace, hard, passes

    def _fast_passes(self, guide_trace, relaxed: tuple, path: _FastPath) -> list:
        hard = relaxed[4]
        if tuple(hard.records) != path.sites or not hard.all_relaxed:
            # What was decided on the first call (the plate dimension, that the guide's
            # logits depend on no other latent) may not hold for other sites.
            raise NotFusable(f"the guide's latent sites were {list(path.sites)} on the"
                             f" first call and are {list(hard.records)} now")
        if path.reuse_guide:
            model, _, args, kwargs, hard, noises, temperature = relaxed
            return reused_guide_traces(model, guide_trace, args, kwargs, hard, noises,
                                       temperature, path.pass_dim, self.estimator_name)
        return fused_traces(*relaxed, path.pass_dim, self.estimator_name)

    def _fusing_requested(self) -> bool:
        return self.vectorize_particles if self.fuse_passes is None else self.fuse_passes

    def _decide_path(self, model_trace, guide_trace, hard: HardPass):
        """The path of a model/guide pair, from its first trace: the fast path's plate
        dimension where it was asked for (``fuse_passes``, or ``vectorize_particles``:
        the model is declared to broadcast over dimensions left of its plates) and every
        guide latent is a relaxable discrete site; the reference path otherwise."""
        if not self._fusing_requested() or not hard.all_relaxed:
            return _REFERENCE
        nesting = (plate_nesting(model_trace, guide_trace)
                   if self.max_plate_nesting == float("inf") else int(self.max_plate_nesting))
        return _FastPath(-nesting - 1, tuple(hard.records))

    def _checked_fast_passes(self, guide_trace, relaxed: tuple, path: _FastPath
                             ) -> tuple[_FastPath, list]:
        """The fast path's passes on a pair's first call, checked against the reference
        passes on the same noise and mini-batch, and the decision completed: whether the
        guide's logits can be reused (:func:`guide_is_reusable`). A model that asserts its
        shapes, reshapes, reduces over the pass dimension or mixes it into its data cannot
        run fused, and says so here, once, as an :class:`EstimatorError` (never silently)."""
        model, guide, args, kwargs, hard, noises, temperature = relaxed
        reference = self._reference_passes(*relaxed)
        reuse = guide_is_reusable(guide, args, kwargs, hard, guide_trace, noises[0],
                                  temperature)
        path = _FastPath(path.pass_dim, path.sites, reuse)
        advice = ("the model and guide must broadcast over a dimension left of their"
                  " plates to run fused; pass fuse_passes=False")
        try:
            fast = self._fast_passes(guide_trace, relaxed, path)
        except EstimatorError:
            raise
        except Exception as error:  # noqa: BLE001 - re-raised, with the way out
            raise EstimatorError(
                f"{self.estimator_name}: the fused pass failed on the first call"
                f" ({type(error).__name__}: {error}); {advice}"
            ) from error
        difference = _fused_difference(reference, fast)
        if difference is not None:
            raise EstimatorError(
                f"{self.estimator_name}: the fused pass does not reproduce the separate"
                f" passes on the first call ({difference}); {advice}"
            )
        return path, fast

    def _reference_passes(self, model, guide, args, kwargs, hard, noises, temperature
                          ) -> list:
        return [
            relaxed_traces(model, guide, args, kwargs, hard, noise, temperature,
                           self.estimator_name, detach_scores=True)
            for noise in noises
        ]

    def _hard_traces(self, model, guide, args, kwargs):
        return hard_traces(model, guide, args, kwargs, self.max_plate_nesting,
                           self.estimator_name, self.opt_out_key)

    @staticmethod
    def _score_surrogate(guide_trace, hard: HardPass, terms_c: MultiFrameTensor):
        """Zero-valued term with gradient ``-sum_s grad log q(b_s) * c_s(z~)``.

        ``(score - score.detach())`` is zero but carries the score's gradient, so the
        weight ``c(z~)`` is not differentiated w.r.t. the guide parameters (as a detached
        weight would not be), yet stays differentiable in lambda (and the control net)
        for the variance objective.
        """
        total = 0.0
        for record in hard.relaxed:
            site = guide_trace.nodes[record.name]
            score = site["score_parts"].score_function
            weight = _score_weight(terms_c, site)
            total = total - ((score - score.detach()) * weight).sum()
        return total

    def _extra_control(self, values, guide_trace, hard) -> MultiFrameTensor | None:
        """Hook for RELAX's learned control ``r_rho``; REBAR has none."""
        return None

    def _conditional_noise(self, record) -> torch.Tensor:
        v = draw_uniform(record.logits.shape, record.logits, record.name, "conditional")
        if record.kind == BERNOULLI:
            return conditional_logistic_noise(record.logits, record.value, v)
        return conditional_gumbel_noise(record.logits, record.value, v)

    def _temperature_like(self, like: torch.Tensor) -> torch.Tensor:
        t = self.controls.log_temperature
        if t.device != like.device or t.dtype != like.dtype:
            # in place: the parameters stay the objects the param store holds
            self.controls.to(device=like.device, dtype=like.dtype)
        return self.controls.log_temperature.exp()

    # ----------------------------------------------------------------------------------
    # Combining: per-parameter eta, the variance objective
    # ----------------------------------------------------------------------------------

    def _learnables_requested(self) -> bool:
        return (self.learn_eta or self.learn_temperature or self._net_learnable()) and (
            torch.is_grad_enabled()
        )

    def _net_learnable(self) -> bool:
        return False

    def _learnable_nets(self) -> list[torch.nn.Module]:
        """Hook for RELAX: its control networks."""
        return []

    def _combine(
        self, surrogate_elbo, cv_f, cv_r, scores, model, guide
    ) -> _Estimate | None:
        """The estimate as (leaf, ELBO gradient) pairs and the variance objective's
        gradients of the controls; ``None`` if no learnable leaf is behind the relaxed
        sites' distributions."""
        controls = self._control_ids()
        leaves, keys = self._leaves_and_keys(scores, model, guide, controls)
        if not leaves:
            return None
        learn = self._learnables_requested()
        etas = {key: self._eta_tensor(key, leaves[0]) for key in dict.fromkeys(keys)}
        has_extra = torch.is_tensor(cv_r) and cv_r.requires_grad  # RELAX's learned control
        skip = {id(leaf) for leaf in leaves} | controls
        others = [t for t in graph_leaves([surrogate_elbo]) if id(t) not in skip]
        retain = learn or bool(self.retain_graph)
        if len(etas) == 1:
            # One eta for every guide leaf (the usual case): the guide's estimate is the
            # gradient of one scalar, so one backward pass gives it (with ``learn``, kept
            # differentiable in the control parameters). The model's parameters get the
            # hard gradient only, from a second pass that autograd prunes to the model.
            (eta,) = etas.values()
            estimate = surrogate_elbo + eta * cv_f + (cv_r if has_extra else 0.0)
            squared = _grads(estimate, leaves, create_graph=learn)
            base_others = _grads(surrogate_elbo, others, create_graph=False,
                                 retain_graph=retain) if others else []
        else:
            cv_grads = _grads(cv_f, leaves, create_graph=learn)
            # Per-parameter eta: coordinate-wise unbiased for any value (class docstring).
            control = [etas[key] * g_f for key, g_f in zip(keys, cv_grads, strict=True)]
            if has_extra:
                extra_grads = _grads(cv_r, leaves, create_graph=learn)
                control = [c + g_r for c, g_r in zip(control, extra_grads, strict=True)]
            # One backward pass over the hard traces gives the guide leaves' base gradients
            # (needed by the variance objective) and every other parameter's gradient.
            base = _grads(surrogate_elbo, leaves + others, create_graph=False,
                          retain_graph=retain)
            squared = [b + c for b, c in zip(base, control, strict=False)]
            base_others = base[len(leaves):]
        total = [g.detach() for g in squared]
        grads = list(zip(leaves, total, strict=True))
        grads += zip(others, base_others, strict=True)
        control_grads = []
        if learn:
            objective = sum((g**2).sum() for g in squared)
            self.tracker.update(total)
            self._last = {"variance_objective": objective.detach()}
            learnables = self._learnables(etas)
            if learnables and objective.requires_grad:
                variance_grads = torch.autograd.grad(
                    objective, learnables, retain_graph=bool(self.retain_graph),
                    allow_unused=True,
                )
                control_grads = [
                    (p, g)
                    for p, g in zip(learnables, variance_grads, strict=True)
                    if g is not None
                ]
        return _Estimate(grads, control_grads)

    def _leaves_and_keys(
        self, scores, model, guide, controls: set[int] = frozenset()
    ) -> tuple[list[torch.Tensor], list[str]]:
        sites_of: dict[int, list[str]] = {}
        leaves: dict[int, torch.Tensor] = {}
        # The estimator's own parameters (``controls``) are never leaves of the estimate.
        for name, tensors in scores.items():
            for leaf in graph_leaves(tensors):
                if id(leaf) in controls:
                    continue
                leaves.setdefault(id(leaf), leaf)
                sites_of.setdefault(id(leaf), [])
                if name not in sites_of[id(leaf)]:
                    sites_of[id(leaf)].append(name)
        ordered = list(leaves.values())
        if self.eta_per == "site":
            keys = ["+".join(sites_of[id(leaf)]) for leaf in ordered]
        else:
            keys = _leaf_names(ordered, model, guide)
        self._keys_seen = list(dict.fromkeys(keys))
        return ordered, keys

    def _control_ids(self) -> set[int]:
        return {id(p) for p in self.controls.parameters()}

    def _eta_tensor(self, key: str, like: torch.Tensor) -> torch.Tensor:
        if not self.learn_eta:
            return torch.tensor(self.initial_eta, dtype=like.dtype, device=like.device)
        name = _sanitize(key)
        if name not in self.controls.eta_logits:
            w = math.log(self.initial_eta / (2 - self.initial_eta))
            self.controls.eta_logits[name] = torch.nn.Parameter(
                torch.tensor(w, dtype=like.dtype, device=like.device)
            )
        return 2 * torch.sigmoid(self.controls.eta_logits[name])

    def _learnables(self, etas: dict) -> list[torch.Tensor]:
        out = []
        if self.learn_eta:
            out += [self.controls.eta_logits[_sanitize(k)] for k in etas]
        if self.learn_temperature:
            out.append(self.controls.log_temperature)
        if self._net_learnable():
            for net in self._learnable_nets():
                out += list(net.parameters())
        return out


def _fused_difference(reference: list, fused: list) -> str | None:
    """Where the fused passes' traces differ from the reference ones (``None`` if nowhere)."""
    for k, (ref, got) in enumerate(zip(reference, fused, strict=True)):
        for role, a, b in zip(("model", "guide"), ref[:2], got[:2], strict=True):
            difference = _log_prob_difference(a, b)
            if difference is not None:
                return f"relaxed pass {k}, {role}: {difference}"
    return None


def _total(terms: MultiFrameTensor) -> torch.Tensor:
    return sum(value.sum() for value in terms.values())


def _grads(
    output, leaves: list[torch.Tensor], create_graph: bool, retain_graph: bool = True
) -> list[torch.Tensor]:
    if not torch.is_tensor(output) or not output.requires_grad:
        return [torch.zeros_like(leaf) for leaf in leaves]
    grads = torch.autograd.grad(
        output, leaves, retain_graph=retain_graph, create_graph=create_graph,
        allow_unused=True,
    )
    return [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves,
                                                                           strict=True)]


class _GivenGradients(torch.autograd.Function):
    """A zero whose backward hands each input tensor a given gradient (times the incoming
    one; the first ``negated`` of them negated): the estimate, computed by
    ``torch.autograd.grad`` beforehand, reaches ``.grad`` through an ordinary ``backward``
    without the products and sums a linear surrogate ``sum(g * leaf)`` would compute and
    differentiate."""

    @staticmethod
    def forward(ctx, grads, negated, *tensors):
        ctx.grads, ctx.negated = grads, negated
        return tensors[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad_output):
        minus = -grad_output
        return (None, None, *(g * (minus if i < ctx.negated else grad_output)
                              for i, g in enumerate(ctx.grads)))


def _linear_surrogate(grads: list[tuple[torch.Tensor, torch.Tensor]],
                      control_grads: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Zero-valued loss whose gradient is minus the given ELBO gradient for each leaf and
    the given variance-objective gradient for each control."""
    pairs = grads + control_grads
    if not pairs:
        return torch.zeros(())
    tensors = [t for t, _ in pairs]
    given = [g.detach() for _, g in pairs]
    return _GivenGradients.apply(given, len(grads), *tensors)


def _leaf_names(leaves: list[torch.Tensor], model, guide) -> list[str]:
    names = {id(t): n for n, t in pyro.get_param_store().named_parameters()}
    for fn in (guide, model):
        if isinstance(fn, torch.nn.Module):
            for n, t in fn.named_parameters():
                names.setdefault(id(t), n)
    return [names.get(id(leaf), f"tensor{i}") for i, leaf in enumerate(leaves)]


def _sanitize(key: str) -> str:
    return key.replace(".", "\N{MIDDLE DOT}")


def _unsanitize(key: str) -> str:
    return key.replace("\N{MIDDLE DOT}", ".")
