"""ARMELBO and DisARMELBO: unbiasedness against exact gradients, layers, masks, errors."""

import copy

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI
from pyro.optim import Adam

from lvmkit.inference.check import check_unbiased, gradient_variance
from lvmkit.inference.estimators.arm import ARMELBO, DisARMELBO

D, H = 3, 2


def _init(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.7


def make_pair(*, layers=1, subsample=False, continuous=False, categorical=False, bernoulli=True):
    """A tiny model/guide pair: few enough configurations to enumerate exactly."""

    def plate(x):
        return pyro.plate("data", x.shape[0], subsample_size=2 if subsample else None)

    def model(x):
        w = pyro.param("w", _init(H, D, seed=1))
        with plate(x) as idx:
            xb = x[idx]
            logits = torch.zeros(len(idx), D)
            if bernoulli:
                if layers == 2:
                    top_prior = pyro.param("top_prior", _init(1, seed=2))
                    w2 = pyro.param("w2", _init(1, H, seed=3))
                    top = pyro.sample(
                        "top", dist.Bernoulli(logits=top_prior).expand([len(idx), 1]).to_event(1)
                    )
                    z_logits = top @ w2
                else:
                    z_logits = pyro.param("prior", _init(H, seed=4)).expand(len(idx), H)
                z = pyro.sample("z", dist.Bernoulli(logits=z_logits).to_event(1))
                logits = logits + z @ w
            if categorical:
                wc = pyro.param("wc", _init(3, D, seed=5))
                c = pyro.sample("c", dist.OneHotCategorical(logits=torch.zeros(len(idx), 3)))
                logits = logits + c @ wc
            if continuous:
                a = pyro.param("a", _init(1, D, seed=6))
                y = pyro.sample("y", dist.Normal(0.0, 1.0).expand([len(idx), 1]).to_event(1))
                logits = logits + y @ a
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=xb)

    def guide(x):
        with plate(x) as idx:
            xb = x[idx]
            z_sum = torch.zeros(len(idx), 1)
            if bernoulli:
                v = pyro.param("v", _init(D, H, seed=7))
                z = pyro.sample("z", dist.Bernoulli(logits=xb @ v - 0.2).to_event(1))
                z_sum = z.sum(-1, keepdim=True)
                if layers == 2:
                    v2 = pyro.param("v2", _init(H, 1, seed=8))
                    pyro.sample("top", dist.Bernoulli(logits=z @ v2 + 0.3).to_event(1))
            if categorical:
                vc = pyro.param("vc", _init(D, 3, seed=9))
                pyro.sample("c", dist.OneHotCategorical(logits=xb @ vc))
            if continuous:
                m = pyro.param("m", _init(D, 1, seed=10))
                pyro.sample("y", dist.Normal(xb @ m + 0.5 * z_sum, 0.8).to_event(1))

    return model, guide


X2 = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
X4 = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def _grads(elbo, model, guide, x, seed, via):
    # Create every param before reading the store.
    poutine.trace(poutine.replay(model, poutine.trace(guide).get_trace(x))).get_trace(x)
    pyro.set_rng_seed(seed)
    params = dict(pyro.get_param_store().named_parameters())
    for p in params.values():
        p.grad = None
    if via == "svi":
        elbo.loss_and_grads(model, guide, x)
    else:
        elbo(model, guide)(x).backward()
    return {n: p.grad.clone() for n, p in params.items() if p.grad is not None}


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
    svi = _grads(elbo, model, guide, X2, 3, "svi")
    module = _grads(copy.deepcopy(elbo), model, guide, X2, 3, "module")
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
        grads = [_grads(estimator(), model, guide, X2, seed, "svi")["logits"] for seed in range(20)]
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
