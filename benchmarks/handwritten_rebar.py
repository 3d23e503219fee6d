"""REBAR for a one-layer sigmoid belief net in plain PyTorch (no Pyro): the speed reference.

Written from the formulas of Tucker et al. (2017), "REBAR: Low-variance, unbiased gradient
estimates for discrete latent variable models", NeurIPS, for the same model and guide as
``lvmkit.models.build("sbn-linear" | "sbn-nonlinear", D)``:

    p(b) = Bernoulli(sigmoid(c)),  p(x | b) = Bernoulli(sigmoid(f(b))),
    q(b | x) = Bernoulli(sigmoid(g(x))),

f and g affine maps, or MLPs with two tanh layers of 200 units. With
``f(b) = log p(x, b) - log q(b | x)`` per datum, ``u, v ~ U(0, 1)``,
``z = logit(p) + logit(u)``, ``b = H(z)``, the conditional ``z~ = logit(p) + logit(v')``
with ``v' = v (1 - p)`` if ``b = 0`` and ``v' = v p + (1 - p)`` if ``b = 1``, the guide
gradient is

    [f(b) - eta f(s(z~))] grad log q(b) + eta grad f(s(z)) - eta grad f(s(z~)) + grad f(b),

``s(z) = sigmoid(z / lambda)``; the model's parameters get ``grad f(b)``. In the relaxed
``f(s(z))`` the guide's density of ``s(z)`` is taken at stop-gradient logits (as lvmkit
does: ``c`` may be any differentiable function of the noise). ``eta`` (as
``2 sigmoid(w)``) and ``log lambda`` are trained by a separate Adam (10x the learning
rate) on the sum of squared guide gradients, an unbiased estimate of their second moment.
That objective's gradient includes the score term's: its weight ``f(b) - eta f(s(z~))``
depends on ``eta`` and ``lambda`` (Tucker et al.'s dynamic REBAR adds this term,
``reinf_g_t`` in their code), so the weight is held fixed for the guide's parameters only,
by multiplying it with the zero-valued ``log q(b) - stop_gradient(log q(b))``.
A test checks that every gradient, the controls' included, equals ``RebarELBO``'s on the
same weights and noise.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


def _mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int) -> nn.Sequential:
    sizes = [in_dim, *hidden, out_dim]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def _functional(net: nn.Sequential, params: list[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """``net(h)`` with the given (possibly detached) weights."""
    i = 0
    for layer in net:
        if isinstance(layer, nn.Linear):
            h = F.linear(h, params[i], params[i + 1])
            i += 2
        else:
            h = layer(h)
    return h


def _bernoulli_log_prob(value: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim; also scores relaxed values in (0, 1)."""
    return (value * F.logsigmoid(logits) + (1 - value) * F.logsigmoid(-logits)).sum(-1)


class HandwrittenRebar:
    """One-layer SBN trained with REBAR; :meth:`step` takes one optimizer step."""

    def __init__(
        self,
        x_dim: int,
        units: int = 200,
        nonlinear: bool = False,
        hidden: int = 200,
        lr: float = 3e-4,
        temperature: float = 0.5,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        torch.manual_seed(seed)
        between = (hidden, hidden) if nonlinear else ()
        self.encoder = _mlp(x_dim, between, units).to(device)
        self.decoder = _mlp(units, between, x_dim).to(device)
        self.prior_logits = nn.Parameter(torch.zeros(units, device=device))
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature), device=device))
        self.eta_logit = nn.Parameter(torch.zeros((), device=device))  # eta = 2 sigmoid(0) = 1
        self.guide_params = list(self.encoder.parameters())
        self.model_params = [self.prior_logits, *self.decoder.parameters()]
        self.optim = torch.optim.Adam(self.guide_params + self.model_params, lr=lr)
        self.control_optim = torch.optim.Adam([self.log_temperature, self.eta_logit], lr=10 * lr)

    def _f(self, x, b, q_logits, model_params) -> torch.Tensor:
        """Per-datum ``log p(x, b) - log q(b | x)``."""
        prior, decoder = model_params[0], model_params[1:]
        x_logits = _functional(self.decoder, decoder, b)
        log_lik = -F.binary_cross_entropy_with_logits(x_logits, x, reduction="none").sum(-1)
        return _bernoulli_log_prob(b, prior) + log_lik - _bernoulli_log_prob(b, q_logits)

    def estimate(self, x: torch.Tensor, scale: float = 1.0,
                 noise: tuple[torch.Tensor, torch.Tensor] | None = None):
        """``(loss, guide grads, model grads, control grads)`` of one REBAR draw, from the
        uniforms ``noise = (u, v)`` if given."""
        q_logits = self.encoder(x)
        p = torch.sigmoid(q_logits)
        if noise is None:
            noise = torch.rand_like(q_logits), torch.rand_like(q_logits)
        u, v = (w.clamp(1e-6, 1 - 1e-6) for w in noise)
        z = q_logits + torch.logit(u)
        b = (z > 0).to(x.dtype)
        v_cond = torch.where(b > 0, v * p + (1 - p), v * (1 - p)).clamp(1e-6, 1 - 1e-6)
        z_cond = q_logits + torch.logit(v_cond)
        temperature = self.log_temperature.exp()
        eta = 2 * torch.sigmoid(self.eta_logit)

        # q's logits held fixed in f: the guide's gradient of -log q(b) has mean zero,
        # and Trace_ELBO leaves it out too (its score term carries the guide's gradient)
        frozen_q = q_logits.detach()
        f_hard = self._f(x, b, frozen_q, self.model_params)
        frozen = [param.detach() for param in self.model_params]
        f_relaxed = self._f(x, torch.sigmoid(z / temperature), frozen_q, frozen)
        f_cond = self._f(x, torch.sigmoid(z_cond / temperature), frozen_q, frozen)
        log_q = _bernoulli_log_prob(b, q_logits)
        score = log_q - log_q.detach()  # zero, with the gradient of log q(b)
        guide_surrogate = (
            (f_hard.detach() - eta * f_cond) * score + eta * f_relaxed - eta * f_cond + f_hard
        ).sum() * scale

        guide_grads = torch.autograd.grad(
            -guide_surrogate, self.guide_params, create_graph=True, retain_graph=True
        )
        model_grads = torch.autograd.grad(
            -f_hard.sum() * scale, self.model_params, retain_graph=True
        )
        variance = sum((g**2).sum() for g in guide_grads)
        control_grads = torch.autograd.grad(variance, [self.log_temperature, self.eta_logit])
        loss = -float(f_hard.detach().sum()) * scale
        return loss, [g.detach() for g in guide_grads], model_grads, control_grads

    def step(self, x: torch.Tensor, scale: float = 1.0) -> float:
        """One REBAR step on the batch ``x``; returns the batch's negative ELBO estimate."""
        loss, guide_grads, model_grads, control_grads = self.estimate(x, scale)
        for param, grad in zip(self.guide_params + self.model_params,
                               guide_grads + list(model_grads), strict=True):
            param.grad = grad
        self.optim.step()
        for param, grad in zip([self.log_temperature, self.eta_logit], control_grads,
                               strict=True):
            param.grad = grad
        self.control_optim.step()
        return loss


class HandwrittenScoreFunction(HandwrittenRebar):
    """The same model and guide trained with the plain score-function estimator (what
    Pyro's ``Trace_ELBO`` computes for them): the guide gets ``f(b) grad log q(b | x)``
    (per datum), the model ``grad log p(x, b)``. The yardstick of Pyro's own per-step
    cost: ``Trace_ELBO`` against this is Pyro's overhead on the simplest estimator."""

    def step(self, x: torch.Tensor, scale: float = 1.0) -> float:
        q_logits = self.encoder(x)
        b = torch.bernoulli(torch.sigmoid(q_logits.detach()))
        # q's logits held fixed: this term's gradient reaches the model only
        f = self._f(x, b, q_logits.detach(), self.model_params)
        log_q = _bernoulli_log_prob(b, q_logits)
        surrogate = (f.detach() * log_q + f).sum() * scale
        self.optim.zero_grad()
        (-surrogate).backward()
        self.optim.step()
        return -float(f.detach().sum()) * scale


def time_steps(model: HandwrittenRebar, x_all: torch.Tensor, steps: int, batch_size: int,
               seed: int = 0) -> tuple[float, list[float]]:
    """Median seconds per step and per-datum losses of ``steps`` steps on random batches."""
    generator = torch.Generator().manual_seed(seed)
    n = x_all.shape[0]
    losses, times = [], []
    for _ in range(steps):
        idx = torch.randint(n, (batch_size,), generator=generator)
        tic = time.perf_counter()
        loss = model.step(x_all[idx], scale=n / batch_size)
        times.append(time.perf_counter() - tic)
        losses.append(loss / n)
    return statistics.median(times), losses
