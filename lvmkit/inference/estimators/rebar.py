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
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.elbo import ELBOModule
from pyro.infer.util import MultiFrameTensor, torch_item
from pyro.util import warn_if_nan

from lvmkit._rng import RandomState
from lvmkit.inference.estimators import EstimatorError
from lvmkit.inference.estimators._relax import (
    BERNOULLI,
    FixSubsamples,
    HardPass,
    NoiseTape,
    NotFusable,
    StepNoise,
    conditional_gumbel_noise,
    conditional_logistic_noise,
    draw_uniform,  # noqa: F401 - tests substitute it here
    elbo_integrand,
    fused_traces,
    graph_leaves,
    hard_traces,
    log_weight_terms,
    plate_nesting,
    relaxed_traces,
    site_uniform,
    stacked_relaxed_traces,
)

__all__ = ["RebarELBO"]

_FUSED, _STACKED, _SEQUENTIAL = "fused", "stacked", "sequential"


def _same_log_probs(expected, got) -> bool:
    """Whether two traces have the same sample sites with the same log-probabilities."""
    sites = [n for n, s in expected.nodes.items() if s["type"] == "sample"]
    if sites != [n for n, s in got.nodes.items() if s["type"] == "sample"]:
        return False
    for name in sites:
        a, b = expected.nodes[name]["log_prob"], got.nodes[name]["log_prob"]
        # The fused pass's plate may leave leading singleton dimensions (a global site).
        if a.shape != b.shape and (a.dim() > b.dim() or b.shape[b.dim() - a.dim():] != a.shape
                                   or b.numel() != a.numel()):
            return False
        with torch._C.DisableTorchFunctionSubclass():
            if not torch.allclose(a.detach(), b.detach().reshape(a.shape), rtol=1e-4,
                                  atol=1e-5):
                return False
    return True


class ControlParameters(torch.nn.Module):
    """What a REBAR-type estimator learns: log temperature, eta logits, a control net.

    A ``torch.nn.Module``, so that ``elbo(model, guide)`` (the ``nn.Module`` form used by
    Lightning or DDP) exposes these as parameters of the returned module.
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
class _Estimate:
    loss: torch.Tensor  # the (hard) negative ELBO estimate
    # Either a surrogate whose gradient w.r.t. model/guide params is the estimate (no
    # discrete site relaxed), or the estimate itself as (leaf, gradient of the ELBO) pairs:
    # the ELBO's rather than the loss's, so that no negated copy is made.
    surrogate: torch.Tensor | None
    grads: list[tuple[torch.Tensor, torch.Tensor]]
    # (control parameter, gradient of the variance objective) pairs; empty if not learning
    control_grads: list[tuple[torch.Tensor, torch.Tensor]]


def _score_weight(terms: MultiFrameTensor, site: dict) -> torch.Tensor:
    return terms.sum_to(site["cond_indep_stack"])


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
    :class:`~lvmkit.inference.estimators._relax.EstimatorError` naming the site; so does any
    exception raised while running on relaxed values. A cast applied after arithmetic
    (``(b * 1).long()``) cannot be seen.

    :param temperature: initial ``lambda`` of ``sigma_lambda`` (stored as ``log lambda``).
    :param eta: initial control-variate scale; learned as ``eta = 2 sigmoid(w)`` (in (0, 2))
        when ``learn_eta``, else any fixed float (``0`` gives the score-function estimator).
    :param eta_per: ``"site"``: one eta per group of discrete sites that a parameter tensor
        feeds (one per site when parameters are not shared); ``"param"``: one per parameter
        tensor (as the reference code). A per-parameter eta keeps each gradient coordinate
        unbiased; a per-site eta on shared parameters would not, hence the grouping.
    :param variance_optim_lr: learning rate of the estimator's own Adam that tunes eta and
        lambda in ``loss_and_grads`` (the reference uses 10x the model's learning rate).
    :param variance_ema_decay: decay of the gradient-variance tracker in :meth:`diagnostics`.
    :param fuse_passes: run the hard pass and both relaxed passes as one model and guide
        evaluation inside a plate of size 3 left of the model's plates (like Pyro's
        vectorized particles) when every guide latent is a relaxable discrete site; else,
        and with ``False``, a hard pass and one stacked relaxed pass (a new leftmost
        dimension), else the relaxed passes one by one. Which of the three runs is decided
        once per model and guide, on their first call: the fast path runs on the
        reference path's noise and mini-batch and is kept only if every site of every pass
        gets the reference's log-probability (a model that asserts its shapes, reduces over
        the extra dimension or mixes it into its data does not). Same estimator either way;
        fusing saves per-trace overhead. A decided fast path that fails later raises
        :class:`~lvmkit.inference.estimators.EstimatorError`.

    With ``differentiable_loss`` (``elbo(model, guide)`` as an ``nn.Module``) the estimator
    takes no optimizer step of its own: the returned surrogate carries the gradient of the
    variance objective for the control parameters, which are parameters of the returned
    module (``.controls``); they are created on the first call, so call :meth:`initialize`
    (or run one step) before building the optimizer or wrapping in DDP.

    Example: one SVI step on a small sigmoid belief net; the estimator's own Adam
    step tunes its temperature and eta.

    >>> import pyro
    >>> import torch
    >>> from lvmkit.inference import RebarELBO
    >>> from lvmkit.models import build
    >>> model, guide = build("sbn-linear", x_dim=4, layers=(3,))
    >>> x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    >>> elbo = RebarELBO(temperature=0.5)
    >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=elbo)
    >>> isinstance(svi.step(x), float)
    True
    >>> sorted(elbo.diagnostics())  # temperature and eta were tuned by the step
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
        fuse_passes: bool = True,
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool = False,
        retain_graph: bool | None = None,
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
        self.learn_temperature = learn_temperature
        self.learn_eta = learn_eta
        self.eta_per = eta_per
        self.initial_eta = float(eta)
        self.variance_optim_lr = variance_optim_lr
        self.variance_ema_decay = variance_ema_decay
        self.controls = ControlParameters(temperature, learn_temperature)
        self._variance_optim: torch.optim.Optimizer | None = None
        self._last: dict[str, float] = {}
        self._ema: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._ema_steps = 0
        self._keys_seen: list[str] = []
        self.fuse_passes = fuse_passes
        # The path of each model/guide pair (by the ids of the callables passed), decided
        # on its first call; the pairs that do not fuse.
        self._paths: dict[tuple[int, int], str] = {}
        self._not_fusable: set[tuple[int, int]] = set()
        self._guessed_nesting: dict[tuple[int, int], int] = {}
        self._watched: set[tuple] = set()

    # ----------------------------------------------------------------------------------
    # Public read-outs
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
        out.update(self._last)
        log_variance = self._log_grad_variance()
        if log_variance is not None:
            out["log_grad_variance"] = log_variance
        return out

    def state_dict(self) -> dict:
        """What the estimator has learned, for checkpoints: the controls (temperature,
        etas, RELAX's network), its variance optimizer's state and the gradient-variance
        tracker. :func:`lvmkit.inference.fit` saves it with every checkpoint."""
        names = {id(p): n for n, p in self.controls.named_parameters()}
        optim = self._variance_optim
        return {
            "controls": {k: v.detach().clone() for k, v in self.controls.state_dict().items()},
            "variance_optim": None if optim is None else {
                "state": optim.state_dict(),
                # torch's state refers to parameters by position: keep their names too
                "groups": [[names[id(p)] for p in g["params"]] for g in optim.param_groups],
            },
            "ema": None if self._ema is None else [(m.clone(), s.clone()) for m, s in self._ema],
            "ema_steps": self._ema_steps,
            "keys_seen": list(self._keys_seen),
            "last": dict(self._last),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`, creating the etas (and RELAX's network) that
        are otherwise created on the first call."""
        controls = state["controls"]
        # Where the state was saved: the optimizer's moments are then made alongside.
        saved = controls["log_temperature"]
        self.controls.to(device=saved.device, dtype=saved.dtype)
        prefix = "eta_logits."
        for key, value in controls.items():
            name = key[len(prefix):]
            if key.startswith(prefix) and name not in self.controls.eta_logits:
                self.controls.eta_logits[name] = torch.nn.Parameter(torch.zeros_like(value))
        self._restore_net(controls)
        self.controls.load_state_dict(controls)
        self._variance_optim = None
        saved = state["variance_optim"]
        if saved is not None:
            params = dict(self.controls.named_parameters())
            groups = [{"params": [params[n] for n in names]} for names in saved["groups"]]
            self._variance_optim = torch.optim.Adam(groups, lr=self.variance_optim_lr,
                                                    foreach=True)
            self._variance_optim.load_state_dict(saved["state"])
        ema = state["ema"]
        self._ema = None if ema is None else [(m.clone(), s.clone()) for m, s in ema]
        self._ema_steps = state["ema_steps"]
        self._keys_seen = list(state["keys_seen"])
        self._last = dict(state["last"])

    def _restore_net(self, controls: dict) -> None:
        """Hook for RELAX: build the control network a saved state holds."""

    def __call__(self, model: Callable, guide: Callable) -> ELBOModule:
        return _ELBOModuleWithControls(model, guide, self)

    def step_controls(self) -> None:
        """One step of the estimator's own optimizer on the gradients that a backward pass
        through :meth:`differentiable_loss` left on the controls, which are then cleared:
        for a training loop that steps the model's and guide's parameters itself but
        leaves the controls to the estimator, as ``loss_and_grads`` does (this is what
        :func:`lvmkit.inference.fit` does on its ``use_differentiable_loss`` path). Not
        needed when the loop's optimizer already holds ``elbo(model, guide).parameters()``.
        """
        grads = [(p, p.grad) for p in self.controls.parameters() if p.grad is not None]
        if grads:
            self._step_controls(grads)

    def initialize(self, model: Callable, guide: Callable, *args, **kwargs) -> None:
        """Create the control parameters (eta per group, control net) without stepping."""
        self.differentiable_loss(model, guide, *args, **kwargs)

    # ----------------------------------------------------------------------------------
    # Pyro ELBO interface
    # ----------------------------------------------------------------------------------

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs):
        """Surrogate loss whose gradient is the REBAR estimate (see class docstring)."""
        estimate = self._estimate(model, guide, args, kwargs)
        surrogate = estimate.surrogate
        if surrogate is None:
            # The gradients are already computed: a linear surrogate hands them on exactly.
            surrogate = _linear_surrogate(estimate.grads)
        if estimate.control_grads:
            # Lets an optimizer over ``elbo(model, guide).parameters()`` train the controls.
            surrogate = surrogate + sum((g.detach() * p).sum() for p, g in estimate.control_grads)
        return estimate.loss + (surrogate - surrogate.detach())

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """The negative ELBO estimate of the hard pass, from the draws that
        :meth:`loss_and_grads` and :meth:`differentiable_loss` make under the same seed."""
        with torch.no_grad():
            model, guide, repeats = self._particle_fns(model, guide, args, kwargs)
            elbo = 0.0
            for _ in range(repeats):
                with StepNoise():
                    model_trace, guide_trace, _ = self._hard_traces(model, guide, args, kwargs)
                elbo += torch_item(elbo_integrand(model_trace, guide_trace))
        loss = -elbo / self.num_particles
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """Backpropagate the REBAR estimate, then take one variance-objective Adam step."""
        estimate = self._estimate(model, guide, args, kwargs)
        if estimate.surrogate is None:
            _accumulate_grads(estimate.grads)
        elif estimate.surrogate.requires_grad:
            estimate.surrogate.backward(retain_graph=self.retain_graph)
        if estimate.control_grads:
            self._step_controls(estimate.control_grads)
        return float(estimate.loss)

    # ----------------------------------------------------------------------------------
    # The estimator
    # ----------------------------------------------------------------------------------

    def _particle_fns(self, model, guide, args, kwargs):
        if self.vectorize_particles:
            if self.max_plate_nesting == float("inf"):
                self._guess_max_plate_nesting(model, guide, args, kwargs)
            return (
                self._vectorized_num_particles(model),
                self._vectorized_num_particles(guide),
                1,
            )
        return model, guide, self.num_particles

    def _estimate(self, model, guide, args, kwargs) -> _Estimate:
        pair = self._pair_key(model, guide)
        model, guide, repeats = self._particle_fns(model, guide, args, kwargs)
        loss = 0.0
        surrogate_elbo = 0.0
        cv_f = 0.0
        cv_r = 0.0
        scores: dict[str, list[torch.Tensor]] = {}
        stops: list = []
        for _ in range(repeats):
            with StepNoise():
                model_trace, guide_trace, hard, passes = self._passes(pair, model, guide,
                                                                      args, kwargs)
            loss_p, surrogate_loss_p = Trace_ELBO._differentiable_loss_particle(
                self, model_trace, guide_trace
            )
            # A vectorized trace holds all particles in one: divide by the count either way.
            loss = loss + loss_p / self.num_particles
            surrogate_elbo = surrogate_elbo - surrogate_loss_p / self.num_particles
            if not hard.relaxed:
                continue
            f_part, r_part = self._control_variate(guide_trace, hard, passes)
            cv_f = cv_f + f_part / self.num_particles
            cv_r = cv_r + r_part / self.num_particles
            stops += hard.graph_stops
            for record in hard.relaxed:
                score = guide_trace.nodes[record.name]["score_parts"].score_function
                scores.setdefault(record.name, []).append(score)
        loss = torch.as_tensor(loss)
        warn_if_nan(loss, "loss")
        if not scores:
            return _Estimate(loss, _as_tensor(surrogate_elbo).neg(), [], [])
        return self._combine(surrogate_elbo, cv_f, cv_r, scores, model, guide, loss, stops)

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
        total_u = _total(extra_u)
        total_c = _total(extra_c)
        cv_r = total_u - total_c + self._score_surrogate(guide_trace, hard, extra_c)
        return cv_f, cv_r

    # ----------------------------------------------------------------------------------
    # Which path runs the passes: decided once per model and guide
    # ----------------------------------------------------------------------------------

    def _pair_key(self, model, guide) -> tuple:
        """The key of a model/guide pair in the per-pair decisions: the callables' ids (a
        bound method's owner and function, as ``obj.model`` is a new object per access).
        The decisions are forgotten when either owner is garbage collected, so that a new
        callable that reuses a freed id is checked afresh rather than run on a stale one."""
        keys, owners = [], []
        for fn in (model, guide):
            owner = getattr(fn, "__self__", None)
            if owner is not None and getattr(fn, "__func__", None) is not None:
                keys.append((id(owner), id(fn.__func__)))
            else:
                owner = fn
                keys.append(id(fn))
            owners.append(owner)
        pair = tuple(keys)
        if pair not in self._watched:
            self._watched.add(pair)
            for owner in owners:
                try:
                    weakref.finalize(owner, self._forget, pair)
                except TypeError:  # not weakly referenceable: nothing can free its id
                    pass
        return pair

    def __setstate__(self, state: dict) -> None:
        # A copy (deepcopy, pickle) watches its pairs afresh: finalizers are not copied.
        self.__dict__.update(state)
        self._watched = set()

    def _forget(self, pair: tuple) -> None:
        for decisions in (self._paths, self._guessed_nesting):
            decisions.pop(pair, None)
        self._not_fusable.discard(pair)
        self._watched.discard(pair)

    def _passes(self, pair: tuple[int, int], model, guide, args, kwargs):
        """``(model_trace, guide_trace, hard, passes)``: the hard pass and, if it relaxed
        any site, both relaxed passes (``None`` otherwise), run along the path decided for
        this model/guide pair on its first call (see :meth:`_first_passes`)."""
        path = self._paths.get(pair)
        if path is None:
            return self._first_passes(pair, model, guide, args, kwargs)
        if path == _FUSED:
            try:
                return self._run_fused(pair, model, guide, args, kwargs)
            except NotFusable as error:
                raise EstimatorError(
                    f"{self.estimator_name}: the fused pass ran for this model and guide on"
                    f" their first call but not now ({error}); a model whose sites change"
                    " from call to call needs fuse_passes=False"
                ) from error
        model_trace, guide_trace, hard = self._hard_traces(model, guide, args, kwargs)
        if not hard.relaxed:
            return model_trace, guide_trace, hard, None
        noises = self._noises(hard)
        if path == _STACKED:
            passes = self._run_stacked(model, guide, args, kwargs, model_trace, guide_trace,
                                       hard, noises)
            if passes is None:
                raise EstimatorError(
                    f"{self.estimator_name}: the stacked relaxed passes ran for this model and"
                    " guide on their first call but not now; a model whose sites change from"
                    " call to call needs fuse_passes=False"
                )
        else:
            passes = self._run_sequential(model, guide, args, kwargs, hard, noises)
        return model_trace, guide_trace, hard, passes

    def _first_passes(self, pair: tuple[int, int], model, guide, args, kwargs):
        """The first call of a model/guide pair runs the reference path (hard pass, then
        the relaxed passes one by one), and then the fast path (the fused pass if every
        guide latent is relaxed and ``fuse_passes``, else the stacked relaxed passes) on
        the same noise and mini-batch, which draws nothing itself. The fast path is taken
        from then on only if it gives every site of every pass the reference's
        log-probability: a model that asserts its own shapes, reduces over the extra
        leftmost dimension or mixes it into its data fails that check instead of being
        run wrongly, and nothing of it is caught on later calls."""
        with NoiseTape() as tape:
            model_trace, guide_trace, hard = self._hard_traces(model, guide, args, kwargs)
            if not hard.relaxed:
                # Nothing to relax (every discrete site opted out): the separate passes.
                self._paths[pair] = _SEQUENTIAL
                self._not_fusable.add(pair)
                return model_trace, guide_trace, hard, None
            noises = self._noises(hard)
        reference = self._run_sequential(model, guide, args, kwargs, hard, noises)
        expected = [(model_trace, guide_trace), *((m, g) for m, g, _ in reference)]
        fusable = self.fuse_passes and all(r.relaxed for r in hard.records.values())
        if fusable:
            fused = self._verified(expected, lambda: self._run_fused(
                pair, model, guide, args, kwargs, replay=tape.drawn,
                subsamples=hard.subsamples,
            ))
            if fused is not None:
                self._paths[pair] = _FUSED
                return fused
        self._not_fusable.add(pair)
        stacked = self._verified(expected, lambda: (
            model_trace, guide_trace, hard,
            self._run_stacked(model, guide, args, kwargs, model_trace, guide_trace, hard,
                              noises),
        ))
        if stacked is not None:
            self._paths[pair] = _STACKED
            return stacked
        self._paths[pair] = _SEQUENTIAL
        return model_trace, guide_trace, hard, reference

    @staticmethod
    def _verified(expected: list, run: Callable):
        """``run()``'s result if it ran and matches ``expected`` pass for pass, else None."""
        try:
            result = run()
        except Exception:  # noqa: BLE001 - any failure on the stacked values disqualifies
            return None
        model_trace, guide_trace, _, passes = result
        if passes is None:
            return None
        got = [(model_trace, guide_trace), *((m, g) for m, g, _ in passes)]
        if all(_same_log_probs(a, b) for pair in zip(expected, got, strict=True)
               for a, b in zip(*pair, strict=True)):
            return result
        return None

    def _hard_traces(self, model, guide, args, kwargs):
        return hard_traces(model, guide, args, kwargs, self.max_plate_nesting,
                           self.estimator_name, self.opt_out_key)

    def _noises(self, hard: HardPass) -> list[dict[str, torch.Tensor]]:
        """The noise of the relaxed pass (the hard pass's) and of the conditional one."""
        return [
            {r.name: r.noise for r in hard.relaxed},
            {r.name: self._conditional_noise(r) for r in hard.relaxed},
        ]

    def _run_fused(self, pair, model, guide, args, kwargs, replay=None, subsamples=None):
        nesting = self._plate_nesting(pair, model, guide, args, kwargs, subsamples)
        with NoiseTape(replay) if replay is not None else contextlib.nullcontext():
            hard_model, hard_guide, hard, passes = fused_traces(
                model, guide, args, kwargs, -nesting - 1, self._temperature_like,
                self.estimator_name, self.opt_out_key, self._conditional_noise,
                self.max_plate_nesting, subsamples,
            )
        return hard_model, hard_guide, hard, passes

    def _run_stacked(self, model, guide, args, kwargs, model_trace, guide_trace, hard,
                     noises):
        temperature = self._temperature_like(hard.relaxed[0].logits)
        return stacked_relaxed_traces(
            model, guide, args, kwargs, hard, noises, temperature, self.estimator_name,
            model_trace, guide_trace, detach_scores=True,
        )

    def _run_sequential(self, model, guide, args, kwargs, hard, noises) -> list:
        temperature = self._temperature_like(hard.relaxed[0].logits)
        return [
            relaxed_traces(model, guide, args, kwargs, hard, noise, temperature,
                           self.estimator_name, detach_scores=True)
            for noise in noises
        ]

    def _plate_nesting(self, pair: tuple[int, int], model, guide, args, kwargs,
                       subsamples: dict | None = None) -> int:
        """Plate dimensions the model and guide use (``max_plate_nesting`` if set, else
        found once per model/guide pair from one run of both, as Pyro does for vectorized
        particles)."""
        if self.max_plate_nesting != float("inf"):
            return int(self.max_plate_nesting)
        if pair not in self._guessed_nesting:
            # Without drawing from the random stream: a seeded run (or one resumed from a
            # checkpoint, where this first happens later) then draws the same numbers.
            with RandomState(), poutine.block():
                guide_trace = poutine.trace(FixSubsamples(subsamples or {})(guide)).get_trace(
                    *args, **kwargs)
                model_trace = poutine.trace(
                    poutine.replay(model, trace=guide_trace)
                ).get_trace(*args, **kwargs)
            self._guessed_nesting[pair] = plate_nesting(model_trace, guide_trace)
        return self._guessed_nesting[pair]

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
        v = site_uniform(record.logits.shape, record.logits, record.name, "conditional")
        if record.kind == BERNOULLI:
            return conditional_logistic_noise(record.logits, record.value, v)
        return conditional_gumbel_noise(record.logits, record.value, v)

    def _temperature_like(self, like: torch.Tensor) -> torch.Tensor:
        self._ensure_device(like)
        return self.controls.log_temperature.exp()

    def _ensure_device(self, like: torch.Tensor) -> None:
        t = self.controls.log_temperature
        if t.device != like.device or t.dtype != like.dtype:
            self.controls.to(device=like.device, dtype=like.dtype)
            if self._variance_optim is not None:
                _move_optimizer_state(self._variance_optim, like)

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
        self, surrogate_elbo, cv_f, cv_r, scores, model, guide, loss, stops=()
    ) -> _Estimate:
        controls = self._control_ids()
        leaves, keys = self._leaves_and_keys(scores, model, guide, stops, controls)
        if not leaves:
            # No learnable parameter behind any relaxed site's distribution (fixed probs,
            # say): the control variate has nothing to act on, and the estimate is the
            # hard pass's gradient alone (Trace_ELBO's, whose score terms are then zero).
            return _Estimate(loss, _as_tensor(surrogate_elbo).neg(), [], [])
        learn = self._learnables_requested()
        etas = {key: self._eta_tensor(key, leaves[0]) for key in dict.fromkeys(keys)}
        has_extra = torch.is_tensor(cv_r) and cv_r.requires_grad  # RELAX's learned control
        skip = {id(leaf) for leaf in leaves} | controls
        others = [t for t in graph_leaves([surrogate_elbo], stops) if id(t) not in skip]
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
            self._track_variance(total, float(objective.detach()))
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
        return _Estimate(loss, None, grads, control_grads)

    def _leaves_and_keys(
        self, scores, model, guide, stops=(), controls: set[int] = frozenset()
    ) -> tuple[list[torch.Tensor], list[str]]:
        sites_of: dict[int, list[str]] = {}
        leaves: dict[int, torch.Tensor] = {}
        # In a fused pass the hard slice shares a graph with the relaxed ones, which reach
        # the temperature: the estimator's own parameters (``controls``) are never leaves.
        for name, tensors in scores.items():
            for leaf in graph_leaves(tensors, stops):
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

    def _step_controls(self, control_grads) -> None:
        params = [p for p, _ in control_grads]
        if self._variance_optim is None:
            self._variance_optim = torch.optim.Adam(params, lr=self.variance_optim_lr,
                                                    foreach=True)
        # Asked of the optimizer itself, not of remembered ids: ids go stale in a deep copy
        # (which copies the optimizer's parameters along with the controls).
        known = {id(p) for group in self._variance_optim.param_groups for p in group["params"]}
        new = [p for p in params if id(p) not in known]
        if new:
            self._variance_optim.add_param_group({"params": new})
        for p, g in control_grads:
            p.grad = g.detach()
        self._variance_optim.step()
        for p, _ in control_grads:
            p.grad = None

    def _track_variance(self, grads: list[torch.Tensor], objective: float) -> None:
        grads = [g.detach() for g in grads]
        shapes = [g.shape for g in grads]
        if self._ema is None or [m.shape for m, _ in self._ema] != shapes:
            self._ema = [(torch.zeros_like(g), torch.zeros_like(g)) for g in grads]
            self._ema_steps = 0
        elif self._ema[0][0].dtype != grads[0].dtype or self._ema[0][0].device != grads[0].device:
            # the same guide, moved: so are its statistics
            self._ema = [(m.to(g), s.to(g)) for (m, s), g in zip(self._ema, grads, strict=True)]
        # In place: this runs every step over every guide coordinate.
        weight = 1 - self.variance_ema_decay
        with torch.no_grad():
            means = [m for m, _ in self._ema]
            squares = [s for _, s in self._ema]
            torch._foreach_lerp_(means, grads, weight)
            torch._foreach_mul_(squares, self.variance_ema_decay)
            torch._foreach_addcmul_(squares, grads, grads, value=weight)
        self._ema_steps += 1
        self._last = {"variance_objective": objective}

    def _log_grad_variance(self) -> float | None:
        """Log of the debiased EMA per-coordinate variance, averaged over coordinates; read
        out on demand (in :meth:`diagnostics`) rather than computed every step."""
        if self._ema is None or self._ema_steps < 2:
            return None
        correction = 1 - self.variance_ema_decay**self._ema_steps
        variance = torch.cat([
            (s / correction - (m / correction) ** 2).clamp_min(0).reshape(-1)
            for m, s in self._ema
        ])
        return float(variance.mean().clamp_min(1e-30).log())


def _move_optimizer_state(optim: torch.optim.Optimizer, like: torch.Tensor) -> None:
    """Put an optimizer's per-parameter state where its (moved) parameters now are; the
    step counts stay on the CPU, as torch keeps them for a non-capturable Adam."""
    for state in optim.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                state[key] = value.to(device=like.device, dtype=like.dtype)


def _as_tensor(x) -> torch.Tensor:
    return x if torch.is_tensor(x) else torch.tensor(float(x))


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


def _linear_surrogate(grads: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Zero-valued loss whose gradient w.r.t. each leaf is minus the given ELBO gradient."""
    if not grads:
        return torch.zeros(())
    total = -sum((g.detach() * leaf).sum() for leaf, g in grads)
    return total - total.detach()


def _accumulate_grads(grads: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Add the loss's gradients (minus the given ELBO gradients) into ``.grad`` as
    ``backward`` would: in place into an existing ``.grad`` (as autograd accumulates), so
    that no per-step copies are made; a missing one becomes a new tensor."""
    with torch.no_grad():
        for leaf, g in grads:
            if leaf.grad is None:
                leaf.grad = torch.neg(g)
            else:
                leaf.grad.sub_(g)


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
