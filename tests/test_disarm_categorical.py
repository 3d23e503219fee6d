"""CategoricalDisARMELBO: stick-breaking DisARM on one-hot sites, unbiased against exact
enumeration; SVI/module agreement; negative control; refusals."""

import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from small_models import X2, X4, grads_of, make_pair

from lvmkit.inference.check import check_unbiased
from lvmkit.inference.estimators.disarm_categorical import (
    CategoricalDisARMELBO,
    _stick_category,
    stick_logits,
)


def test_stick_breaking_draws_have_the_categorical_probabilities():
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.0], [5.0, -5.0, 0.0, 0.0]])
    probs = torch.sigmoid(stick_logits(logits))
    u = torch.rand((40000,) + probs.shape, generator=torch.Generator().manual_seed(0))
    category = _stick_category(u, probs.expand(u.shape))
    freq = torch.nn.functional.one_hot(category, 4).float().mean(0)
    torch.testing.assert_close(freq, torch.softmax(logits, -1), atol=0.01, rtol=0)


def test_unbiased_on_the_categorical_model():
    model, guide = make_pair(categorical=True, bernoulli=False)
    elbo = CategoricalDisARMELBO(num_particles=4, vectorize_particles=True)
    result = check_unbiased(model, guide, elbo, X2, num_draws=100)
    assert result.passed, result.summary()
    assert result.exact["vc"].abs().max() > 3 * result.stderr["vc"].max()


@pytest.mark.slow
@pytest.mark.parametrize(
    "options,x",
    [
        ({"categorical": True}, X2),
        ({"layers": 2}, X2),
        ({"categorical": True, "continuous": True}, X2),
        ({"layers": 2, "categorical": True, "subsample": True}, X4),
    ],
)
def test_unbiased_slow(options, x):
    model, guide = make_pair(**options)
    elbo = CategoricalDisARMELBO(num_particles=4, vectorize_particles=True)
    result = check_unbiased(model, guide, elbo, x, num_draws=1000, num_continuous_draws=32)
    assert result.passed, result.summary()


class _WithoutPairWeight(CategoricalDisARMELBO):
    """Drops DisARM's sigma(|phi|) weight: biased."""

    def _pair_weight(self, probs):
        return torch.ones_like(probs)


def test_check_detects_a_biased_variant():
    model, guide = make_pair(categorical=True, bernoulli=False)
    elbo = _WithoutPairWeight(num_particles=4, vectorize_particles=True)
    assert not check_unbiased(model, guide, elbo, X2, num_draws=200).passed


def test_svi_and_module_gradients_agree():
    model, guide = make_pair(layers=2, continuous=True, categorical=True)
    elbo = CategoricalDisARMELBO(num_particles=2, vectorize_particles=True)
    elbo.loss(model, guide, X2)  # guesses max_plate_nesting, which draws random numbers
    svi = grads_of(elbo, model, guide, X2, 3, "svi")
    module = grads_of(copy.deepcopy(elbo), model, guide, X2, 3, "module")
    assert svi.keys() == module.keys() and {"v", "v2", "m", "vc", "w"} <= svi.keys()
    for name in svi:
        torch.testing.assert_close(svi[name], module[name])


def test_refuses_other_non_reparameterized_sites():
    def model():
        pyro.sample("n", dist.Poisson(3.0))

    def guide():
        pyro.sample("n", dist.Poisson(pyro.param("rate", torch.tensor(2.0))))

    with pytest.raises(ValueError, match="site 'n'.*Bernoulli and OneHotCategorical.*Poisson"):
        CategoricalDisARMELBO().loss_and_grads(model, guide)
