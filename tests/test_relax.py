"""RelaxELBO: unbiased with a learned control network, interfaces, clear errors."""

import logging

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from test_rebar import (
    MODELS,
    X2,
    assert_both_paths_agree,
    assert_opt_out_gives_score_function,
    run_check,
    sbn_guide,
    sbn_model,
    train_controls,
)

from lvmkit.inference.check import gradient_variance
from lvmkit.inference.estimators._relax import EstimatorError
from lvmkit.inference.estimators.relax import RelaxELBO

logging.getLogger("pyro").setLevel(logging.WARNING)


@pytest.mark.parametrize("name", ["sbn", "two_layer", "categorical", "continuous", "masked",
                                  "subsample"])
def test_relax_unbiased_after_training_the_control_network(name):
    model, guide, x, _ = MODELS[name]
    elbo = RelaxELBO(num_particles=50, vectorize_particles=True, variance_optim_lr=0.05)
    train_controls(elbo, model, guide, x, steps=10)
    net = elbo.controls.net
    # The net's output layer starts at zero; training moved it, so r_rho is in play.
    assert net[2].weight.abs().sum() > 0
    result = run_check(name, elbo, num_draws=40)
    assert result.passed, result.summary()


def test_relax_unbiased_with_learned_eta_and_sequential_particles():
    elbo = RelaxELBO(num_particles=2, learn_eta=True, variance_optim_lr=0.05)
    train_controls(elbo, sbn_model, sbn_guide, X2, steps=5)
    result = run_check("sbn", elbo, num_draws=50)
    assert result.passed, result.summary()


def test_relax_lowers_variance_on_sbn():
    relax = RelaxELBO(num_particles=20, vectorize_particles=True, variance_optim_lr=0.02)
    train_controls(relax, sbn_model, sbn_guide, X2, steps=10)
    estimators = {"score": Trace_ELBO(num_particles=20, vectorize_particles=True),
                  "relax": relax}
    logvar = gradient_variance(sbn_model, sbn_guide, estimators, X2, num_draws=60)
    assert logvar["relax"] < logvar["score"] - 2.0


@pytest.mark.parametrize("name", ["two_layer", "categorical"])
def test_loss_and_grads_equals_differentiable_loss(name):
    model, guide, x, _ = MODELS[name]
    module = assert_both_paths_agree(lambda: RelaxELBO(num_particles=2), model, guide, x, 4)
    net_params = [p for n, p in module.named_parameters() if n.startswith("controls.net")]
    assert len(net_params) == 4
    assert all(p.grad is not None for p in net_params)


def test_input_size_builds_the_network_up_front():
    elbo = RelaxELBO(input_size=3, hidden_size=5)
    module = elbo(sbn_model, sbn_guide)
    shapes = sorted(tuple(p.shape) for n, p in module.named_parameters() if "net" in n)
    assert shapes == [(1,), (1, 5), (5,), (5, 3)]
    module(X2).backward()  # 3 latents per datum: matches


def test_error_when_network_input_size_changes():
    elbo = RelaxELBO(input_size=7)
    with pytest.raises(EstimatorError, match="built for 7 relaxed features.*now give 3"):
        elbo.loss_and_grads(sbn_model, sbn_guide, X2)


def test_error_for_sites_in_different_plates():
    def model(x):
        g = pyro.sample("g", dist.Bernoulli(0.5 * torch.ones(2)).to_event(1))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.5 * torch.ones(x.shape[0], 2)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=(z + g).sum(-1, keepdim=True).expand(-1, 4))
                        .to_event(1), obs=x)

    def guide(x):
        a = pyro.param("a", torch.zeros(2))
        pyro.sample("g", dist.Bernoulli(logits=a).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=x[:, :2]).to_event(1))

    with pytest.raises(EstimatorError, match="site 'z' is in plates \\['data'\\].*site 'g'"):
        RelaxELBO().loss_and_grads(model, guide, X2)


def test_opt_out_key_is_relax():
    assert_opt_out_gives_score_function(RelaxELBO(), "relax", seed=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_slow_relax_unbiased_on_every_model(name):
    model, guide, x, _ = MODELS[name]
    elbo = RelaxELBO(num_particles=100, vectorize_particles=True, learn_eta=True,
                     variance_optim_lr=0.05)
    train_controls(elbo, model, guide, x, steps=30)
    result = run_check(name, elbo, num_draws=200)
    assert result.passed, result.summary()
