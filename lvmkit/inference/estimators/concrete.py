"""Concrete / Gumbel-softmax relaxation: pathwise but *biased* gradients.

Maddison, Mnih, Teh. "The Concrete distribution: a continuous relaxation of discrete random
variables." ICLR 2017. Jang, Gu, Poole. "Categorical reparameterization with
Gumbel-softmax." ICLR 2017.

Each discrete guide site ``b = H(logits + n)`` is replaced by ``sigma_lambda(logits + n)``
(binary Concrete: ``sigmoid((logits + logit(u)) / lambda)``; Gumbel-softmax:
``softmax((log_softmax(logits) + g) / lambda)``) and the gradient of the relaxed objective

.. math::

    \\nabla\\, \\mathbb{E}_n\\big[\\log p(x, \\sigma_\\lambda(z)) - \\log q(\\sigma_\\lambda(z)
        \\mid x)\\big]

is used, with both log-densities the continuous extensions of the discrete ones
(``v log p + (1 - v) log(1 - p)``; ``sum_i v_i log p_i``). This is **not** the gradient of
the ELBO: the estimator is biased for every ``lambda > 0`` (the bias vanishes only as
``lambda -> 0``, where the variance blows up). With ``straight_through=True`` the forward
value is the hard ``b`` and only the backward pass uses the relaxation (Jang et al. 2017);
that is biased as well. :func:`lvmkit.inference.check.check_unbiased` detects the bias.
"""

from __future__ import annotations

from pyro.infer import Trace_ELBO
from pyro.infer.util import torch_item

from lvmkit.inference.estimators._relax import (
    StepNoise,
    elbo_integrand,
    hard_traces,
    log_weight_terms,
    relaxed_traces,
)

__all__ = ["ConcreteELBO"]


class ConcreteELBO(Trace_ELBO):
    """Relaxed (biased) pathwise estimator; a drop-in ``Trace_ELBO``.

    The reported loss is the ordinary (hard) negative ELBO of the same noise draw, so it
    is comparable with other estimators; the gradient is the relaxed objective's.
    Discrete sites opted out with ``infer={"concrete": False}`` keep a score-function
    term (weighted by the relaxed ``log p - log q``, Rao-Blackwellized by plate).
    Reparameterized continuous sites use their pathwise gradient.

    :param temperature: the relaxation temperature ``lambda`` (fixed).
    :param straight_through: hard values forward, relaxed gradients backward.

    Example: one SVI step on a small sigmoid belief net.

    >>> import pyro
    >>> import torch
    >>> from lvmkit.inference import ConcreteELBO
    >>> from lvmkit.models import build
    >>> model, guide = build("sbn-linear", x_dim=4, layers=(3,))
    >>> x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    >>> elbo = ConcreteELBO(temperature=0.5)
    >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=elbo)
    >>> isinstance(svi.step(x), float)
    True
    >>> elbo.diagnostics()
    {'temperature': 0.5}
    """

    estimator_name = "ConcreteELBO"
    # Aims at the ELBO, biased for it (unbiased only for the relaxed objective, which
    # check.check_unbiased cannot enumerate): the check is expected to fail.
    objective = "elbo"
    opt_out_key = "concrete"

    def __init__(
        self,
        num_particles: int = 1,
        temperature: float = 0.5,
        straight_through: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(num_particles=num_particles, **kwargs)
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.straight_through = straight_through

    def diagnostics(self) -> dict[str, float]:
        """Floats to log each step (the temperature is fixed)."""
        return {"temperature": self.temperature}

    # Pyro's template: Trace_ELBO runs the particles (vectorized or not) and the three
    # entry points; a particle is a hard pass (the loss) and a relaxed pass (the gradient).

    def _get_trace(self, model, guide, args, kwargs):
        """The hard pass; what its relaxed pass needs rides on the guide trace (that pass
        draws nothing new: the hard pass's noise, continuous sites from their RNG state)."""
        with StepNoise():
            model_trace, guide_trace, hard = hard_traces(
                model, guide, args, kwargs, self.max_plate_nesting,
                self.estimator_name, self.opt_out_key,
            )
        guide_trace.concrete_pass = (model, guide, args, kwargs, hard)
        return model_trace, guide_trace

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        loss = -torch_item(elbo_integrand(model_trace, guide_trace))
        model, guide, args, kwargs, hard = guide_trace.concrete_pass
        noise = {r.name: r.noise for r in hard.relaxed}
        rmt, rgt, _ = relaxed_traces(
            model, guide, args, kwargs, hard, noise, self.temperature,
            self.estimator_name, straight_through=self.straight_through,
        )
        return loss, -(elbo_integrand(rmt, rgt) + self._score_terms(rmt, rgt, hard))

    @staticmethod
    def _score_terms(model_trace, guide_trace, hard):
        """Score-function terms for the discrete sites that are not relaxed."""
        names = [
            r.name for r in hard.records.values() if not r.relaxed and r.seed is None
        ]
        if not names:
            return 0.0
        guide_trace.compute_score_parts()
        log_r = log_weight_terms(model_trace, guide_trace, detach=True)
        total = 0.0
        for name in names:
            site = guide_trace.nodes[name]
            score = site["score_parts"].score_function
            total = total + (score * log_r.sum_to(site["cond_indep_stack"])).sum()
        return total
