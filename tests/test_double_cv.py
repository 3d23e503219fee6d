"""DoubleCVELBO and RodeoELBO: unbiasedness with non-trivial controls, negative controls,
SVI/module agreement, controls trained by the caller's optimizer, variance reduction."""

import copy

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI
from pyro.optim import Adam
from small_models import X2, X4, D, H, grads_of, make_pair

from lvmkit.inference.check import check_unbiased
from lvmkit.inference.estimators._score import loo_mean, reduce_like
from lvmkit.inference.estimators.double_cv import DoubleCVELBO
from lvmkit.inference.estimators.rodeo import RodeoELBO

ESTIMATORS = [DoubleCVELBO, RodeoELBO]


def with_random_controls(elbo, model, guide, x, scale: float = 1.0, seed: int = 0):
    """Create the estimator's controls with one call, then set them to random values (the
    controls start at alpha = beta = 0, i.e. plain RLOO, which would test nothing new)."""
    elbo.differentiable_loss(model, guide, x)
    gen = torch.Generator().manual_seed(seed)
    assert len(elbo.controls) > 0
    with torch.no_grad():
        for p in elbo.controls.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen))
    return elbo


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_unbiased_fast(estimator):
    for options in ({}, {"categorical": True, "bernoulli": False}):
        pyro.clear_param_store()
        model, guide = make_pair(**options)
        elbo = with_random_controls(estimator(num_particles=3), model, guide, X2)
        result = check_unbiased(model, guide, elbo, X2, num_draws=120)
        assert result.passed, result.summary()


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize(
    "options,x",
    [
        ({}, X2),
        ({"layers": 2}, X2),
        ({"categorical": True}, X2),
        ({"continuous": True}, X2),
        ({"layers": 2, "subsample": True}, X4),
        ({"layers": 2, "continuous": True, "categorical": True}, X2),
    ],
)
@pytest.mark.parametrize("k", [2, 3])
def test_unbiased_slow(estimator, options, x, k):
    model, guide = make_pair(**options)
    elbo = with_random_controls(estimator(num_particles=k), model, guide, x, seed=k)
    result = check_unbiased(model, guide, elbo, x, num_draws=1500, num_continuous_draws=64)
    assert result.passed, result.summary()


class _DoubleCVWithoutCorrection(DoubleCVELBO):
    """Drops the closed-form E[c_k (b_k - pi)] term: biased whenever alpha != 0."""

    def _discrete_coefficient(self, name, kind, f, value, probs, grad_b, pdim, mask=None):
        alpha = self._control(name, value).alpha
        s = value - probs
        shifted = f + alpha * reduce_like(loo_mean(grad_b, pdim) * s, f.shape)
        return (shifted - loo_mean(shifted, pdim)) * s


class _RodeoOwnStein(RodeoELBO):
    """Puts draw k's own Stein term into its baseline: biased whenever alpha != 0."""

    def _discrete_coefficient(self, name, kind, f, value, probs, grad_b, pdim, mask=None):
        coef = super()._discrete_coefficient(name, kind, f, value, probs, grad_b, pdim, mask)
        alpha = self._control(name, value).alpha
        return coef - alpha * (value - probs) * reduce_like(grad_b * (value - probs), f.shape)


@pytest.mark.parametrize("estimator", [_DoubleCVWithoutCorrection, _RodeoOwnStein])
def test_check_detects_a_biased_variant(estimator):
    model, guide = make_pair()
    elbo = with_random_controls(estimator(num_particles=3), model, guide, X2)
    with torch.no_grad():
        for control in elbo.controls.values():
            control.alpha.fill_(2.0)
    assert not check_unbiased(model, guide, elbo, X2, num_draws=200).passed


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_svi_and_module_gradients_agree(estimator):
    model, guide = make_pair(layers=2, continuous=True, categorical=True)
    elbo = with_random_controls(estimator(num_particles=3), model, guide, X2)
    svi = grads_of(elbo, model, guide, X2, 3, "svi")
    twin = copy.deepcopy(elbo)
    module = grads_of(twin, model, guide, X2, 3, "module")
    svi = {n: g for n, g in svi.items() if not n.startswith(elbo.module_name)}
    module = {n: g for n, g in module.items() if not n.startswith(elbo.module_name)}
    assert svi.keys() == module.keys() and {"v", "v2", "m", "vc", "w"} <= svi.keys()
    for name in svi:
        torch.testing.assert_close(svi[name], module[name])
    # the copy's own controls (not the original's) are in the store and get gradients
    store = dict(pyro.get_param_store().named_parameters())
    for name, param in twin.controls.named_parameters():
        assert store[f"{elbo.module_name}$$${name}"] is param and param.grad is not None


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_refuses_one_particle(estimator):
    with pytest.raises(ValueError, match="num_particles >= 2"):
        estimator(num_particles=1)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_svi_trains_the_controls(estimator):
    model, guide = make_pair()
    elbo = estimator(num_particles=2)
    svi = SVI(model, guide, Adam({"lr": 0.05}), elbo)
    svi.step(X2)
    before = {n: p.detach().clone() for n, p in elbo.controls.named_parameters()}
    store = dict(pyro.get_param_store().named_parameters())
    assert any(n.startswith(elbo.module_name) for n in store)
    for _ in range(5):
        svi.step(X2)
    moved = [n for n, p in elbo.controls.named_parameters() if not torch.equal(p, before[n])]
    assert any("alpha" in n for n in moved)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_masked_elements_get_no_gradient(estimator):
    def model(x):
        with pyro.plate("data", 2), poutine.mask(mask=torch.tensor([False, True])):
            z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(2, H)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=z @ torch.ones(H, D)).to_event(1), obs=x)

    def guide(x):
        logits = pyro.param("logits", torch.zeros(2, H))
        with pyro.plate("data", 2), poutine.mask(mask=torch.tensor([False, True])):
            pyro.sample("z", dist.Bernoulli(logits=logits).to_event(1))

    elbo = with_random_controls(estimator(num_particles=2), model, guide, X2)
    grads = torch.stack(
        [grads_of(elbo, model, guide, X2, seed, "svi")["logits"] for seed in range(10)]
    )
    assert torch.all(grads[:, 0] == 0)
    assert grads[:, 1].abs().sum() > 0


def test_value_gradient_of_one_hot_sites_includes_their_log_densities():
    # f(c) = log p(c) + c.w - log q(c); OneHotCategorical.log_prob takes an argmax, so its
    # value gradient (log pi) must be restored: df/dc = log_softmax(m) + w - log_softmax(l)
    m, w, lq = torch.tensor([0.5, -1.0, 0.2]), torch.tensor([1.0, 2.0, -3.0]), torch.randn(3)

    def model():
        with pyro.plate("data", 4, subsample_size=2):
            c = pyro.sample("c", dist.OneHotCategorical(logits=m).expand([2, 2]).to_event(1))
            pyro.factor("f", (c * w).sum((-1, -2)))

    def guide():
        with pyro.plate("data", 4, subsample_size=2):
            pyro.sample("c", dist.OneHotCategorical(logits=lq).expand([2, 2]).to_event(1))

    elbo = DoubleCVELBO(num_particles=2, max_plate_nesting=1)
    model_trace, guide_trace = elbo._get_trace(
        elbo._vectorized_num_particles(model), elbo._vectorized_num_particles(guide), (), {}
    )
    for trace in (model_trace, guide_trace):
        trace.compute_log_prob()
    grads = elbo._value_grads(model_trace, guide_trace, [("c", guide_trace.nodes["c"])])
    expected = 2.0 * (torch.log_softmax(m, -1) + w - torch.log_softmax(lq, -1))  # scale 4/2
    torch.testing.assert_close(grads["c"], expected.expand(2, 2, 2, 3))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_fit_resumes_with_the_learned_controls(tmp_path, estimator):
    from lvmkit.inference import fit

    x = torch.bernoulli(torch.full((20, D), 0.4), generator=torch.Generator().manual_seed(0))

    def run(steps, **kwargs):
        model, guide = make_pair()
        elbo = estimator(num_particles=2, max_plate_nesting=1)
        return fit(model, guide, x, elbo=elbo, steps=steps, batch_size=10,
                   optim=Adam({"lr": 0.05}), progress=False, **kwargs)

    full = run(8)
    pyro.clear_param_store()
    run(4, checkpoint_dir=tmp_path, checkpoint_every=4)
    pyro.clear_param_store()  # as in a new process, with a new estimator instance
    resumed = run(8, checkpoint_dir=tmp_path, checkpoint_every=4)
    assert resumed.loss == pytest.approx(full.loss, abs=1e-5)
