"""check_unbiased / exact_elbo_gradient / gradient_variance."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from small_models import toy_guide, toy_model

from lvmkit.inference.check import (
    UnbiasedCheck,
    check_unbiased,
    exact_elbo_gradient,
    gradient_variance,
)

X = torch.tensor([0.7, -0.2])
PRIOR = 0.3


def one_site_model(x):
    with pyro.plate("data", x.shape[0]):
        b = pyro.sample("b", dist.Bernoulli(torch.full_like(x, PRIOR)))
        pyro.sample("x", dist.Normal(b, 1.0), obs=x)


def one_site_guide(x):
    theta = pyro.param("theta", torch.tensor([0.4, -1.1]))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("b", dist.Bernoulli(logits=theta))


def analytic_loss_gradient(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d/dtheta of -ELBO: ELBO_i = p A1 + (1-p) A0 + H(p), dH/dp = -logit(p)."""
    p = torch.sigmoid(theta)
    normal = torch.distributions.Normal(torch.zeros(()), 1.0)
    a1 = math.log(PRIOR) + normal.log_prob(x - 1)
    a0 = math.log(1 - PRIOR) + normal.log_prob(x)
    return -(p * (1 - p) * (a1 - a0 - theta))


def test_exact_gradient_matches_analytic_one_site():
    exact = exact_elbo_gradient(one_site_model, one_site_guide, X)
    assert set(exact) == {"theta"}
    expected = analytic_loss_gradient(torch.tensor([0.4, -1.1]), X)
    assert torch.allclose(exact["theta"], expected, atol=1e-6)


def test_exact_gradient_includes_subsample_scale():
    data = torch.tensor([0.7, -0.2, 1.5, 0.1])

    def model(x):
        with pyro.plate("data", 4, subsample=torch.tensor([0, 2])) as idx:
            b = pyro.sample("b", dist.Bernoulli(torch.full((2,), PRIOR)))
            pyro.sample("x", dist.Normal(b, 1.0), obs=x[idx])

    def guide(x):
        theta = pyro.param("theta", torch.tensor([0.4, -1.1]))
        with pyro.plate("data", 4, subsample=torch.tensor([0, 2])):
            pyro.sample("b", dist.Bernoulli(logits=theta))

    exact = exact_elbo_gradient(model, guide, data)
    expected = 2.0 * analytic_loss_gradient(torch.tensor([0.4, -1.1]), data[[0, 2]])
    assert torch.allclose(exact["theta"], expected, atol=1e-6)


def two_layer_model(x):
    with pyro.plate("data", x.shape[0]):
        top = pyro.sample("top", dist.Bernoulli(logits=torch.zeros(x.shape[0], 1)).to_event(1))
        low = pyro.sample("low", dist.Bernoulli(logits=top.expand(-1, 2) - 0.5).to_event(1))
        pyro.sample("x", dist.Normal(low.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)


def two_layer_guide(x):
    w = pyro.param("w", torch.tensor([[0.3, -0.8]]))
    c = pyro.param("c", torch.tensor([0.2]))
    with pyro.plate("data", x.shape[0]):
        top = pyro.sample("top", dist.Bernoulli(logits=(x + c)).to_event(1))
        pyro.sample("low", dist.Bernoulli(logits=top @ w + x).to_event(1))


def test_exact_gradient_two_layers_matches_brute_force():
    x = torch.tensor([[0.5], [-1.0]])
    exact = exact_elbo_gradient(two_layer_model, two_layer_guide, x)
    # Brute force for one datum at a time (the ELBO is a sum over data).
    w = pyro.param("w").detach().requires_grad_()
    c = pyro.param("c").detach().requires_grad_()
    elbo = 0.0
    for xi in x:
        for t in (0.0, 1.0):
            q_top = dist.Bernoulli(logits=xi + c).log_prob(torch.tensor([t])).sum()
            for l0 in (0.0, 1.0):
                for l1 in (0.0, 1.0):
                    low = torch.tensor([l0, l1])
                    q_low = dist.Bernoulli(logits=t * w[0] + xi).log_prob(low).sum()
                    p = (
                        dist.Bernoulli(logits=torch.zeros(1)).log_prob(torch.tensor([t])).sum()
                        + dist.Bernoulli(logits=torch.full((2,), t - 0.5)).log_prob(low).sum()
                        + dist.Normal(low.sum(), 1.0).log_prob(xi).sum()
                    )
                    logq = q_top + q_low
                    elbo = elbo + logq.exp() * (p - logq)
    gw, gc = torch.autograd.grad(-elbo, [w, c])
    assert torch.allclose(exact["w"], gw, atol=1e-5)
    assert torch.allclose(exact["c"], gc, atol=1e-5)


def test_check_passes_for_trace_elbo():
    elbo = Trace_ELBO(num_particles=20, vectorize_particles=True)
    result = check_unbiased(one_site_model, one_site_guide, elbo, X, num_draws=100)
    assert isinstance(result, UnbiasedCheck)
    assert result.passed, result.summary()
    assert result.max_abs_z < result.threshold
    assert "PASSED" in result.summary()


def test_check_passes_for_trace_elbo_with_continuous_site():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            b = pyro.sample("b", dist.Bernoulli(torch.full_like(x, PRIOR)))
            e = pyro.sample("e", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("x", dist.Normal(b + e, 0.5), obs=x)

    def guide(x):
        theta = pyro.param("theta", torch.tensor([0.4, -1.1]))
        loc = pyro.param("loc", torch.tensor([0.1, 0.2]))
        with pyro.plate("data", x.shape[0]):
            b = pyro.sample("b", dist.Bernoulli(logits=theta))
            pyro.sample("e", dist.Normal(loc + 0.3 * b, 0.8))

    result = check_unbiased(
        model, guide, Trace_ELBO(num_particles=10, vectorize_particles=True), X,
        num_draws=100, num_continuous_draws=32,
    )
    assert result.passed, result.summary()
    # The exact gradient's Monte-Carlo error is part of the standard error.
    assert all(float(v.min()) > 0 for v in result.stderr.values())


class _NoScoreELBO(Trace_ELBO):
    """Deliberately biased: drops the score-function term of discrete sites."""

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        surrogate = model_trace.log_prob_sum() - guide_trace.log_prob_sum()
        return -surrogate.detach(), -surrogate


def test_check_fails_for_biased_estimator():
    result = check_unbiased(one_site_model, one_site_guide, _NoScoreELBO(), X, num_draws=300)
    assert not result.passed
    assert result.max_abs_z > 1.5 * result.threshold
    assert "FAILED" in result.summary()


def test_exact_refuses_too_many_configurations():
    x = torch.zeros(2, 20)

    def guide(x):
        theta = pyro.param("theta", torch.zeros(20))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("b", dist.Bernoulli(logits=theta.expand(x.shape[0], 20)).to_event(1))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("b", dist.Bernoulli(0.5 * torch.ones(x.shape[0], 20)).to_event(1))

    with pytest.raises(ValueError, match="1048576 configurations.*'data'.*'b': 2\\^20"):
        exact_elbo_gradient(model, guide, x, max_configurations=2**16)


def test_independent_data_are_enumerated_one_unit_at_a_time():
    """Twenty data in a plate: 2 configurations per datum, not 2^20 jointly; the same
    gradient as the analytic one. A global observed site outside the plate couples the
    data: they are then enumerated jointly (and the gradient is unchanged)."""
    x = torch.linspace(-1.0, 1.0, 20)

    def guide(x):
        theta = pyro.param("theta", torch.linspace(-0.5, 0.5, x.shape[0]))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("b", dist.Bernoulli(logits=theta))

    exact = exact_elbo_gradient(one_site_model, guide, x, max_configurations=4)
    expected = analytic_loss_gradient(pyro.param("theta").detach(), x)
    torch.testing.assert_close(exact["theta"], expected, rtol=1e-5, atol=1e-6)

    def coupled_model(x):
        one_site_model(x)
        pyro.factor("global", torch.tensor(0.3))

    small = x[:6]
    pyro.clear_param_store()
    joint = exact_elbo_gradient(coupled_model, guide, small, max_configurations=2**6)
    with pytest.raises(ValueError, match="64 configurations"):
        exact_elbo_gradient(coupled_model, guide, small, max_configurations=2**5)
    theta = pyro.param("theta").detach()
    torch.testing.assert_close(joint["theta"], analytic_loss_gradient(theta, small),
                               rtol=1e-5, atol=1e-6)


def test_exact_refuses_non_reparameterizable_continuous_site():
    def model(x):
        pyro.sample("g", dist.Gamma(2.0, 1.0))

    def guide(x):
        rate = pyro.param("rate", torch.tensor(1.0), constraint=dist.constraints.positive)
        pyro.sample("g", dist.Poisson(rate))

    with pytest.raises(ValueError, match="site 'g'.*not reparameterizable"):
        exact_elbo_gradient(model, guide, X)


def test_gradient_variance_matches_analytic_score_function_variance():
    # The toy problem: the score-function gradient f(b) (b - p) has variance 0.01594.
    # A vectorized draw averages 100 particles: its variance is the single-sample one / 100.
    sf = Trace_ELBO(num_particles=100, vectorize_particles=True)
    logs = gradient_variance(toy_model, toy_guide, {"sf": sf}, num_draws=400)
    # The sample variance of 400 draws has relative sd sqrt(2/399) ~ 7%; allow 3.5 sd.
    assert abs(100 * math.exp(logs["sf"]) - 0.01594) < 0.25 * 0.01594


def test_check_enumerates_categorical_and_onehot_sites():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            k = pyro.sample("k", dist.Categorical(logits=torch.zeros(x.shape[0], 3)))
            h = pyro.sample("h", dist.OneHotCategorical(logits=torch.zeros(x.shape[0], 3)))
            loc = k.to(x.dtype) - (h * torch.tensor([0.0, 1.0, 2.0])).sum(-1)
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    def guide(x):
        a = pyro.param("a", torch.tensor([0.3, -0.2, 0.5]))
        c = pyro.param("c", torch.tensor([[0.1, 0.4, -0.3], [0.2, -0.5, 0.0], [0.0, 0.3, 0.6]]))
        with pyro.plate("data", x.shape[0]):
            k = pyro.sample("k", dist.Categorical(logits=a.expand(x.shape[0], 3)))
            pyro.sample("h", dist.OneHotCategorical(logits=c[k]))

    exact = exact_elbo_gradient(model, guide, X)
    assert set(exact) == {"a", "c"}
    assert exact["a"].abs().sum() > 0 and exact["c"].abs().sum() > 0
    elbo = Trace_ELBO(num_particles=20, vectorize_particles=True)
    result = check_unbiased(model, guide, elbo, X, num_draws=60)
    assert result.passed, result.summary()
