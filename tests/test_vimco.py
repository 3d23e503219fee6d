"""VIMCOELBO: unbiased for the K-sample bound's gradient (exact by enumeration), errors."""

import copy
import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer.util import torch_item
from small_models import X2, X4, create_params, make_pair

from lvmkit.inference.check import (
    _exact_gradient_draws,
    check_unbiased,
    exact_elbo_gradient,
    exact_iwae_gradient,
)
from lvmkit.inference.estimators.vimco import VIMCOELBO


def _z_scores(elbo, model, guide, x, exact, exact_se, num_draws, seed=1):
    """Coordinate-wise z of the mean of ``num_draws`` estimates against ``exact``."""
    params = dict(pyro.get_param_store().named_parameters())
    pyro.set_rng_seed(seed)
    draws = {name: [] for name in exact}
    for _ in range(num_draws):
        for p in params.values():
            p.grad = None
        elbo.loss_and_grads(model, guide, x)
        for name in exact:
            grad = params[name].grad
            draws[name].append(torch.zeros_like(params[name]) if grad is None else grad.clone())
    z = {}
    for name, values in draws.items():
        stacked = torch.stack(values).double()
        se = (stacked.var(0) / num_draws + exact_se[name].double() ** 2).sqrt()
        diff = stacked.mean(0) - exact[name].double()
        # a coordinate with no spread must be exact (e.g. weights of a pixel that is 0)
        z[name] = torch.where(se > 0, diff / se.clamp_min(1e-300), diff.abs() * 1e6)
    return z


def _bonferroni(z, alpha=1e-3):
    count = sum(v.numel() for v in z.values())
    return torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - alpha / (2 * count))).item()


def _assert_unbiased(elbo, model, guide, x, k, num_draws, **exact_kwargs):
    create_params(model, guide, x)
    exact, exact_se, _ = _exact_gradient_draws(
        model, guide, (x,), {}, None, exact_kwargs.get("num_continuous_draws", 64), 2**16, 0,
        num_particles=k,
    )
    z = _z_scores(elbo, model, guide, x, exact, exact_se, num_draws)
    worst = max(v.abs().max().item() for v in z.values())
    assert worst < _bonferroni(z), {n: v.abs().max().item() for n, v in z.items()}
    return exact


def test_exact_bound_gradient_with_one_particle_is_the_elbo_gradient():
    model, guide = make_pair(layers=2)
    create_params(model, guide, X2)
    iwae = exact_iwae_gradient(model, guide, X2, num_particles=1)
    elbo = exact_elbo_gradient(model, guide, X2, params=list(iwae))
    for name in elbo:
        torch.testing.assert_close(iwae[name], elbo[name], rtol=1e-4, atol=1e-5)


def test_unbiased_one_layer_and_differs_from_elbo_gradient():
    model, guide = make_pair()
    exact = _assert_unbiased(VIMCOELBO(num_particles=3), model, guide, X2, 3, num_draws=300)
    # the test has power: the K = 3 bound's gradient is not the ELBO's
    elbo = exact_elbo_gradient(model, guide, X2, params=list(exact))
    assert (exact["v"] - elbo["v"]).abs().max() > 0.02


def test_unbiased_two_layers():
    model, guide = make_pair(layers=2)
    _assert_unbiased(VIMCOELBO(num_particles=2), model, guide, X2, 2, num_draws=300)


def test_unbiased_with_continuous_site():
    model, guide = make_pair(continuous=True)
    _assert_unbiased(
        VIMCOELBO(num_particles=2), model, guide, X2, 2, num_draws=200, num_continuous_draws=24
    )


@pytest.mark.filterwarnings("ignore:Found plate statements in guide but not model")
def test_unbiased_with_subsampled_plate():
    # Fix the subsample to rows (1, 3): the estimate is scale * the bound's gradient on them.
    sub_model, sub_guide = make_pair(subsample=True)
    rows = torch.tensor([1, 3])
    fixed_model = poutine.condition(sub_model, data={"data": rows})
    fixed_guide = poutine.condition(sub_guide, data={"data": rows})
    model, guide = make_pair()
    create_params(model, guide, X4[rows])
    exact = exact_iwae_gradient(model, guide, X4[rows], num_particles=2)
    scaled = {n: 2.0 * g for n, g in exact.items()}  # N / subsample size = 4 / 2
    zeros = {n: torch.zeros_like(g) for n, g in exact.items()}
    z = _z_scores(VIMCOELBO(num_particles=2), fixed_model, fixed_guide, X4, scaled, zeros, 300)
    assert max(v.abs().max().item() for v in z.values()) < _bonferroni(z)


@pytest.mark.slow
@pytest.mark.parametrize("options", [{"layers": 2, "continuous": True}, {"categorical": True}])
@pytest.mark.parametrize("k", [2, 4])
def test_unbiased_slow(options, k):
    model, guide = make_pair(**options)
    _assert_unbiased(VIMCOELBO(num_particles=k), model, guide, X2, k, num_draws=2000)


def test_svi_and_module_gradients_agree():
    model, guide = make_pair(layers=2, continuous=True)
    create_params(model, guide, X2)
    elbo = VIMCOELBO(num_particles=3)
    elbo.loss(model, guide, X2)  # guesses max_plate_nesting, which draws random numbers
    params = dict(pyro.get_param_store().named_parameters())
    grads = []
    for via in ("svi", "module"):
        pyro.set_rng_seed(4)
        for p in params.values():
            p.grad = None
        if via == "svi":
            copy.deepcopy(elbo).loss_and_grads(model, guide, X2)
        else:
            copy.deepcopy(elbo)(model, guide)(X2).backward()
        grads.append({n: p.grad.clone() for n, p in params.items()})
    for name in params:
        torch.testing.assert_close(grads[0][name], grads[1][name])


def test_loss_is_the_negative_bound_estimate():
    model, guide = make_pair()
    create_params(model, guide, X2)
    k = 5
    elbo = VIMCOELBO(num_particles=k)
    elbo.loss(model, guide, X2)  # guesses max_plate_nesting, which draws random numbers
    pyro.set_rng_seed(2)
    loss = elbo.loss(model, guide, X2)
    # the same draws by hand
    pyro.set_rng_seed(2)
    particles = pyro.plate("num_particles_vectorized", k, dim=-2)
    guide_trace = poutine.trace(particles(guide)).get_trace(X2)
    model_trace = poutine.trace(poutine.replay(particles(model), guide_trace)).get_trace(X2)
    log_w = model_trace.nodes["z"]["fn"].log_prob(model_trace.nodes["z"]["value"])
    log_w = log_w + model_trace.nodes["x"]["fn"].log_prob(X2)
    log_w = log_w - guide_trace.nodes["z"]["fn"].log_prob(guide_trace.nodes["z"]["value"])
    bound = (torch.logsumexp(log_w, 0) - math.log(k)).sum()
    assert loss == pytest.approx(-bound.item(), rel=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="num_particles >= 2"):
        VIMCOELBO(num_particles=1)

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 4, subsample_size=2) as idx:
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])

    def guide(x):
        pyro.sample("z", dist.Normal(0.0, 1.0))  # global, unscaled: mixes scales

    with pytest.raises(ValueError, match="same scale.*'z'"):
        VIMCOELBO(num_particles=2).loss_and_grads(model, guide, torch.zeros(4))
    big_model, big_guide = make_pair(layers=2, categorical=True)
    create_params(big_model, big_guide, X2)
    with pytest.raises(ValueError, match="particle tuples.*max_configurations"):
        exact_iwae_gradient(big_model, big_guide, X2, num_particles=4)


def _grid_leave_one_out(log_w: torch.Tensor, dim: int) -> torch.Tensor:
    """The leave-one-out bound written out as a K x K grid (reference for small K)."""
    k = log_w.shape[dim]
    moved = log_w.movedim(dim, 0)
    grid = moved.unsqueeze(0).repeat((k,) + (1,) * moved.dim())
    for i in range(k):
        grid[i, i] = (moved.sum(0) - moved[i]) / (k - 1)
    return (torch.logsumexp(grid, 1) - math.log(k)).movedim(0, dim)


@pytest.mark.parametrize("spread", [1.0, 30.0, 300.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_leave_one_out_bound_matches_the_grid(spread, dtype):
    from lvmkit.inference.estimators.vimco import _leave_one_out_bound

    generator = torch.Generator().manual_seed(3)
    log_w = torch.randn(6, 4, 3, dtype=torch.float64, generator=generator) * spread
    log_w[2, 1, 0] = log_w[4, 1, 0]  # a tie
    log_w[:, 2, 1] = 5.0  # all equal
    expected = _grid_leave_one_out(log_w, -3)
    actual = _leave_one_out_bound(log_w.to(dtype), -3).double()
    # float32 carries the rounding of its inputs (relative 6e-8 of up to 3 * spread)
    tol = 1e-12 if dtype == torch.float64 else 1e-6 * spread
    torch.testing.assert_close(actual, expected, atol=tol, rtol=0)


def test_leave_one_out_bound_memory_is_linear_in_particles():
    """The K x K grid of the first version asked for 40 GB at K = 50,000."""
    from torch.profiler import ProfilerActivity, profile

    from lvmkit.inference.estimators.vimco import _leave_one_out_bound

    k = 4000
    log_w = torch.randn(k, 1)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _leave_one_out_bound(log_w, -2)
    allocated = sum(max(event.cpu_memory_usage, 0) for event in prof.events())
    assert allocated < 100 * k * log_w.element_size(), allocated  # the grid: 4 * k^2 bytes


def test_fifty_thousand_particles_on_a_tiny_model():
    def model():
        z = pyro.sample("z", dist.Bernoulli(0.4))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.5))

    def guide():
        pyro.sample("z", dist.Bernoulli(logits=pyro.param("phi", torch.tensor(0.2))))

    loss = VIMCOELBO(num_particles=50_000, max_plate_nesting=0).loss_and_grads(model, guide)
    # With 50,000 particles the bound is log p(x) to within its Monte-Carlo error.
    log_px = torch.logsumexp(torch.stack([
        math.log(0.6) + dist.Normal(0.0, 1.0).log_prob(torch.tensor(0.5)),
        math.log(0.4) + dist.Normal(1.0, 1.0).log_prob(torch.tensor(0.5)),
    ]), 0)
    assert loss == pytest.approx(-float(log_px), abs=0.01)
    grad = pyro.param("phi").unconstrained().grad
    assert grad is not None and torch.isfinite(grad)


def test_empty_model_and_guide_score_zero():
    def empty():
        pass

    elbo = VIMCOELBO(num_particles=3)
    assert elbo.loss_and_grads(empty, empty) == 0.0
    assert float(elbo.differentiable_loss(empty, empty)) == 0.0
    assert elbo.loss(empty, empty) == 0.0


def test_check_unbiased_judges_vimco_against_the_bound_it_estimates():
    """VIMCO declares ``objective = "iwae"``: check_unbiased compares it with the exact
    K-sample bound's gradient (it used the ELBO's, and failed an unbiased estimator)."""
    model, guide = make_pair()
    create_params(model, guide, X2)
    elbo = VIMCOELBO(num_particles=3)
    assert elbo.objective == "iwae"
    result = check_unbiased(model, guide, elbo, X2, num_draws=300)
    assert result.passed, result.summary()
    exact = exact_iwae_gradient(model, guide, X2, num_particles=3, params=list(result.exact))
    for name in exact:
        torch.testing.assert_close(result.exact[name], exact[name])


def test_check_unbiased_refuses_an_unknown_objective():
    model, guide = make_pair()
    create_params(model, guide, X2)
    elbo = VIMCOELBO(num_particles=2)
    elbo.objective = "renyi"
    with pytest.raises(ValueError, match="objective is 'renyi'"):
        check_unbiased(model, guide, elbo, X2, num_draws=2)


def _shape_asserting_pair():
    """Pyro's test_plate_shape_broadcasting shapes: plates with dim= given, and shape
    assertions that a particle dimension would break."""

    def model():
        with pyro.plate("data", 2, dim=-2):
            with pyro.plate("components", 2, dim=-1):
                b = pyro.sample("b", dist.Bernoulli(0.4))
                assert b.shape == (2, 2)
                pyro.sample("y", dist.Normal(b, 1.0), obs=torch.tensor([[0.3, -1.0],
                                                                        [2.0, 0.5]]))

    def guide():
        a = pyro.param("a", torch.tensor([[0.2, -0.3], [0.5, 0.1]]))
        with pyro.plate("data", 2, dim=-2):
            with pyro.plate("components", 2, dim=-1):
                assert pyro.sample("b", dist.Bernoulli(logits=a)).shape == (2, 2)

    return model, guide


def test_particles_one_trace_each_for_models_that_assert_their_shapes():
    """Regression: VIMCO forced vectorized particles, which broke models that assume no
    particle dimension; with vectorize_particles=False it runs K traces, and is unbiased
    for the K-sample bound."""
    model, guide = _shape_asserting_pair()
    pyro.poutine.trace(guide).get_trace()
    elbo = VIMCOELBO(num_particles=3, vectorize_particles=False)
    result = check_unbiased(model, guide, elbo, num_draws=300)
    assert result.passed, result.summary()
    losses = []
    for entry in (elbo.loss, elbo.differentiable_loss, elbo.loss_and_grads):
        pyro.set_rng_seed(5)
        losses.append(torch_item(entry(model, guide)))
    assert losses == pytest.approx([losses[0]] * 3)


def test_sequential_particles_match_vectorized_ones():
    """Same estimator either way: unbiased for the exact K-sample bound's gradient."""
    model, guide = make_pair()
    create_params(model, guide, X2)
    for vectorize in (True, False):
        exact = _assert_unbiased(VIMCOELBO(num_particles=3, vectorize_particles=vectorize),
                                 model, guide, X2, 3, num_draws=200)
    assert exact
