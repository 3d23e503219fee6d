"""RLOOELBO: unbiasedness against exact gradients, SVI/module agreement, masks, errors."""

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
from lvmkit.inference.estimators.rloo import RLOOELBO

MODELS = [
    ({}, X2),
    ({"layers": 2}, X2),
    ({"categorical": True}, X2),
    ({"continuous": True}, X2),
    ({"layers": 2, "subsample": True}, X4),
]


def test_unbiased_one_layer_and_categorical():
    for options in ({}, {"categorical": True, "bernoulli": False}):
        pyro.clear_param_store()
        model, guide = make_pair(**options)
        result = check_unbiased(model, guide, RLOOELBO(num_particles=4), X2, num_draws=150)
        assert result.passed, result.summary()


@pytest.mark.slow
@pytest.mark.parametrize("options,x", MODELS)
def test_unbiased_slow(options, x):
    model, guide = make_pair(**options)
    result = check_unbiased(
        model, guide, RLOOELBO(num_particles=3), x, num_draws=1500, num_continuous_draws=64
    )
    assert result.passed, result.summary()


class _OwnMeanBaseline(RLOOELBO):
    """Centres on the mean of all K draws, own draw included: biased by (K-1)/K."""

    def _rloo_score_surrogate(self, site, score_term, log_r, pdim):
        signal = log_r.sum_to(site["cond_indep_stack"])
        return ((signal - signal.mean(pdim, keepdim=True)).detach() * score_term).sum()


def test_check_detects_a_baseline_that_sees_its_own_draw():
    # the negative control: the same check rejects the biased centring
    model, guide = make_pair(layers=2)
    result = check_unbiased(model, guide, _OwnMeanBaseline(num_particles=2), X2, num_draws=300)
    assert not result.passed


def test_svi_and_module_gradients_agree():
    model, guide = make_pair(layers=2, continuous=True, categorical=True)
    elbo = RLOOELBO(num_particles=3)
    elbo.loss(model, guide, X2)  # guesses max_plate_nesting, which draws random numbers
    svi = grads_of(elbo, model, guide, X2, 3, "svi")
    module = grads_of(copy.deepcopy(elbo), model, guide, X2, 3, "module")
    assert svi.keys() == module.keys() and {"v", "v2", "m", "vc", "w"} <= svi.keys()
    for name in svi:
        torch.testing.assert_close(svi[name], module[name])


@pytest.mark.parametrize("k", [1, 0])
def test_refuses_fewer_than_two_particles(k):
    with pytest.raises(ValueError, match="num_particles >= 2.*no other draw"):
        RLOOELBO(num_particles=k)


def test_refuses_unvectorized_particles():
    with pytest.raises(ValueError, match="vectorize_particles=False"):
        RLOOELBO(num_particles=2, vectorize_particles=False)


def test_k_counts_model_evaluations_per_datum():
    calls = []
    model, guide = make_pair()

    def counted(x):
        calls.append(1)
        return model(x)

    elbo = RLOOELBO(num_particles=5, max_plate_nesting=1)
    elbo.loss_and_grads(counted, guide, X2)
    # the first call also runs particle 0 alone, once, to check that the model broadcasts
    assert len(calls) == 2
    calls.clear()
    elbo.loss_and_grads(counted, guide, X2)
    # then one vectorized model call holding 5 draws of each datum
    assert len(calls) == 1
    tr = poutine.trace(elbo._vectorized_num_particles(guide)).get_trace(X2)
    assert tr.nodes["z"]["value"].shape == (5, 2, H)


def test_masked_elements_get_no_gradient():
    def model(x):
        with pyro.plate("data", 2), poutine.mask(mask=torch.tensor([False, True])):
            z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(2, H)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=z @ torch.ones(H, D)).to_event(1), obs=x)

    def guide(x):
        logits = pyro.param("logits", torch.zeros(2, H))
        with pyro.plate("data", 2), poutine.mask(mask=torch.tensor([False, True])):
            pyro.sample("z", dist.Bernoulli(logits=logits).to_event(1))

    grads = torch.stack(
        [grads_of(RLOOELBO(), model, guide, X2, seed, "svi")["logits"] for seed in range(10)]
    )
    assert torch.all(grads[:, 0] == 0)
    assert grads[:, 1].abs().sum() > 0


def test_trains_with_svi():
    model, guide = make_pair()
    svi = SVI(model, guide, Adam({"lr": 0.05}), RLOOELBO(num_particles=4))
    first = sum(svi.evaluate_loss(X2) for _ in range(20)) / 20
    for _ in range(100):
        svi.step(X2)
    last = sum(svi.evaluate_loss(X2) for _ in range(20)) / 20
    assert last < first - 0.3


@pytest.mark.parametrize("name", ["rloo", "double-cv", "rodeo", "categorical-disarm"])
def test_masked_guide_element_keeps_the_score_gradient_of_what_depends_on_it(name):
    """Regression: RLOO, Double CV, RODEO and the categorical DisARM multiplied their score
    coefficients by the site's mask, so a masked guide element whose value an unmasked
    observation still depends on got a logit gradient of exactly 0 (exact: 1.076). A mask
    drops only the site's own log-density (Trace_ELBO's score term is unmasked)."""
    from lvmkit.inference import (
        RLOOELBO,
        CategoricalDisARMELBO,
        DoubleCVELBO,
        RodeoELBO,
        check_unbiased,
    )

    estimator = {"rloo": lambda: RLOOELBO(num_particles=3),
                 "double-cv": lambda: DoubleCVELBO(num_particles=3),
                 "rodeo": lambda: RodeoELBO(num_particles=3),
                 "categorical-disarm": CategoricalDisARMELBO}[name]()
    data = torch.tensor([0.3, -1.2, 2.0])
    mask = torch.tensor([True, False, True])

    def model():
        with pyro.plate("data", 3):
            with poutine.mask(mask=mask):
                b = pyro.sample("b", dist.Bernoulli(0.4))
            pyro.sample("y", dist.Normal(2 * b, 1.0), obs=data)

    def guide():
        a = pyro.param("a", torch.tensor([0.2, -0.3, 0.5]))
        with pyro.plate("data", 3), poutine.mask(mask=mask):
            pyro.sample("b", dist.Bernoulli(logits=a))

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    result = check_unbiased(model, guide, estimator, num_draws=200)
    assert abs(float(result.exact["a"][1])) > 0.5  # the masked element's gradient is not 0
    assert result.passed, result.summary()
