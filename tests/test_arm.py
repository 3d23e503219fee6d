"""ARMELBO and DisARMELBO: unbiasedness against exact gradients, layers, masks, errors."""

import copy

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI
from pyro.optim import Adam
from small_models import X2, X4, D, H, grads_of, make_pair

from lvmkit.inference.check import check_unbiased, gradient_variance
from lvmkit.inference.estimators.arm import ARMELBO, DisARMELBO


@pytest.mark.parametrize("estimator", [ARMELBO, DisARMELBO])
def test_unbiased_one_layer(estimator):
    model, guide = make_pair()
    elbo = estimator(num_particles=4, vectorize_particles=True)
    result = check_unbiased(model, guide, elbo, X2, num_draws=120)
    assert result.passed, result.summary()


def test_disarm_unbiased_two_layers_subsampled():
    model, guide = make_pair(layers=2, subsample=True)
    elbo = DisARMELBO(num_particles=4, vectorize_particles=True)
    result = check_unbiased(model, guide, elbo, X4, num_draws=150)
    assert result.passed, result.summary()
    # the top layer's guide parameters are estimated by the per-layer antithetic pass
    assert result.exact["v2"].abs().max() > 3 * result.stderr["v2"].max()


@pytest.mark.slow
@pytest.mark.parametrize("estimator", [ARMELBO, DisARMELBO])
@pytest.mark.parametrize(
    "options",
    [{"layers": 2}, {"subsample": True}, {"continuous": True}, {"layers": 2, "continuous": True}],
)
def test_unbiased_slow(estimator, options):
    model, guide = make_pair(**options)
    x = X4 if options.get("subsample") else X2
    elbo = estimator(num_particles=4, vectorize_particles=True)
    result = check_unbiased(model, guide, elbo, x, num_draws=1500, num_continuous_draws=64)
    assert result.passed, result.summary()


def test_disarm_unbiased_with_continuous_site():
    # y ~ q(y | x, z) lies downstream of z: the antithetic pass re-draws it given b~.
    model, guide = make_pair(continuous=True)
    elbo = DisARMELBO(num_particles=4, vectorize_particles=True)
    result = check_unbiased(model, guide, elbo, X2, num_draws=120, num_continuous_draws=16)
    assert result.passed, result.summary()


@pytest.mark.parametrize("estimator", [ARMELBO, DisARMELBO])
def test_svi_and_module_gradients_agree(estimator):
    model, guide = make_pair(layers=2, continuous=True)
    elbo = estimator(num_particles=2, vectorize_particles=True)
    elbo.loss(model, guide, X2)  # guesses max_plate_nesting, which draws random numbers
    svi = grads_of(elbo, model, guide, X2, 3, "svi")
    module = grads_of(copy.deepcopy(elbo), model, guide, X2, 3, "module")
    assert svi.keys() == module.keys() and {"v", "v2", "m", "w"} <= svi.keys()
    for name in svi:
        torch.testing.assert_close(svi[name], module[name])


def test_disarm_has_lower_variance_than_arm():
    model, guide = make_pair(layers=2)
    logvar = gradient_variance(
        model, guide, {"arm": ARMELBO(), "disarm": DisARMELBO()}, X2, num_draws=60
    )
    assert logvar["disarm"] < logvar["arm"]


def test_masked_elements_get_no_gradient():
    def model(x):
        with pyro.plate("data", 2), poutine.mask(mask=torch.tensor([False, True])):
            z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(2, H)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=z @ torch.ones(H, D)).to_event(1), obs=x)

    def guide(x):
        logits = pyro.param("logits", torch.zeros(2, H))
        with pyro.plate("data", 2), poutine.mask(mask=torch.tensor([False, True])):
            pyro.sample("z", dist.Bernoulli(logits=logits).to_event(1))

    for estimator in (ARMELBO, DisARMELBO):
        grads = [
            grads_of(estimator(), model, guide, X2, seed, "svi")["logits"] for seed in range(20)
        ]
        stacked = torch.stack(grads)
        assert torch.all(stacked[:, 0] == 0)
        assert stacked[:, 1].abs().sum() > 0


def test_refuses_categorical_site():
    model, guide = make_pair(categorical=True)
    with pytest.raises(ValueError, match="site 'c'.*Bernoulli.*OneHotCategorical"):
        ARMELBO().loss_and_grads(model, guide, X2)


def test_trains_with_svi():
    model, guide = make_pair()
    elbo = DisARMELBO(num_particles=8, vectorize_particles=True)
    svi = SVI(model, guide, Adam({"lr": 0.05}), elbo)
    first = sum(svi.evaluate_loss(X2) for _ in range(20)) / 20
    for _ in range(100):
        svi.step(X2)
    last = sum(svi.evaluate_loss(X2) for _ in range(20)) / 20
    assert last < first - 0.3


@pytest.mark.parametrize("estimator", [ARMELBO, DisARMELBO])
def test_masked_guide_element_keeps_the_gradient_of_what_depends_on_it(estimator):
    """Regression: ARM zeroed the logit gradient of masked guide elements, but a mask drops
    only the site's own log-density: the model's prior on the value still depends on the
    logits (Trace_ELBO's score term is unmasked). Exact gradient 0.099, ARM's exactly 0."""
    mask = torch.tensor([True, False, True])
    data = torch.tensor([0.3, -1.2, 0.8])

    def model():
        with pyro.plate("data", 3):
            b = pyro.sample("b", dist.Bernoulli(0.4))
            with poutine.mask(mask=mask):
                pyro.sample("y", dist.Normal(b, 1.0), obs=data)

    def guide():
        a = pyro.param("a", torch.tensor([0.2, -0.3, 0.5]))
        with pyro.plate("data", 3):
            pyro.sample("b", dist.Bernoulli(logits=a).mask(mask))

    result = check_unbiased(model, guide, estimator(), num_draws=100)
    assert result.passed, result.summary()
