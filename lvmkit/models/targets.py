"""Synthetic unnormalised 2-D targets whose normalising constant is known exactly.

Each target is a Pyro model with no observations: one latent site ``"z"`` of shape ``(2,)``
and a ``pyro.factor("log_density", log f(z))``. Its evidence is
``Z = ∫ f(z) dz``, so for any guide ``ELBO <= log Z`` and ``log Z - ELBO`` is the exact
KL(q || f / Z). ``log_Z`` is computed by numerical quadrature (``scipy.integrate``) and each
target also states its closed form (:meth:`analytic_log_Z`) so the two can be checked
against each other.

Targets (the standard test beds for expressive variational families, e.g. Rezende &
Mohamed 2015, Ranganath et al. 2016, Neal 2003):

- :class:`RingOfModes`: an equal-weight mixture of ``K`` isotropic Gaussians on a circle
  (symmetric and multimodal; a unimodal guide covers one mode: gap ``≈ log K``).
- :class:`Banana`: a Gaussian pushed through the shear ``z2 -> z2 - b (z1^2 - s^2)``.
- :class:`Funnel`: Neal's funnel ``v ~ N(0, s_v^2)``, ``x | v ~ N(0, e^v)``, unnormalised.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch

__all__ = ["SyntheticTarget", "RingOfModes", "Banana", "Funnel"]

CARRIER_SCALE = 5.0


class SyntheticTarget:
    """Base class: an unnormalised density ``f`` over R^dim and the model that scores it.

    Subclasses implement :meth:`log_density` (batched over leading dims of
    ``z[..., dim]``), :meth:`analytic_log_Z` and :meth:`_quadrature_log_Z`; ``dim`` is 2
    unless a subclass sets it (the random suite of :mod:`lvmkit.models.target_suite` does).

    Example: every target is a Pyro program with one latent site ``"z"``.

    >>> import pyro
    >>> from lvmkit.models.targets import Banana
    >>> trace = pyro.poutine.trace(Banana().model).get_trace()
    >>> trace.nodes["z"]["value"].shape
    torch.Size([2])
    """

    name: str = "target"
    dim: int = 2

    def __init__(self) -> None:
        self._log_Z: float | None = None

    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        """Unnormalised log density ``log f(z)`` for ``z`` of shape ``(..., 2)``."""
        raise NotImplementedError

    def analytic_log_Z(self) -> float:
        """Closed-form ``log ∫ f`` (used to check the quadrature)."""
        raise NotImplementedError

    def _quadrature_log_Z(self) -> float:
        raise NotImplementedError

    @property
    def log_Z(self) -> float:
        """``log ∫ f(z) dz`` by numerical quadrature (computed once, then cached)."""
        if self._log_Z is None:
            self._log_Z = float(self._quadrature_log_Z())
        return self._log_Z

    def model(self) -> None:
        """The Pyro model: site ``"z"`` of shape ``(dim,)`` and the factor ``"log_density"``.

        ``z`` gets a broad Gaussian "carrier" ``N(0, 5^2 I)`` whose log density the factor
        subtracts again, so the joint is exactly ``f(z)``; the carrier only gives Pyro's
        autoguides something to initialise from (its median, 0).
        """
        carrier = dist.Normal(torch.zeros(self.dim), CARRIER_SCALE).to_event(1)
        z = pyro.sample("z", carrier)
        pyro.factor("log_density", self.log_density(z) - carrier.log_prob(z))

    def __call__(self) -> None:
        self.model()

    def _log_density_numpy(self, z1: float, z2: float) -> float:
        z = torch.tensor([z1, z2], dtype=torch.float64)
        return float(self.log_density(z))


def _log_dblquad(log_f, v_limits, inner_limits, log_shift: float) -> float:
    """``log ∫∫ exp(log_f)`` by adaptive quadrature, shifted by ``log_shift`` for range."""
    from scipy import integrate

    value, _ = integrate.dblquad(
        lambda y, x: math.exp(log_f(x, y) - log_shift),
        v_limits[0],
        v_limits[1],
        inner_limits[0],
        inner_limits[1],
        epsabs=1e-12,
        epsrel=1e-9,
    )
    return math.log(value) + log_shift


class RingOfModes(SyntheticTarget):
    """Equal mixture of ``num_modes`` Gaussians with std ``scale`` on a circle of ``radius``.

    ``f(z) = Σ_k exp(-|z - μ_k|^2 / (2 scale^2))`` (no normalisers), so
    ``Z = K · 2π scale^2``.

    Example:

    >>> import math
    >>> from lvmkit.models.targets import RingOfModes
    >>> target = RingOfModes(num_modes=4, scale=0.5)
    >>> math.isclose(target.log_Z, math.log(4 * 2 * math.pi * 0.25))
    True
    """

    name = "ring"

    def __init__(self, num_modes: int = 4, radius: float = 3.0, scale: float = 0.5) -> None:
        super().__init__()
        if num_modes < 1:
            raise ValueError(f"num_modes must be >= 1, got {num_modes}")
        if radius < 0 or scale <= 0:
            raise ValueError(f"need radius >= 0 and scale > 0, got {radius}, {scale}")
        self.num_modes, self.radius, self.scale = num_modes, radius, scale
        angles = 2 * math.pi * torch.arange(num_modes, dtype=torch.float64) / num_modes
        self.centers = radius * torch.stack([angles.cos(), angles.sin()], -1)

    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        centers = self.centers.to(z)
        sq = ((z.unsqueeze(-2) - centers) ** 2).sum(-1)
        return torch.logsumexp(-0.5 * sq / self.scale**2, -1)

    def analytic_log_Z(self) -> float:
        return math.log(self.num_modes * 2 * math.pi * self.scale**2)

    def _quadrature_log_Z(self) -> float:
        # Trapezoid rule on a grid over the whole plane, evaluating the target's own
        # log_density: for smooth, rapidly decaying integrands it converges geometrically
        # in the step, and a step of scale/8 is exact to machine precision here.
        half = self.radius + 12 * self.scale
        step = self.scale / 8
        grid = torch.arange(-half, half + step / 2, step, dtype=torch.float64)
        z = torch.stack(torch.meshgrid(grid, grid, indexing="ij"), -1)
        log_f = self.log_density(z)
        return float(torch.logsumexp(log_f.reshape(-1), 0) + 2 * math.log(step))


class Banana(SyntheticTarget):
    """Curved target: ``u1 = z1 / s1``, ``u2 = z2 - b (z1^2 - s1^2)``,
    ``f(z) = exp(-u1^2/2 - u2^2 / (2 s2^2))``.

    The shear has unit Jacobian, so ``Z = 2π s1 s2``.

    Example:

    >>> from lvmkit.models.targets import Banana
    >>> round(Banana(curvature=1.0).log_Z, 4)
    1.1447
    """

    name = "banana"

    def __init__(self, curvature: float = 1.0, scale1: float = 1.0, scale2: float = 0.5) -> None:
        super().__init__()
        if scale1 <= 0 or scale2 <= 0:
            raise ValueError(f"scales must be positive, got {scale1}, {scale2}")
        self.curvature, self.scale1, self.scale2 = curvature, scale1, scale2

    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        z1, z2 = z[..., 0], z[..., 1]
        u1 = z1 / self.scale1
        u2 = z2 - self.curvature * (z1**2 - self.scale1**2)
        return -0.5 * u1**2 - 0.5 * (u2 / self.scale2) ** 2

    def analytic_log_Z(self) -> float:
        return math.log(2 * math.pi * self.scale1 * self.scale2)

    def _quadrature_log_Z(self) -> float:
        from scipy import integrate

        b, s1, s2 = self.curvature, self.scale1, self.scale2
        lim1 = 12 * s1

        def inner(z1: float) -> float:
            # The z2-profile is a Gaussian centred on the curve: integrate around its centre.
            centre = b * (z1**2 - s1**2)
            value, _ = integrate.quad(
                lambda z2: math.exp(-0.5 * (z1 / s1) ** 2 - 0.5 * ((z2 - centre) / s2) ** 2),
                centre - 12 * s2,
                centre + 12 * s2,
                epsabs=1e-14,
                epsrel=1e-10,
            )
            return value

        value, _ = integrate.quad(inner, -lim1, lim1, epsabs=1e-12, epsrel=1e-10, limit=200)
        return math.log(value)


class Funnel(SyntheticTarget):
    """Neal's funnel in 2-D, unnormalised: ``z = (v, x)``,
    ``f(z) = exp(-v^2 / (2 s_v^2) - x^2 e^{-v} / 2)``.

    Integrating ``x`` first gives ``sqrt(2π) e^{v/2}``, so
    ``Z = 2π s_v exp(s_v^2 / 8)``. The quadrature integrates ``x`` over ``±12 e^{v/2}``
    (the funnel's width at ``v``), so the neck is resolved and the result is exact to
    ~1e-9.

    Example:

    >>> from lvmkit.models.targets import Funnel
    >>> round(Funnel(scale_v=1.5).log_Z, 4)
    2.5246
    """

    name = "funnel"

    def __init__(self, scale_v: float = 1.5) -> None:
        super().__init__()
        if scale_v <= 0:
            raise ValueError(f"scale_v must be positive, got {scale_v}")
        self.scale_v = scale_v

    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        v, x = z[..., 0], z[..., 1]
        return -0.5 * (v / self.scale_v) ** 2 - 0.5 * x**2 * torch.exp(-v)

    def analytic_log_Z(self) -> float:
        s = self.scale_v
        return math.log(2 * math.pi * s) + s**2 / 8

    def _quadrature_log_Z(self) -> float:
        from scipy import integrate

        s = self.scale_v
        v_lim = 12 * s

        def inner(v: float) -> float:
            width = 12 * math.exp(v / 2)
            value, _ = integrate.quad(
                lambda x: math.exp(-0.5 * (v / s) ** 2 - 0.5 * x**2 * math.exp(-v)),
                -width,
                width,
                epsabs=0.0,
                epsrel=1e-11,
            )
            return value

        value, _ = integrate.quad(inner, -v_lim, v_lim, epsabs=0.0, epsrel=1e-10, limit=400)
        return math.log(value)
