"""RelaxELBO: unbiased with a learned control network, interfaces, clear errors."""

import logging

import pytest
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

from lvmkit.inference.check import check_unbiased, gradient_variance
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


@pytest.mark.parametrize("fuse", [True, False])
def test_sites_in_different_plates_get_one_network_each_and_stay_unbiased(fuse):
    """Regression: RELAX refused discrete sites in different plates (a global latent
    beside the data plate); each plate group now has its own control network."""
    from test_rebar import global_guide, global_model

    elbo = RelaxELBO(num_particles=20, vectorize_particles=True, variance_optim_lr=0.05,
                     fuse_passes=fuse)
    train_controls(elbo, global_model, global_guide, X2, steps=10)
    assert elbo.controls.net[0].in_features == 2  # 'g', global: 2 units
    assert list(elbo.controls.group_nets) == ["data"]  # 'z': 2 units per datum
    for net in (elbo.controls.net, elbo.controls.group_nets["data"]):
        assert net[2].weight.abs().sum() > 0  # trained, so r_rho is in play
    result = check_unbiased(global_model, global_guide, elbo, X2, num_draws=60)
    assert result.passed, result.summary()
    # the state round trip rebuilds both networks
    fresh = RelaxELBO()
    fresh.load_state_dict(elbo.state_dict())
    assert list(fresh.controls.group_nets) == ["data"]


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


def test_plain_svi_trains_the_control_networks():
    """Regression (issue 14): RELAX's networks (one per plate group) are parameters of the
    caller's optimizer, registered in the param store, and trained by plain SVI."""
    import pyro
    from pyro.infer import SVI
    from pyro.optim import Adam
    from test_rebar import global_guide, global_model

    elbo = RelaxELBO()
    optim = Adam({"lr": 0.05})
    svi = SVI(global_model, global_guide, optim, elbo)
    for _ in range(3):
        svi.step(X2)
    nets = [elbo.controls.net, *elbo.controls.group_nets.values()]
    assert len(nets) == 2
    store = pyro.get_param_store()
    for net in nets:
        for p in net.parameters():
            assert p in optim.optim_objs
            assert store.param_name(p).startswith(elbo.module_name + "$$$")
        assert net[2].weight.abs().sum() > 0  # the zero-initialised output layer moved
