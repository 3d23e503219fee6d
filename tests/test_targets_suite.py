"""The random target suite: exact log Z (checked independently), coverage, determinism."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine

from lvmkit.models.target_suite import (
    FAMILIES,
    BananaTarget,
    CorrelatedGaussianTarget,
    FunnelTarget,
    GaussianMixtureTarget,
    SquaredObservationTarget,
    StudentTTarget,
    draw_targets,
)


def _importance_log_Z(target, num=200_000, scale=3.0, seed=0):
    """log Z by importance sampling from a broad Student-t, independent of the closed form."""
    proposal = torch.distributions.StudentT(
        3.0, torch.zeros(target.dim, dtype=torch.float64), scale
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        z = proposal.sample((num,))
    log_w = target.log_density(z) - proposal.log_prob(z).sum(-1)
    estimate = torch.logsumexp(log_w, 0) - math.log(num)
    ess = torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))
    return float(estimate), float(ess)


HAND_MADE = [
    GaussianMixtureTarget(
        [[-2.0, 0.0], [2.5, 1.0], [0.0, 3.0]],
        [[0.5, 0.7], [0.4, 0.4], [1.0, 0.3]],
        [0.2, 0.5, 0.3],
        1.3,
    ),
    BananaTarget([1.2], [1.0], [0.4], rotation=[[0.6, -0.8], [0.8, 0.6]], shift=[0.5, -1.0]),
    BananaTarget([0.7], [1.3], [0.3], dim=3),
    FunnelTarget(3, 1.0),
    CorrelatedGaussianTarget([1.0, -1.0, 0.5], [[2.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 0.5]]),
    StudentTTarget([0.0, 1.0], [[1.0, 0.5], [0.5, 2.0]], df=3.0),
    SquaredObservationTarget([2.0, 3.0], [0.5, 0.4]),
]


@pytest.mark.parametrize("target", HAND_MADE, ids=lambda t: t.name)
def test_log_Z_agrees_with_importance_sampling(target):
    estimate, ess = _importance_log_Z(target)
    assert ess > 2000  # the check itself is informative
    # relative standard error of the IS mean is about 1 / sqrt(ESS)
    assert estimate == pytest.approx(target.log_Z, abs=4 / math.sqrt(ess) + 1e-3)


def test_square_target_quadrature_matches_scipy_per_coordinate():
    from scipy import integrate

    target = SquaredObservationTarget([1.7, 3.6], [0.35, 0.7])
    expected = 0.0
    for y, s in zip([1.7, 3.6], [0.35, 0.7], strict=True):
        value, _ = integrate.quad(
            lambda z, y=y, s=s: (
                math.exp(-z * z / 2 - (y - z * z) ** 2 / (2 * s * s)) / (2 * math.pi * s)
            ),
            -12,
            12,
            points=[-math.sqrt(y), math.sqrt(y)],
            epsabs=0,
            epsrel=1e-11,
            limit=200,
        )
        expected += math.log(value)
    assert target.log_Z == pytest.approx(expected, abs=1e-8)
    assert target.num_modes == 4


def test_funnel_closed_form_matches_nested_quadrature():
    from scipy import integrate

    target = FunnelTarget(4, 0.8)
    # integrating the three x's analytically leaves a 1-D integral over v
    value, _ = integrate.quad(
        lambda v: math.exp(-v * v / (2 * 0.64) + 1.5 * (math.log(2 * math.pi) + v)),
        -15,
        15,
        epsabs=0,
        epsrel=1e-11,
    )
    assert target.log_Z == pytest.approx(math.log(value), abs=1e-8)


def test_draw_targets_covers_every_family_and_is_seeded():
    first = draw_targets(3, n=20)
    again = draw_targets(3, n=20)
    other = draw_targets(4, n=20)
    assert len(first) == 20
    assert {t.family for t in first} == set(FAMILIES)
    assert all(2 <= t.dim <= 10 for t in first)
    assert max(t.dim for t in first) >= 6
    assert [t.name for t in first] == [t.name for t in again]
    assert [t.log_Z for t in first] == [t.log_Z for t in again]
    assert [t.log_Z for t in first] != [t.log_Z for t in other]
    assert all(math.isfinite(t.log_Z) for t in first)
    assert {t.family for t in first if t.multimodal} == {"mixture", "square"}
    with pytest.raises(ValueError, match="n must be"):
        draw_targets(0, n=3)


@pytest.mark.parametrize("target", draw_targets(11, n=6), ids=lambda t: t.name)
def test_drawn_target_model_density_and_particles(target):
    trace = poutine.trace(target.model).get_trace()
    z = trace.nodes["z"]["value"]
    assert z.shape == (target.dim,)
    assert float(trace.log_prob_sum()) == pytest.approx(float(target.log_density(z)), abs=1e-3)
    with pyro.plate("particles", 5, dim=-1):
        trace = poutine.trace(target.model).get_trace()
    trace.compute_log_prob()
    assert trace.nodes["log_density"]["log_prob"].shape == (5,)


def test_drawn_targets_log_Z_agrees_with_importance_sampling():
    # targets the suite draws, not only hand-made ones: the low-dimensional ones of a seed
    checked = 0
    for target in draw_targets(5, n=12):
        if target.dim > 3:
            continue
        estimate, ess = _importance_log_Z(target, num=100_000, seed=checked)
        if ess < 500:
            continue
        assert estimate == pytest.approx(target.log_Z, abs=4 / math.sqrt(ess) + 1e-3), target.name
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: GaussianMixtureTarget([[0.0, 0.0]], [[1.0, 0.0]], [1.0]), "positive"),
        (lambda: GaussianMixtureTarget([[0.0, 0.0]], [[1.0, 1.0]], [0.5]), "sum to 1"),
        (lambda: BananaTarget([1.0], [1.0], [0.5], rotation=np.ones((2, 2))), "orthogonal"),
        (lambda: BananaTarget([1.0], [1.0], [0.5], dim=4), "dim must be"),
        (lambda: FunnelTarget(1, 1.0), "dim must be"),
        (lambda: StudentTTarget([0.0, 0.0], np.eye(2), df=0.0), "df"),
        (lambda: CorrelatedGaussianTarget([0.0, 0.0], np.eye(3)), r"shape \(2, 2\)"),
        (lambda: SquaredObservationTarget([1.0, 2.0], [0.5]), "noise"),
    ],
)
def test_bad_parameters_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()
