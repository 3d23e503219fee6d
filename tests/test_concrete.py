"""ConcreteELBO: the relaxed objective's pathwise gradient, which is biased for the ELBO."""

import logging
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from test_rebar import X2, clear_grads, param_grads, run_check, sbn_guide, sbn_model

from lvmkit.inference.check import check_unbiased, exact_elbo_gradient
from lvmkit.inference.estimators.concrete import ConcreteELBO

logging.getLogger("pyro").setLevel(logging.WARNING)

PRIOR = 0.3
X_OBS = torch.tensor([0.7])


def one_site_model(x):
    with pyro.plate("data", 1):
        b = pyro.sample("b", dist.Bernoulli(torch.full((1,), PRIOR)))
        pyro.sample("x", dist.Normal(b, 1.0), obs=x)


def one_site_guide(x):
    theta = pyro.param("theta", torch.tensor([0.4]))
    with pyro.plate("data", 1):
        pyro.sample("b", dist.Bernoulli(logits=theta))


def relaxed_objective_gradient(theta: float, temperature: float, points: int = 200_000):
    """d/dtheta of E_u[log p(s) + log N(x | s, 1) - log q_theta(s)], s = sigma((theta +
    logit u) / lambda), by the midpoint rule over u (the oracle)."""
    t = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    u = (torch.arange(points, dtype=torch.float64) + 0.5) / points
    s = torch.sigmoid((t + torch.log(u) - torch.log1p(-u)) / temperature)
    log_p = s * math.log(PRIOR) + (1 - s) * math.log(1 - PRIOR)
    log_lik = torch.distributions.Normal(s, 1.0).log_prob(X_OBS.double())
    log_q = s * F.logsigmoid(t) + (1 - s) * F.logsigmoid(-t)
    (grad,) = torch.autograd.grad((log_p + log_lik - log_q).mean(), t)
    return grad.item()


def test_concrete_gradient_is_the_relaxed_objectives_and_not_the_elbos():
    temperature = 0.7
    elbo = ConcreteELBO(num_particles=2000, vectorize_particles=True, temperature=temperature)
    draws = []
    for _ in range(10):
        elbo.loss_and_grads(one_site_model, one_site_guide, X_OBS)
        draws.append(param_grads()["theta"].item())
        clear_grads()
    mean = sum(draws) / len(draws)
    sd = (sum((d - mean) ** 2 for d in draws) / (len(draws) - 1)) ** 0.5
    # Loss gradient = -(relaxed objective gradient).
    oracle = -relaxed_objective_gradient(0.4, temperature)
    assert abs(mean - oracle) < 5 * sd / len(draws) ** 0.5 + 1e-4
    exact = exact_elbo_gradient(one_site_model, one_site_guide, X_OBS)["theta"].item()
    assert abs(oracle - exact) > 0.05  # the bias is real, not a sampling artefact


@pytest.mark.parametrize("straight_through", [False, True])
def test_concrete_is_biased(straight_through):
    elbo = ConcreteELBO(num_particles=100, vectorize_particles=True, temperature=1.0,
                        straight_through=straight_through)
    result = run_check("sbn", elbo)
    assert result.passed is False
    assert result.max_abs_z > 10


def test_concrete_with_every_site_opted_out_is_the_unbiased_score_function():
    def guide(x):
        v = pyro.param("V", torch.tensor([[0.4, -0.2, 0.1], [0.3, 0.5, -0.6], [-0.2, 0.1, 0.3],
                                          [0.6, -0.4, 0.2]]))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=x @ v).to_event(1),
                        infer={"concrete": False})

    elbo = ConcreteELBO(num_particles=20, vectorize_particles=True)
    result = check_unbiased(sbn_model, guide, elbo, X2, num_draws=60)
    assert result.passed, result.summary()


def test_reported_loss_is_the_hard_negative_elbo():
    # Guide logits of +-15: b is determined, so the hard ELBO is known exactly.
    v = torch.tensor([[15.0, -15.0, 15.0]]).expand(4, 3).contiguous()

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=x @ pyro.param("V", v) - 15).to_event(1))

    x = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    b = torch.tensor([[1.0, 0.0, 1.0]])
    for straight_through in (False, True):
        elbo = ConcreteELBO(temperature=0.5, straight_through=straight_through)
        loss = elbo.loss_and_grads(sbn_model, guide, x)
        w = pyro.param("W")
        log_p = (dist.Bernoulli(logits=torch.full((3,), -0.2)).log_prob(b).sum()
                 + dist.Bernoulli(logits=b @ w - 0.3).log_prob(x).sum())
        log_q = dist.Bernoulli(logits=x @ v - 15).log_prob(b).sum()
        assert loss == pytest.approx(-(log_p - log_q).item(), abs=1e-4)
        clear_grads()


def test_straight_through_surrogate_is_evaluated_at_hard_values():
    # The surrogate's value is the objective at the values used forward: the hard ELBO
    # with straight-through, the relaxed one without.
    for straight_through, same in ((True, True), (False, False)):
        pyro.set_rng_seed(1)
        elbo = ConcreteELBO(straight_through=straight_through)
        traces = elbo._get_trace(sbn_model, sbn_guide, (X2,), {})
        loss, surrogate = elbo._differentiable_loss_particle(*traces)
        assert (abs(loss - surrogate.item()) < 1e-4) is same


@pytest.mark.parametrize("straight_through", [False, True])
def test_loss_and_grads_equals_differentiable_loss(straight_through):
    pyro.set_rng_seed(6)
    loss = ConcreteELBO(num_particles=3, straight_through=straight_through).loss_and_grads(
        sbn_model, sbn_guide, X2)
    expected = param_grads()
    clear_grads()
    pyro.set_rng_seed(6)
    surrogate = ConcreteELBO(num_particles=3, straight_through=straight_through)(
        sbn_model, sbn_guide)(X2)
    surrogate.backward()
    assert surrogate.item() == pytest.approx(loss)
    for n, g in param_grads().items():
        # Trace_ELBO's loss_and_grads backpropagates particle by particle: float rounding
        torch.testing.assert_close(expected[n], g, msg=n)


def test_invalid_temperature():
    with pytest.raises(ValueError, match="temperature must be positive"):
        ConcreteELBO(temperature=-1.0)


def test_empty_model_and_guide_score_zero():
    """Trace_ELBO gives 0.0 for empty programs; so does ConcreteELBO (it crashed)."""

    def empty():
        pass

    elbo = ConcreteELBO()
    assert elbo.loss_and_grads(empty, empty) == 0.0
    assert float(elbo.differentiable_loss(empty, empty)) == 0.0
    assert elbo.loss(empty, empty) == 0.0
