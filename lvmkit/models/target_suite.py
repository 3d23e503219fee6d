"""A seeded random suite of unnormalised targets with exact ``log Z``, in 2 to 10 dimensions.

:func:`draw_targets` returns a fresh set of targets for each seed, covering six families,
so that a guide's defaults cannot be tuned to any one target. Every target is a
:class:`~lvmkit.models.targets.SyntheticTarget`: a Pyro model with one latent site ``"z"``
of shape ``(dim,)`` whose joint density is ``f(z)``, and ``log_Z = log ∫ f``. ``log Z``
is exact in every dimension because each family is built from pieces with closed-form or
one-dimensional integrals:

- :class:`GaussianMixtureTarget`: ``C Σ_k w_k N(z; μ_k, diag σ_k^2)``; ``Z = C``.
- :class:`BananaTarget`: independent 2-D bananas (a Gaussian pushed through the
  unit-Jacobian shear ``z2 -> z2 - b (z1^2 - s1^2)``, Haario et al. 1999), then rotated;
  ``Z = Π 2π s1 s2`` (rotations and shears keep volume).
- :class:`FunnelTarget`: Neal's funnel ``v ~ N(0, s^2)``, ``x_i | v ~ N(0, e^v)``,
  unnormalised; ``Z = (2π)^{D/2} s exp(s^2 (D-1)^2 / 8)``.
- :class:`CorrelatedGaussianTarget`: ``exp(-(z-m)^T Σ^{-1} (z-m) / 2)``; ``Z = (2π)^{D/2}
  |Σ|^{1/2}``.
- :class:`StudentTTarget`: the multivariate t kernel ``(1 + δ / ν)^{-(ν+D)/2}``;
  ``Z = Γ(ν/2) (νπ)^{D/2} |Σ|^{1/2} / Γ((ν+D)/2)``.
- :class:`SquaredObservationTarget`: ``z_i ~ N(0, 1)``, ``y_i ~ N(z_i^2, s_i^2)`` observed,
  so each coordinate is seen only through its square: ``2^D`` symmetric modes. The joint
  factorises over coordinates, so ``log Z = Σ_i log p(y_i)``, each a 1-D quadrature.

The mixture and squared-observation families are multimodal (``target.multimodal``);
a mean-field Gaussian then misses mass, which is the gap a hierarchical guide must close.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lvmkit.models.targets import SyntheticTarget

__all__ = [
    "FAMILIES",
    "BananaTarget",
    "CorrelatedGaussianTarget",
    "FunnelTarget",
    "GaussianMixtureTarget",
    "SquaredObservationTarget",
    "StudentTTarget",
    "draw_targets",
]

LOG_2PI = math.log(2 * math.pi)


def _check_dim(dim: int, low: int = 1) -> int:
    if not isinstance(dim, int) or dim < low:
        raise ValueError(f"dim must be an integer >= {low}, got {dim!r}")
    return dim


def _as_matrix(value, dim: int, what: str) -> torch.Tensor:
    matrix = torch.as_tensor(value, dtype=torch.float64)
    if matrix.shape != (dim, dim):
        raise ValueError(f"{what} must have shape ({dim}, {dim}), got {tuple(matrix.shape)}")
    return matrix


def _random_rotation(rng: np.random.Generator, dim: int) -> np.ndarray:
    """A Haar-random orthogonal matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def _random_covariance(rng: np.random.Generator, dim: int, low: float, high: float):
    """``Q diag(λ) Q^T`` with log-uniform eigenvalues in ``[low, high]``."""
    eigen = np.exp(rng.uniform(math.log(low), math.log(high), dim))
    q = _random_rotation(rng, dim)
    return (q * eigen) @ q.T


class _SuiteTarget(SyntheticTarget):
    family: str = "target"
    multimodal: bool = False

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = _check_dim(dim)
        self.name = f"{self.family}{dim}d"

    def _quadrature_log_Z(self) -> float:
        return self.analytic_log_Z()

    def describe(self) -> dict:
        """The target's parameters, for a benchmark's record."""
        return {"family": self.family, "dim": self.dim, "log_Z": self.log_Z}


class GaussianMixtureTarget(_SuiteTarget):
    """``f(z) = C Σ_k w_k N(z; μ_k, diag σ_k^2)``, so ``log Z = log C`` exactly.

    :param locs: component means, shape ``(K, D)``.
    :param scales: component standard deviations, shape ``(K, D)``, positive.
    :param weights: component weights, shape ``(K,)``, positive, summing to 1.
    :param log_constant: ``log C``.

    Example: a normalised mixture has ``log Z = log_constant``.

    >>> import torch
    >>> from lvmkit.models.target_suite import GaussianMixtureTarget
    >>> target = GaussianMixtureTarget(torch.tensor([[-2.0, 0.0], [2.0, 0.0]]),
    ...                                torch.ones(2, 2), torch.tensor([0.5, 0.5]))
    >>> target.log_Z
    0.0
    """

    family = "mixture"
    multimodal = True

    def __init__(self, locs, scales, weights, log_constant: float = 0.0) -> None:
        locs = torch.as_tensor(locs, dtype=torch.float64)
        scales = torch.as_tensor(scales, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if locs.dim() != 2 or scales.shape != locs.shape:
            raise ValueError(
                f"locs and scales must share a shape (K, D), got {tuple(locs.shape)} and "
                f"{tuple(scales.shape)}"
            )
        if weights.shape != locs.shape[:1]:
            raise ValueError(
                f"weights must have shape ({locs.shape[0]},), got {tuple(weights.shape)}"
            )
        if not bool((scales > 0).all()) or not bool((weights > 0).all()):
            raise ValueError("scales and weights must be positive")
        if abs(float(weights.sum()) - 1) > 1e-9:
            raise ValueError(f"weights must sum to 1, got {float(weights.sum())}")
        super().__init__(locs.shape[1])
        self.locs, self.scales, self.weights = locs, scales, weights
        self.log_constant = float(log_constant)
        self.num_modes = locs.shape[0]

    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        locs, scales = self.locs.to(z), self.scales.to(z)
        per = torch.distributions.Normal(locs, scales).log_prob(z.unsqueeze(-2)).sum(-1)
        return torch.logsumexp(per + self.weights.to(z).log(), -1) + self.log_constant

    def analytic_log_Z(self) -> float:
        return self.log_constant

    def describe(self) -> dict:
        return {**super().describe(), "num_modes": self.num_modes}


class BananaTarget(_SuiteTarget):
    """Rotated product of independent 2-D bananas (plus one Gaussian coordinate if ``D`` is
    odd): with ``w = R^T (z - c)``, block ``j`` scores
    ``-(w1 / s1)^2 / 2 - (w2 - b (w1^2 - s1^2))^2 / (2 s2^2)``.

    :param curvatures: ``b`` per block, shape ``(D // 2,)``.
    :param scales1, scales2: ``s1, s2`` per block, positive.
    :param rotation: orthogonal ``(D, D)`` matrix ``R``; default identity.
    :param shift: ``c``; default 0.
    :param dim: ``2 * len(curvatures)`` (default) or one more (a Gaussian coordinate).

    Example: one 2-D banana block; its log Z is that of the unbent Gaussian.

    >>> from lvmkit.models.target_suite import BananaTarget
    >>> target = BananaTarget([1.0], [1.0], [0.5])
    >>> target.dim, round(target.log_Z, 4)
    (2, 1.1447)
    """

    family = "banana"

    def __init__(
        self, curvatures, scales1, scales2, rotation=None, shift=None, dim: int | None = None
    ) -> None:
        b = torch.as_tensor(curvatures, dtype=torch.float64).reshape(-1)
        s1 = torch.as_tensor(scales1, dtype=torch.float64).reshape(-1)
        s2 = torch.as_tensor(scales2, dtype=torch.float64).reshape(-1)
        if not (b.shape == s1.shape == s2.shape) or b.numel() == 0:
            raise ValueError("curvatures, scales1 and scales2 must be equal-length vectors")
        if not bool((s1 > 0).all() and (s2 > 0).all()):
            raise ValueError("scales1 and scales2 must be positive")
        dim = 2 * b.numel() if dim is None else dim
        if dim not in (2 * b.numel(), 2 * b.numel() + 1):
            raise ValueError(f"dim must be {2 * b.numel()} or {2 * b.numel() + 1}, got {dim}")
        super().__init__(dim)
        self.curvatures, self.scales1, self.scales2 = b, s1, s2
        rotation = torch.eye(dim, dtype=torch.float64) if rotation is None else rotation
        self.rotation = _as_matrix(rotation, dim, "rotation")
        if not torch.allclose(
            self.rotation @ self.rotation.T, torch.eye(dim, dtype=torch.float64), atol=1e-8
        ):
            raise ValueError("rotation must be orthogonal (a volume-preserving map keeps log Z)")
        self.shift = (
            torch.zeros(dim, dtype=torch.float64)
            if shift is None
            else torch.as_tensor(shift, dtype=torch.float64)
        )

    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        w = (z - self.shift.to(z)) @ self.rotation.to(z)
        blocks = 2 * self.curvatures.numel()
        pairs = w[..., :blocks].reshape(w.shape[:-1] + (-1, 2))
        b, s1, s2 = self.curvatures.to(z), self.scales1.to(z), self.scales2.to(z)
        w1, w2 = pairs[..., 0], pairs[..., 1]
        value = -0.5 * (w1 / s1) ** 2 - 0.5 * ((w2 - b * (w1**2 - s1**2)) / s2) ** 2
        value = value.sum(-1)
        if self.dim > blocks:
            value = value - 0.5 * w[..., blocks:].pow(2).sum(-1)
        return value

    def analytic_log_Z(self) -> float:
        blocks = float((LOG_2PI + self.scales1.log() + self.scales2.log()).sum())
        return blocks + 0.5 * (self.dim - 2 * self.curvatures.numel()) * LOG_2PI

    def describe(self) -> dict:
        return {**super().describe(), "curvature": self.curvatures.tolist()}


class FunnelTarget(_SuiteTarget):
    """Neal's funnel in ``D`` dims, unnormalised: ``z = (v, x_1..x_{D-1})``,
    ``f(z) = exp(-v^2 / (2 s^2) - e^{-v} Σ x_i^2 / 2)``.

    Integrating the ``x`` first gives ``(2π e^v)^{(D-1)/2}``, then ``v`` a Gaussian
    integral: ``log Z = (D/2) log 2π + log s + s^2 (D-1)^2 / 8``.

    Example:

    >>> from lvmkit.models.target_suite import FunnelTarget
    >>> target = FunnelTarget(dim=3, scale=1.5)
    >>> target.dim, round(target.log_Z, 4)
    (3, 4.2873)
    """

    family = "funnel"

    def __init__(self, dim: int, scale: float) -> None:
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        super().__init__(_check_dim(dim, 2))
        self.scale = float(scale)

    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        v, x = z[..., 0], z[..., 1:]
        return -0.5 * (v / self.scale) ** 2 - 0.5 * x.pow(2).sum(-1) * torch.exp(-v)

    def analytic_log_Z(self) -> float:
        s, d = self.scale, self.dim
        return 0.5 * d * LOG_2PI + math.log(s) + s**2 * (d - 1) ** 2 / 8

    def describe(self) -> dict:
        return {**super().describe(), "scale": self.scale}


class CorrelatedGaussianTarget(_SuiteTarget):
    """``f(z) = exp(-(z - m)^T Σ^{-1} (z - m) / 2)``, ``log Z = (D/2) log 2π + log|Σ|/2``.

    Example: ``exp(-|z|^2 / 2)`` in 2-D has ``Z = 2 pi``.

    >>> import math, torch
    >>> from lvmkit.models.target_suite import CorrelatedGaussianTarget
    >>> target = CorrelatedGaussianTarget(torch.zeros(2), torch.eye(2))
    >>> math.isclose(target.log_Z, math.log(2 * math.pi))
    True
    """

    family = "gaussian"

    def __init__(self, loc, covariance) -> None:
        loc = torch.as_tensor(loc, dtype=torch.float64).reshape(-1)
        super().__init__(loc.numel())
        self.loc = loc
        self.covariance = _as_matrix(covariance, self.dim, "covariance")
        self.scale_tril = torch.linalg.cholesky(self.covariance)  # raises if not SPD

    def _mahalanobis(self, z: torch.Tensor) -> torch.Tensor:
        diff = (z - self.loc.to(z)).unsqueeze(-1)
        tril = self.scale_tril.to(z).expand(diff.shape[:-2] + self.scale_tril.shape)
        solved = torch.linalg.solve_triangular(tril, diff, upper=False)
        return solved.squeeze(-1).pow(2).sum(-1)

    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        return -0.5 * self._mahalanobis(z)

    def _log_det(self) -> float:
        return float(2 * self.scale_tril.diagonal().log().sum())

    def analytic_log_Z(self) -> float:
        return 0.5 * self.dim * LOG_2PI + 0.5 * self._log_det()

    def describe(self) -> dict:
        eigen = torch.linalg.eigvalsh(self.covariance)
        return {**super().describe(), "condition": float(eigen.max() / eigen.min())}


class StudentTTarget(CorrelatedGaussianTarget):
    """Multivariate t kernel ``f(z) = (1 + δ(z) / ν)^{-(ν + D)/2}``, ``δ`` the Mahalanobis
    distance under ``Σ``; ``Z = Γ(ν/2) (νπ)^{D/2} |Σ|^{1/2} / Γ((ν + D)/2)``.

    Example:

    >>> import torch
    >>> from lvmkit.models.target_suite import StudentTTarget
    >>> target = StudentTTarget(torch.zeros(2), torch.eye(2), df=5.0)
    >>> target.dim, isinstance(target.log_Z, float)
    (2, True)
    """

    family = "student_t"

    def __init__(self, loc, covariance, df: float) -> None:
        if not df > 0:
            raise ValueError(f"df must be positive, got {df}")
        super().__init__(loc, covariance)
        self.df = float(df)

    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        return -0.5 * (self.df + self.dim) * torch.log1p(self._mahalanobis(z) / self.df)

    def analytic_log_Z(self) -> float:
        nu, d = self.df, self.dim
        return (
            math.lgamma(nu / 2)
            + 0.5 * d * math.log(nu * math.pi)
            + 0.5 * self._log_det()
            - math.lgamma((nu + d) / 2)
        )

    def describe(self) -> dict:
        return {**super().describe(), "df": self.df}


class SquaredObservationTarget(_SuiteTarget):
    """``z_i ~ N(0, 1)`` and ``y_i ~ N(z_i^2, s_i^2)`` observed: each coordinate is seen only
    through its square, so the posterior has ``2^D`` modes at ``z_i ≈ ±sqrt(y_i)``.

    ``f(z) = Π_i N(z_i; 0, 1) N(y_i; z_i^2, s_i^2)`` (normalised factors), so
    ``Z = Π_i p(y_i)``; each ``log p(y_i)`` is a 1-D trapezoid quadrature, which converges
    geometrically for this smooth, Gaussian-tailed integrand.

    Example: each coordinate is seen only through its square, so every sign pattern is a mode.

    >>> import torch
    >>> from lvmkit.models.target_suite import SquaredObservationTarget
    >>> target = SquaredObservationTarget(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5]))
    >>> target.dim, isinstance(target.log_Z, float)
    (2, True)
    """

    family = "square"
    multimodal = True

    def __init__(self, observations, noise) -> None:
        y = torch.as_tensor(observations, dtype=torch.float64).reshape(-1)
        s = torch.as_tensor(noise, dtype=torch.float64).reshape(-1)
        if s.shape != y.shape or not bool((s > 0).all()):
            raise ValueError("noise must be positive and match observations in length")
        super().__init__(y.numel())
        self.observations, self.noise = y, s
        self.num_modes = 2**self.dim

    def _log_factors(self, z: torch.Tensor) -> torch.Tensor:
        y, s = self.observations.to(z), self.noise.to(z)
        prior = -0.5 * z**2 - 0.5 * LOG_2PI
        likelihood = -0.5 * ((y - z**2) / s) ** 2 - s.log() - 0.5 * LOG_2PI
        return prior + likelihood

    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        return self._log_factors(z).sum(-1)

    def analytic_log_Z(self) -> float:
        # the modes are at most sqrt(max y) + a few widths from 0; the prior kills |z| > 12
        step = 1e-3
        grid = torch.arange(-12.0, 12.0 + step / 2, step, dtype=torch.float64)
        log_f = self._log_factors(grid.unsqueeze(-1).expand(-1, self.dim))
        return float((torch.logsumexp(log_f, 0) + math.log(step)).sum())

    def describe(self) -> dict:
        return {**super().describe(), "num_modes": self.num_modes}


# -- the random suite ----------------------------------------------------------------------
def _draw_mixture(rng: np.random.Generator) -> GaussianMixtureTarget:
    dim = int(rng.integers(2, 9))
    num = int(rng.integers(2, 7))
    scales = rng.uniform(0.3, 1.0, (num, dim))
    # modes far enough apart to be separate basins: centres on a sphere of random radius,
    # redrawn until every pair is at least 3 of the larger widths apart
    for _ in range(1000):
        direction = rng.standard_normal((num, dim))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        locs = direction * rng.uniform(2.0, 5.0, (num, 1)) + rng.normal(0, 1.0, dim)
        gaps = np.linalg.norm(locs[:, None] - locs[None], axis=-1) + np.eye(num) * 1e9
        widths = np.maximum(scales.max(1)[:, None], scales.max(1)[None])
        if (gaps >= 3 * widths).all():
            break
    weights = rng.dirichlet(np.full(num, 2.0))
    return GaussianMixtureTarget(locs, scales, weights, log_constant=rng.uniform(-3, 3))


def _draw_banana(rng: np.random.Generator) -> BananaTarget:
    dim = int(rng.choice([2, 2, 3, 4, 6]))
    blocks = dim // 2
    rotation = _random_rotation(rng, dim) if rng.uniform() < 0.5 else np.eye(dim)
    return BananaTarget(
        rng.uniform(0.3, 2.0, blocks) * rng.choice([-1, 1], blocks),
        rng.uniform(0.6, 1.5, blocks),
        rng.uniform(0.2, 0.6, blocks),
        rotation=rotation,
        shift=rng.normal(0, 1.0, dim),
        dim=dim,
    )


def _draw_funnel(rng: np.random.Generator) -> FunnelTarget:
    dim = int(rng.integers(2, 6))
    return FunnelTarget(dim, rng.uniform(0.5, 1.5) * min(1.0, 2.0 / math.sqrt(dim)))


def _draw_gaussian(rng: np.random.Generator) -> CorrelatedGaussianTarget:
    dim = int(rng.integers(2, 11))
    return CorrelatedGaussianTarget(
        rng.normal(0, 1.0, dim), _random_covariance(rng, dim, 0.05, 4.0)
    )


def _draw_student(rng: np.random.Generator) -> StudentTTarget:
    dim = int(rng.integers(2, 7))
    return StudentTTarget(
        rng.normal(0, 1.0, dim), _random_covariance(rng, dim, 0.1, 3.0), df=rng.uniform(2.0, 8.0)
    )


def _draw_square(rng: np.random.Generator) -> SquaredObservationTarget:
    dim = int(rng.integers(2, 4))
    return SquaredObservationTarget(rng.uniform(1.5, 4.0, dim), rng.uniform(0.3, 0.8, dim))


FAMILIES = {
    "mixture": _draw_mixture,
    "banana": _draw_banana,
    "funnel": _draw_funnel,
    "gaussian": _draw_gaussian,
    "student_t": _draw_student,
    "square": _draw_square,
}


def draw_targets(seed: int, n: int = 20) -> list[_SuiteTarget]:
    """``n`` random targets (at least one of every family) drawn from ``seed``.

    The families take turns (in a seed-dependent order), and each target's dimension and
    parameters are drawn afresh, so two seeds share no target.

    :param seed: seed of the numpy generator that draws every parameter.
    :param n: number of targets, at least ``len(FAMILIES)``.

    Example:

    >>> from lvmkit.models.target_suite import FAMILIES, draw_targets
    >>> targets = draw_targets(seed=1, n=len(FAMILIES))
    >>> len(targets), all(isinstance(t.log_Z, float) for t in targets)
    (6, True)
    >>> draw_targets(1, 6)[0].name == targets[0].name   # the same seed, the same targets
    True
    """
    if not isinstance(n, int) or n < len(FAMILIES):
        raise ValueError(f"n must be an integer >= {len(FAMILIES)} (one per family), got {n!r}")
    rng = np.random.default_rng(seed)
    order = [list(FAMILIES)[i] for i in rng.permutation(len(FAMILIES))]
    targets = []
    for i in range(n):
        target = FAMILIES[order[i % len(order)]](rng)
        target.name = f"{target.name}#{i}"
        targets.append(target)
    return targets
