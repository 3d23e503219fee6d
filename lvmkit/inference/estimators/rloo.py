"""REINFORCE leave-one-out (Kool, van Hoof & Welling, 2019)."""

from __future__ import annotations

from lvmkit.inference.estimators._score import LeaveOneOutELBO

__all__ = ["RLOOELBO"]


class RLOOELBO(LeaveOneOutELBO):
    """ELBO gradient with the REINFORCE leave-one-out estimator (Kool, van Hoof & Welling,
    2019, "Buy 4 REINFORCE samples, get a baseline for free!", ICLR DeepRL workshop).

    ``K = num_particles`` independent draws ``z_1..z_K ~ q(z | x)`` per datum (Pyro's
    vectorized particles; ``K`` is the number of model evaluations per datum). With the
    learning signal ``f(z) = log p(x, z) - log q(z | x)`` Rao-Blackwellised by plate as in
    ``Trace_ELBO`` (a site's signal sums the log-densities of the plates it is in):

    .. math::

        \\hat g = \\frac1K \\sum_{k=1}^K \\Big[ \\Big(f(z_k) - \\frac{1}{K-1}
            \\sum_{j \\ne k} f(z_j)\\Big) \\nabla_\\phi \\log q_\\phi(z_k \\mid x)
            + \\nabla^{\\text{path}} f(z_k) \\Big],

    equivalently ``K/(K-1)`` times the signal centred on the mean of all ``K``. The
    baseline of draw ``k`` depends only on the other draws, so ``E[g] = grad ELBO``.
    Reparameterized continuous sites keep their pathwise gradient (the second term); the
    score term applies to every non-reparameterized site (Bernoulli, OneHotCategorical,
    Categorical, Poisson, ...). A masked element (``poutine.mask``, ``.mask()``) drops its
    own log-density but keeps the score gradient of the rest of the ELBO's dependence on
    its value, and subsampling scales enter through the signal, both as in ``Trace_ELBO``.

    :param num_particles: ``K >= 2`` draws per datum; ``K = 1`` is refused (there is no
        leave-one-out baseline). Particles are always vectorized; the first call with a
        model and guide runs particle 0 alone as well and raises
        :class:`~lvmkit.inference.estimators.EstimatorError`, naming the site, if the
        vectorized log-probabilities differ (a model that reduces with ``.sum()``).

    Example: one SVI step with four draws per datum, on a VAE with categorical latents.

    >>> import pyro
    >>> import torch
    >>> from lvmkit.inference import RLOOELBO
    >>> from lvmkit.models import build
    >>> model, guide = build("categorical-vae", x_dim=4, num_latents=2, num_categories=3)
    >>> x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    >>> elbo = RLOOELBO(num_particles=4)
    >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=elbo)
    >>> isinstance(svi.step(x), float)
    True
    """

    estimator_name = "RLOOELBO"
