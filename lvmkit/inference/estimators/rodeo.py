"""RODEO: RLOO with discrete-Stein-operator control variates (Shi et al., NeurIPS 2022)."""

from __future__ import annotations

import torch
from torch import nn

from lvmkit.inference.estimators._score import BERNOULLI, loo_mean, reduce_like
from lvmkit.inference.estimators.double_cv import DoubleCVELBO

__all__ = ["RodeoELBO"]


class _SteinSurrogate(nn.Module):
    """``h(lin, fbar) = W2 LeakyReLU(W_x lin + W_z fbar)``, two outputs ``(h0, h1)``: the
    authors' control net (100 hidden units, LeakyReLU slope 0.3), plus the scalars
    ``alpha`` and ``beta`` (initialised at 0, so RODEO starts as RLOO)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense_x = nn.Linear(1, hidden)
        self.dense_z = nn.Linear(1, hidden)
        self.out = nn.Linear(hidden, 2)
        self.alpha = nn.Parameter(torch.zeros(()))
        self.beta = nn.Parameter(torch.zeros(()))

    def hidden_of_fbar(self, fbar: torch.Tensor) -> torch.Tensor:
        """The ``fbar`` half of the hidden layer (shared by a draw's neighbours)."""
        return self.dense_z(fbar.unsqueeze(-1).to(self.out.weight.dtype))

    def forward(self, lin: torch.Tensor, hidden_fbar: torch.Tensor) -> torch.Tensor:
        hidden = self.dense_x(lin.unsqueeze(-1).to(self.out.weight.dtype)) + hidden_fbar
        return self.out(nn.functional.leaky_relu(hidden, 0.3)).to(lin.dtype)


class RodeoELBO(DoubleCVELBO):
    """ELBO gradient with RODEO (Shi, Zhou, Hwang, Titsias & Mackey, 2022, "Gradient
    estimation with discrete Stein operators", NeurIPS): RLOO plus control variates built
    by applying a discrete Stein operator to a learned surrogate, with no extra
    evaluations of ``f``.

    For a Bernoulli or OneHotCategorical guide site (factorised ``q`` with probabilities
    ``pi``; "coordinates" are Bernoulli elements or one-hot groups, ``n`` of them per datum)
    the Gibbs Stein operator is

    .. math::

        (A h)(x) = \\frac1n \\sum_{i} \\sum_{v} q(x_i = v) \\big[h(x^{i \\to v}) - h(x)\\big],
        \\qquad \\mathbb{E}_q[(A h)(x)] = 0 \\text{ for every } h.

    With ``K`` draws per datum and, for draw ``k``, the surrogate
    ``h_k(y) = NN(lin_k(y), fbar_k)``, where ``fbar_k = mean_{j != k} f_j`` and
    ``lin_k(y) = mean_{j != k} df/db(b_j) . (y - b_j)`` (the authors' "avg" variant:
    first-order Taylor expansions of ``f`` around the other draws), ``h_k`` depends only on
    the other draws, and the per-logit estimate is

    .. math::

        \\hat g_\\eta = \\frac1K \\sum_k \\Big[\\big(f_k - \\frac{1}{K-1}\\sum_{j \\ne k}
            (f_j + \\alpha (A h^{(0)}_j)(b_j))\\big)(b_k - \\pi)
            + \\beta\\, \\big(A [h^{(1)}_k \\nabla_\\eta \\log q]\\big)(b_k)\\Big],

    unbiased for every surrogate: the operator's terms have mean zero given the other
    draws. ``h^{(0)}, h^{(1)}`` are the net's two outputs; the net (one per site) and
    ``alpha``, ``beta`` are trained to minimise the mean squared logit estimate, as in the
    authors' code (thjashin/rodeo, ``grad_type="discrete_stein_avg"``; Adam at 1e-3 for
    the net and for ``alpha, beta``, the same rate as the model's).

    Like :class:`DoubleCVELBO`, the controls are module parameters registered with
    ``pyro.module`` under ``module_name`` on every call, so ``SVI``'s optimizer trains them
    (with the caller's learning rate); the surrogate gains ``-mean(g_eta^2)``, which moves
    only them. The neighbours ``x^{i -> v}`` are evaluated by the surrogate only (``n`` or
    ``n C`` cheap net calls per draw), never by the model. The one-hot case uses the same
    Gibbs operator over each group's ``C`` values (the paper's general construction; the
    authors' code covers the binary case).

    :param num_particles: ``K >= 2`` draws (model evaluations) per datum.
    :param hidden: hidden units of the surrogate net (100 in the paper's code).
    :param module_name: param-store name of the controls (unique per instance).

    Example: one SVI step on a small sigmoid belief net.

    >>> import pyro
    >>> import torch
    >>> from lvmkit.inference import RodeoELBO
    >>> from lvmkit.models import build
    >>> model, guide = build("sbn-linear", x_dim=4, layers=(3,))
    >>> x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    >>> elbo = RodeoELBO(num_particles=2, hidden=8)
    >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=elbo)
    >>> isinstance(svi.step(x), float)
    True
    """

    estimator_name = "RodeoELBO"

    def __init__(
        self, num_particles: int = 2, *, hidden: int = 100, module_name: str | None = None,
        **kwargs,
    ) -> None:
        if hidden < 1:
            raise ValueError(f"hidden must be a positive number of units, got {hidden}")
        self.hidden = hidden
        super().__init__(num_particles=num_particles, module_name=module_name, **kwargs)

    def _make_control(self) -> nn.Module:
        return _SteinSurrogate(self.hidden)

    def _discrete_coefficient(self, name, kind, f, value, probs, grad_b, pdim, mask=None):
        control = self._control(name, value)
        s = value - probs
        fbar = loo_mean(f, pdim)
        gbar = loo_mean(grad_b, pdim)
        # lin_k(y) = gbar_k . y - mean_{j != k} g_j . b_j
        offset = loo_mean(reduce_like(grad_b * value, f.shape), pdim)
        lin_x = reduce_like(gbar * value, f.shape) - offset
        if kind == BERNOULLI:
            # neighbour i flips element i; q(x_i = 1 - b_i)
            lin_nbr = lin_x + gbar * (1 - 2 * value)
            weight = probs * (1 - value) + (1 - probs) * value
            coords = reduce_like(torch.ones_like(value), f.shape)
        else:
            # neighbour (i, c) sets group i to c; q(x_i = c) = pi_ic
            lin_nbr = lin_x + gbar - (gbar * value).sum(-1, keepdim=True)
            weight = probs
            coords = reduce_like(torch.ones_like(value), f.shape) / value.shape[-1]
        hidden_fbar = control.hidden_of_fbar(fbar)
        h_x = control(lin_x, hidden_fbar)
        h_nbr = control(lin_nbr, hidden_fbar)
        total_weight = reduce_like(weight, f.shape)
        stein_h0 = (reduce_like(weight * h_nbr[..., 0], f.shape) - total_weight * h_x[..., 0])
        stein_h0 = stein_h0 / coords
        weighted = weight * h_nbr[..., 1]
        total = reduce_like(weighted, f.shape)
        if kind == BERNOULLI:
            # sum_i w_i h(x^i) s(x^i): s(x^i) equals s(x) except at element i
            moved = s * total + weighted * (1 - 2 * value)
        else:
            group = weighted.sum(-1, keepdim=True)
            moved = s * (total - group) + weighted - probs * group
        stein_h1 = (moved - h_x[..., 1] * s * total_weight) / coords
        base = (f - loo_mean(f, pdim)) * s
        # the Stein terms have mean zero element by element, so dropping them where the
        # site is masked keeps the estimate unbiased, and a masked element that nothing
        # depends on keeps its exact zero instead of the net's noise
        stein = (-loo_mean(control.alpha.to(f.dtype) * stein_h0, pdim) * s
                 + control.beta.to(f.dtype) * stein_h1)
        return base + (stein if mask is None else stein * mask)
