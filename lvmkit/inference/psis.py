"""Pareto-smoothed importance sampling diagnostic of a guide: :func:`psis_khat`."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lvmkit.inference import arviz_compat
from lvmkit.inference._draws import draw

__all__ = ["KHAT_THRESHOLDS", "KhatResult", "psis_khat"]

KHAT_THRESHOLDS = (0.5, 0.7)
# PSIS fits its Pareto tail to the largest S/5 ratios (3 sqrt(S) beyond S = 225) and needs 5.
MIN_PSIS_DRAWS = 25


@dataclass(frozen=True)
class KhatResult:
    """Pareto k-hat of the importance ratios p(x, z) / q(z) (Yao et al. 2018).

    ``log_weights`` are the Pareto-smoothed, self-normalized log weights; ``log_ratios``
    the raw log p(x, z) - log q(z) per draw.

    ``constant_weights`` is ``True`` when the log ratios are constant up to rounding (q is
    the posterior up to normalization, e.g. an exact guide): there is no tail to fit, so
    ``khat`` is reported as 0 rather than fitted, the weights are uniform, and ``str()``
    says so.

    Example: the exact posterior as the guide gives constant ratios, each ``log p(y)``.

    >>> import pyro
    >>> import pyro.distributions as dist
    >>> import torch
    >>> def model(y):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    ...     with pyro.plate("data", len(y)):
    ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
    >>> y = torch.tensor([0.5, 1.0, 1.5])
    >>> def exact(y):  # the posterior N(sum y / (n + 1), 1 / (n + 1))
    ...     pyro.sample("mu", dist.Normal(y.sum() / (len(y) + 1), (len(y) + 1) ** -0.5))
    >>> import warnings
    >>> from lvmkit.inference import psis_khat
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")  # the warning that the ratios are constant
    ...     result = psis_khat(model, exact, y, num_samples=100)
    >>> result.khat, result.constant_weights, result.verdict, round(result.ess)
    (0.0, True, 'good', 100)
    >>> round(result.log_evidence, 3)
    -4.075
    """

    khat: float
    log_weights: np.ndarray
    log_ratios: np.ndarray
    thresholds: tuple[float, float] = KHAT_THRESHOLDS
    constant_weights: bool = False

    @property
    def verdict(self) -> str:
        """``"good"`` (k < 0.5), ``"ok"`` (0.5 <= k < 0.7, usable with PSIS), ``"poor"``."""
        good, poor = self.thresholds
        if self.khat < good:
            return "good"
        return "ok" if self.khat < poor else "poor"

    @property
    def num_samples(self) -> int:
        return int(self.log_ratios.shape[0])

    @property
    def ess(self) -> float:
        """Effective sample size of the smoothed weights, 1 / sum w_s^2."""
        return float(1.0 / np.exp(np.logaddexp.reduce(2.0 * self.log_weights)))

    @property
    def log_evidence(self) -> float:
        """Importance-sampling estimate log (1/S) sum_s p(x, z_s) / q(z_s) of log p(x)."""
        return float(np.logaddexp.reduce(self.log_ratios) - math.log(self.num_samples))

    def __str__(self) -> str:
        good, poor = self.thresholds
        note = (
            "; the importance ratios are constant (q matches the posterior up to"
            " normalization), so k-hat is 0 by convention, not fitted"
            if self.constant_weights
            else ""
        )
        return (
            f"PSIS k-hat = {self.khat:.3f} ({self.verdict}; good < {good}, poor > {poor}) "
            f"from {self.num_samples} draws, ESS {self.ess:.1f}{note}"
        )


def khat_from(log_p: torch.Tensor, log_q: torch.Tensor) -> KhatResult:
    log_ratios = (log_p - log_q).detach().double().cpu().numpy()
    bad = ~np.isfinite(log_ratios)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} of {log_ratios.size} draws have a non-finite log p(x,z) - log"
            f" q(z) (first: draw {int(np.argmax(bad))}, value {log_ratios[bad][0]})"
        )
    if log_ratios.size < MIN_PSIS_DRAWS:
        raise ValueError(
            f"PSIS needs at least {MIN_PSIS_DRAWS} draws (a tail of 5 or more),"
            f" got num_samples={log_ratios.size}"
        )
    spread = float(np.ptp(log_ratios))
    if spread <= _rounding_tolerance(log_p, log_q):
        # q is the posterior up to normalization: the ratios are bounded (constant), there
        # is no tail to fit (a Pareto fit gives -inf or fails), and the weights are uniform.
        warnings.warn(
            f"the {log_ratios.size} log importance ratios are constant up to rounding (spread"
            f" {spread:.3g}): q matches the posterior up to normalization; reporting k-hat = 0"
            " (not fitted) and uniform weights",
            stacklevel=3,
        )
        uniform = np.full(log_ratios.size, -math.log(log_ratios.size))
        return KhatResult(
            khat=0.0, log_weights=uniform, log_ratios=log_ratios, constant_weights=True
        )
    log_weights, khat = arviz_compat.psislw(log_ratios)
    return KhatResult(khat=khat, log_weights=log_weights, log_ratios=log_ratios)


def _rounding_tolerance(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """Spread of log ratios that rounding alone explains (float32 sums of many terms)."""
    magnitude = max(float(log_p.abs().max()), float(log_q.abs().max()))
    eps = torch.finfo(log_p.dtype).eps if log_p.is_floating_point() else 1e-7
    return 100.0 * eps * (1.0 + magnitude)


def psis_khat(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    vectorize: bool | None = None,
    **kwargs: Any,
) -> KhatResult:
    """Pareto-smoothed importance sampling diagnostic of a variational approximation.

    With draws z_s ~ q(z | x), the log importance ratios are
    log r_s = log p(x, z_s) - log q(z_s | x), computed from joint traces. A generalized Pareto
    distribution is fitted to the largest ratios (Vehtari et al. 2024, "Pareto smoothed
    importance sampling"); its shape k-hat measures how heavy the tail of p/q is. Yao et al.
    (2018, "Yes, but did it work?: Evaluating variational inference", ICML): k-hat < 0.5
    means q is close to the posterior, 0.5-0.7 usable after PSIS correction, > 0.7 poor.
    A q narrower than the posterior gives heavy-tailed ratios and a large k-hat. Where the
    ratios are constant up to rounding (q is the exact posterior), there is no tail to fit:
    the result has ``khat = 0``, ``constant_weights = True`` and uniform weights, and a
    warning says so.

    :param args: positional arguments of the model and the guide (usually ``x``).
    :param kwargs: keyword arguments of the model and the guide (e.g. ``labels``).

    Example: the prior, wider than the posterior, is a good proposal.

    >>> import pyro
    >>> import pyro.distributions as dist
    >>> import torch
    >>> def model(y):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    ...     with pyro.plate("data", len(y)):
    ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
    >>> y = torch.tensor([0.5, 1.0, 1.5])
    >>> def prior(y):
    ...     pyro.sample("mu", dist.Normal(0.0, 1.0))
    >>> from lvmkit.inference import psis_khat
    >>> result = psis_khat(model, prior, y, num_samples=500)
    >>> result.verdict, result.log_ratios.shape
    ('good', (500,))
    >>> print(result)
    PSIS k-hat = ... (good; good < 0.5, poor > 0.7) from 500 draws, ESS ...
    """
    draws = draw(model, guide, args, kwargs, num_samples, vectorize=vectorize, collect=False)
    return khat_from(draws.log_p, draws.log_q)
