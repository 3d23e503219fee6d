"""Synthetic targets: quadrature log Z against the closed forms, and the model's density."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine

from lvmkit.models.targets import Banana, Funnel, RingOfModes

TARGETS = [RingOfModes(), RingOfModes(num_modes=8, radius=4.0, scale=0.4), Banana(), Funnel()]


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_quadrature_log_Z_matches_closed_form(target):
    assert target.log_Z == pytest.approx(target.analytic_log_Z(), abs=1e-6)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_model_joint_density_is_the_target_density(target):
    trace = poutine.trace(target.model).get_trace()
    z = trace.nodes["z"]["value"]
    assert z.shape == (2,)
    assert float(trace.log_prob_sum()) == pytest.approx(float(target.log_density(z)), abs=1e-4)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_log_density_is_batched(target):
    z = torch.randn(5, 3, 2)
    values = target.log_density(z)
    assert values.shape == (5, 3)
    assert torch.allclose(values[2, 1], target.log_density(z[2, 1]))


def test_importance_sampling_agrees_with_log_Z():
    # an independent check of the normaliser: E_{N(0, 4^2)}[f / N] = Z
    target = Banana(curvature=0.5)
    proposal = torch.distributions.Normal(torch.zeros(2), 4.0)
    z = proposal.sample((200_000,))
    log_w = target.log_density(z) - proposal.log_prob(z).sum(-1)
    estimate = torch.logsumexp(log_w, 0) - math.log(z.shape[0])
    assert float(estimate) == pytest.approx(target.log_Z, abs=0.03)


def test_ring_modes_are_where_stated():
    target = RingOfModes(num_modes=4, radius=3.0, scale=0.5)
    at_mode = target.log_density(torch.tensor([3.0, 0.0]))
    between = target.log_density(torch.tensor([0.0, 0.0]))
    assert float(at_mode) == pytest.approx(0.0, abs=1e-3)
    assert float(between) < -15


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: RingOfModes(num_modes=0), "num_modes"),
        (lambda: RingOfModes(scale=0.0), "scale"),
        (lambda: Banana(scale2=-1.0), "scales"),
        (lambda: Funnel(scale_v=0.0), "scale_v"),
    ],
)
def test_bad_parameters_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_model_works_under_vectorized_particles():
    target = Funnel()
    with pyro.plate("particles", 7, dim=-1):
        trace = poutine.trace(target.model).get_trace()
    assert trace.nodes["z"]["value"].shape == (7, 2)
    trace.compute_log_prob()
    assert trace.nodes["log_density"]["log_prob"].shape == (7,)
