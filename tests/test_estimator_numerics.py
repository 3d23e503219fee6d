"""Numerics of the relaxation machinery: conditional noise, extreme logits, relaxed scores."""

import logging
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lvmkit.inference.estimators._relax import (
    conditional_gumbel_noise,
    conditional_logistic_noise,
    gumbel_noise,
    harden,
    logistic_noise,
    uniform_like,
    with_relaxed_scores,
)
from lvmkit.inference.estimators.concrete import ConcreteELBO
from lvmkit.inference.estimators.rebar import RebarELBO
from lvmkit.inference.estimators.relax import RelaxELBO

logging.getLogger("pyro").setLevel(logging.WARNING)

logit_lists = st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=6, max_size=6)


def _ks_uniform(samples: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance of samples in [0, 1] from U(0, 1)."""
    s, _ = samples.double().sort()
    n = s.numel()
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    return max((grid - s).abs().max().item(), (s - (grid - 1 / n)).abs().max().item())


# ---- conditional noise --------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(logit_lists, st.integers(0, 2**31 - 1))
def test_conditional_logistic_noise_reproduces_b(logits, seed):
    torch.manual_seed(seed)
    theta = torch.tensor(logits).requires_grad_()
    u = uniform_like(theta.shape, theta)
    b = harden("bernoulli", theta.detach(), logistic_noise(u))
    noise = conditional_logistic_noise(theta, b, uniform_like(theta.shape, theta))
    assert torch.isfinite(noise).all()
    # The conditional sample lands on the same side of zero as b (ties at exactly 0
    # have probability zero but can appear in float32 for |theta| = 50).
    z = theta.detach() + noise.detach()
    assert torch.all((z > 0) == (b > 0.5) | (z.abs() < 1e-3))
    (grad,) = torch.autograd.grad(noise.sum(), theta)
    assert torch.isfinite(grad).all()


def test_conditional_logistic_noise_is_tuckers_map_of_v():
    # the paper's u~ = v (1 - p) for b = 0 and 1 - p + v p for b = 1, computed directly in
    # float64 where that is accurate: the log-space form must be the same map of v (and
    # have the same gradient in the logits), not merely the same distribution
    torch.manual_seed(0)
    theta = (4 * torch.randn(2000, dtype=torch.float64)).requires_grad_()
    v = uniform_like(theta.shape, theta)
    b = (torch.rand(2000, dtype=torch.float64) < 0.5).double()
    p = torch.sigmoid(theta)
    direct = torch.logit(torch.where(b > 0.5, 1 - p + v * p, v * (1 - p)))
    noise = conditional_logistic_noise(theta, b, v)
    assert torch.allclose(noise, direct, rtol=1e-9, atol=1e-9)
    (g_noise,) = torch.autograd.grad(noise.sum(), theta)
    (g_direct,) = torch.autograd.grad(direct.sum(), theta)
    assert torch.allclose(g_noise, g_direct, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conditional_logistic_noise_equals_the_branchwise_log_space_form(dtype):
    # the arithmetic branch selection gives, bit for bit, the two branches written out
    # with torch.where, values and logit gradients, for logits up to |80| and uniforms
    # at the limits that uniform_like clamps to
    torch.manual_seed(3)
    theta = (30 * torch.randn(400, 25, dtype=dtype)).clamp(-80, 80).requires_grad_()
    v = uniform_like(theta.shape, theta)
    finfo = torch.finfo(dtype)
    v[0], v[1] = finfo.tiny, 1 - finfo.eps
    b = (torch.rand(theta.shape, dtype=dtype) < 0.5).to(dtype)
    one = b > 0.5
    log_v, log_1mv = torch.log(v), torch.log1p(-v)
    both = torch.logaddexp(torch.where(one, -theta, theta), torch.where(one, log_v, log_1mv))
    branchwise = torch.where(one, both - log_1mv, log_v - both)
    noise = conditional_logistic_noise(theta, b, v)
    assert torch.isfinite(noise).all()
    assert torch.equal(noise, branchwise)
    (g_noise,) = torch.autograd.grad(noise.sum(), theta)
    (g_branchwise,) = torch.autograd.grad(branchwise.sum(), theta)
    assert torch.equal(g_noise, g_branchwise)


def test_relaxed_bernoulli_score_on_broadcast_logits():
    # the relaxed score v l + logsigmoid(-l), evaluated on a prior's logits before their
    # broadcast, equals v log p + (1 - v) log(1 - p) on the broadcast logits, with the
    # same shape and gradients
    torch.manual_seed(1)
    prior = torch.randn(5, requires_grad=True)
    fn = dist.Bernoulli(logits=prior).expand([2, 3, 5]).to_event(1)
    value = torch.rand(2, 3, 5, requires_grad=True)
    score = with_relaxed_scores(fn).log_prob(value)
    logits = prior.expand(2, 3, 5)
    expected = (value * torch.nn.functional.logsigmoid(logits)
                + (1 - value) * torch.nn.functional.logsigmoid(-logits)).sum(-1)
    assert score.shape == expected.shape == (2, 3)
    assert torch.allclose(score, expected, atol=1e-6)
    grads = torch.autograd.grad(score.sum(), [prior, value])
    expected_grads = torch.autograd.grad(expected.sum(), [prior, value])
    for got, want in zip(grads, expected_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(logit_lists, st.integers(0, 2**31 - 1))
def test_conditional_gumbel_noise_reproduces_argmax(logits, seed):
    torch.manual_seed(seed)
    theta = torch.tensor(logits).reshape(2, 3).requires_grad_()
    log_p = torch.log_softmax(theta, -1)
    b = harden("onehot", log_p.detach(), gumbel_noise(uniform_like(log_p.shape, log_p)))
    noise = conditional_gumbel_noise(log_p, b, uniform_like(log_p.shape, log_p))
    assert torch.isfinite(noise).all()
    assert torch.equal((log_p.detach() + noise.detach()).argmax(-1), b.argmax(-1))
    (grad,) = torch.autograd.grad(noise.sum(), theta)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conditional_gumbel_noise_equals_the_branchwise_form(dtype):
    torch.manual_seed(4)
    theta = (10 * torch.randn(300, 6, dtype=dtype)).requires_grad_()
    log_p = torch.log_softmax(theta, -1)
    b = torch.nn.functional.one_hot(torch.randint(6, (300,)), 6).to(dtype)
    v = uniform_like(log_p.shape, log_p)
    log_neg_log_v = torch.log(-torch.log(v))
    top = (b * log_neg_log_v).sum(-1, keepdim=True)
    others = -torch.logaddexp(log_neg_log_v - log_p, top)
    branchwise = torch.where(b > 0.5, -top.expand_as(log_p), others) - log_p
    noise = conditional_gumbel_noise(log_p, b, v)
    assert torch.equal(noise, branchwise)
    (g_noise,) = torch.autograd.grad(noise.sum(), theta, retain_graph=True)
    (g_branchwise,) = torch.autograd.grad(branchwise.sum(), theta)
    assert torch.equal(g_noise, g_branchwise)


@pytest.mark.parametrize("theta", [-2.0, 0.3, 3.0])
def test_conditional_logistic_noise_has_the_logistic_marginal(theta):
    # b ~ q, then n~ ~ p(n | b): marginally n~ is Logistic(0, 1), i.e. sigmoid(n~) ~ U(0, 1).
    torch.manual_seed(0)
    n = 20_000
    logits = torch.full((n,), theta)
    b = harden("bernoulli", logits, logistic_noise(uniform_like(logits.shape, logits)))
    noise = conditional_logistic_noise(logits, b, uniform_like(logits.shape, logits))
    assert _ks_uniform(torch.sigmoid(noise)) < 1.63 / math.sqrt(n)  # KS test, alpha 0.01


def test_conditional_gumbel_noise_has_the_gumbel_marginal():
    torch.manual_seed(0)
    n = 20_000
    log_p = torch.log_softmax(torch.tensor([1.5, -0.5, 0.0]), -1).expand(n, 3)
    b = harden("onehot", log_p, gumbel_noise(uniform_like(log_p.shape, log_p)))
    noise = conditional_gumbel_noise(log_p, b, uniform_like(log_p.shape, log_p))
    for i in range(3):
        # Gumbel CDF exp(-exp(-g)) maps each coordinate to U(0, 1).
        assert _ks_uniform(torch.exp(-torch.exp(-noise[:, i]))) < 1.63 / math.sqrt(n)


# ---- relaxed scores ----------------------------------------------------------------------


def test_relaxed_scores_agree_with_discrete_log_prob_on_discrete_values():
    logits = torch.tensor([[0.3, -2.0, 40.0]])
    fn = dist.Bernoulli(logits=logits).to_event(1).mask(torch.tensor([True]))
    relaxed = with_relaxed_scores(fn)
    value = torch.tensor([[1.0, 0.0, 1.0]])
    assert torch.allclose(relaxed.log_prob(value), fn.log_prob(value))
    assert torch.isfinite(relaxed.log_prob(torch.tensor([[0.3, 0.999, 1e-6]]))).all()
    onehot = dist.OneHotCategorical(logits=torch.tensor([0.2, -1.0, 3.0])).expand([2])
    value = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert torch.allclose(with_relaxed_scores(onehot).log_prob(value), onehot.log_prob(value))


# ---- whole estimators at extreme logits ---------------------------------------------------


def _model(x):
    with pyro.plate("data", 2):
        b = pyro.sample("b", dist.Bernoulli(logits=torch.zeros(2, 3)).to_event(1))
        c = pyro.sample("c", dist.OneHotCategorical(logits=torch.zeros(2, 3)))
        pyro.sample("x", dist.Normal((b * c).sum(-1, keepdim=True), 1.0).to_event(1), obs=x)


def _guide_with(logits_b, logits_c):
    def guide(x):
        lb = pyro.param("lb", logits_b)
        lc = pyro.param("lc", logits_c)
        with pyro.plate("data", 2):
            b = pyro.sample("b", dist.Bernoulli(logits=lb).to_event(1))
            pyro.sample("c", dist.OneHotCategorical(logits=lc + b))

    return guide


ESTIMATORS = {
    "rebar": lambda: RebarELBO(num_particles=2, vectorize_particles=True),
    "relax": lambda: RelaxELBO(),
    "concrete": lambda: ConcreteELBO(),
    "straight_through": lambda: ConcreteELBO(straight_through=True),
}


@pytest.mark.parametrize("name", list(ESTIMATORS))
@settings(max_examples=8, deadline=None)
@given(st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=12, max_size=12),
       st.integers(0, 2**31 - 1))
def test_extreme_logits_give_finite_gradients(name, logits, seed):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    values = torch.tensor(logits)
    guide = _guide_with(values[:6].reshape(2, 3), values[6:].reshape(2, 3))
    elbo = ESTIMATORS[name]()
    x = torch.zeros(2, 1)
    for _ in range(2):  # the second step runs with learned (updated) controls
        loss = elbo.loss_and_grads(_model, guide, x)
        assert math.isfinite(loss)
        for param_name, p in pyro.get_param_store().named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), param_name
            p.grad = None
    if hasattr(elbo, "diagnostics"):
        assert all(math.isfinite(v) for v in elbo.diagnostics().values())
