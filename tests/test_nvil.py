"""NVILELBO: unbiasedness without normalisation, baseline training, normalisation, errors."""

import copy

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from small_models import X2, X4, D, H, create_params, grads_of, make_pair

from lvmkit.inference.check import check_unbiased, gradient_variance
from lvmkit.inference.estimators.nvil import NVILELBO


def _randomize(net: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))


def test_unbiased_one_layer_with_nontrivial_baseline():
    model, guide = make_pair()
    elbo = NVILELBO(normalize=False, x_dim=D, num_particles=4, vectorize_particles=True)
    _randomize(elbo.baseline_net)  # a poor, input-dependent baseline must not bias
    result = check_unbiased(model, guide, elbo, X2, num_draws=150)
    assert result.passed, result.summary()


class _FreshEachCall:
    """An ELBO whose every ``loss_and_grads`` is the first call of a new ``NVILELBO``."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs

    def loss_and_grads(self, model, guide, *args, **kwargs):
        return NVILELBO(**self.kwargs).loss_and_grads(model, guide, *args, **kwargs)


def test_first_call_is_unbiased():
    """Before any running statistics exist, each signal is centred on the other signals of
    its batch: still unbiased (the draws here are all first calls)."""
    model, guide = make_pair()
    elbo = _FreshEachCall(normalize=False, x_dim=D, num_particles=4, vectorize_particles=True)
    result = check_unbiased(model, guide, elbo, X2, num_draws=150)
    assert result.passed, result.summary()


def test_first_step_is_not_orders_of_magnitude_larger_than_the_next():
    """Regression: the running moments started at mean 0 and variance 1, so the first
    step's score term was not centred or normalised like the later ones; with learning
    signals in the thousands (data scaled by N / batch) it was ~10^4 times larger, and
    Adam's second moment then kept the guide's steps tiny for thousands of steps."""
    model, guide = make_pair()

    def scaled(fn):
        return poutine.scale(fn, scale=2000.0)

    for normalize in (True, False):
        pyro.clear_param_store()
        elbo = NVILELBO(normalize=normalize, x_dim=D, num_particles=8, vectorize_particles=True)
        guide_params = ["v"]
        norms = []
        for seed in range(3):
            grads = grads_of(elbo, scaled(model), scaled(guide), X2, seed, "svi")
            norms.append(sum(float(grads[n].norm()) for n in guide_params if n in grads))
        assert norms[0] < 10 * max(norms[1:]), (normalize, norms)


def test_unbiased_two_layers_subsampled():
    model, guide = make_pair(layers=2, subsample=True)
    elbo = NVILELBO(normalize=False, num_particles=4, vectorize_particles=True)
    result = check_unbiased(model, guide, elbo, X4, num_draws=150)
    assert result.passed, result.summary()


def test_unbiased_categorical_beside_continuous():
    model, guide = make_pair(bernoulli=False, categorical=True, continuous=True)
    elbo = NVILELBO(normalize=False, x_dim=D, num_particles=4, vectorize_particles=True)
    _randomize(elbo.baseline_net)
    result = check_unbiased(model, guide, elbo, X2, num_draws=120, num_continuous_draws=16)
    assert result.passed, result.summary()


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [{"layers": 2}, {"subsample": True}, {"continuous": True}, {"categorical": True},
     {"layers": 2, "continuous": True}],
)
def test_unbiased_slow(options):
    model, guide = make_pair(**options)
    x = X4 if options.get("subsample") else X2
    elbo = NVILELBO(normalize=False, num_particles=4, vectorize_particles=True)
    result = check_unbiased(model, guide, elbo, x, num_draws=2000, num_continuous_draws=64)
    assert result.passed, result.summary()


@pytest.mark.parametrize("normalize", [False, True])
def test_svi_and_module_gradients_agree(normalize):
    model, guide = make_pair(layers=2, continuous=True)
    elbo = NVILELBO(normalize=normalize, x_dim=D)
    create_params(model, guide, X2)
    _randomize(elbo.baseline_net)
    elbo.moments.update(torch.tensor([-30.0, -10.0]))  # nontrivial running mean and variance
    twin = copy.deepcopy(elbo)
    twin.module_name = "twin_baseline"
    svi = grads_of(elbo, model, guide, X2, 3, "svi")
    baseline_grads = [p.grad.clone() for p in elbo.baseline_net.parameters()]
    module = grads_of(twin, model, guide, X2, 3, "module")
    assert {"v", "v2", "m", "w"} <= svi.keys()
    for name in ("v", "v2", "m", "w", "w2", "a"):
        torch.testing.assert_close(svi[name], module[name])
    for grad, q in zip(baseline_grads, twin.baseline_net.parameters(), strict=True):
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, q.grad)


def test_normalisation_divides_only_the_score_term():
    model, guide = make_pair()  # guide params enter through the score term alone
    create_params(model, guide, X2)
    plain = NVILELBO(normalize=False, x_dim=D)
    normalized = copy.deepcopy(plain)
    normalized.normalize = True
    for elbo in (plain, normalized):
        elbo.moments.update(torch.tensor([-5.0, 5.0]))  # variance 25: divisor 5
    a = grads_of(plain, model, guide, X2, 5, "svi")
    b = grads_of(normalized, model, guide, X2, 5, "svi")
    torch.testing.assert_close(b["v"], a["v"] / 5)
    torch.testing.assert_close(b["w"], a["w"])  # model gradients are pathwise, unchanged


def test_running_moments_follow_the_signal():
    elbo = NVILELBO()
    elbo.moments.update(torch.full((4,), 10.0))
    elbo.moments.update(torch.tensor([0.0, 2.0]))
    assert elbo.moments.mean.item() == pytest.approx(0.8 * 10.0 + 0.2 * 1.0)
    assert elbo.moments.var.item() == pytest.approx(0.2 * 1.0)


def test_baseline_is_trained_by_svi_and_reduces_variance():
    model, guide = make_pair(layers=2)
    elbo = NVILELBO(num_particles=4, vectorize_particles=True, normalize=False)
    svi = SVI(model, guide, Adam({"lr": 0.02}), elbo)
    for _ in range(80):
        svi.step(X2)
    stored = [n for n in pyro.get_param_store() if n.startswith(elbo.module_name)]
    assert len(stored) == 4  # two Linear layers, weight and bias each
    assert elbo.baseline_net[-1].weight.abs().sum() > 0  # moved away from its zero init
    logvar = gradient_variance(
        model, guide, {"score": Trace_ELBO(num_particles=4, vectorize_particles=True),
                       "nvil": elbo}, X2, num_draws=60,
    )
    assert logvar["nvil"] < logvar["score"] - 2.0


def test_refuses_enumerated_site():
    def guide(x):
        with pyro.plate("data", 2):
            pyro.sample(
                "z", dist.Bernoulli(0.5).expand([2, H]).to_event(1),
                infer={"enumerate": "parallel"},
            )

    model, _ = make_pair()
    with pytest.raises(ValueError, match="site 'z'.*enumerate"), pyro.validation_enabled(False):
        NVILELBO().loss_and_grads(model, guide, X2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="decay"):
        NVILELBO(decay=1.0)
    with pytest.raises(ValueError, match="hidden"):
        NVILELBO(hidden=0)
    model, guide = make_pair()
    elbo = NVILELBO(x_dim=5)
    with pytest.raises(ValueError, match="inputs of size 5, got x of shape \\(2, 3\\)"):
        elbo.loss_and_grads(model, guide, X2)


def test_baseline_is_a_parameter_of_the_elbo_module():
    model, guide = make_pair()
    elbo = NVILELBO(x_dim=D)
    module_params = {id(p) for p in elbo(model, guide).parameters()}
    assert {id(p) for p in elbo.baseline_net.parameters()} <= module_params
    # a plain torch optimizer over the module trains the baseline through the surrogate
    create_params(model, guide, X2)
    optim = torch.optim.Adam(
        [*elbo.baseline_net.parameters(), *pyro.get_param_store().values()], lr=0.05
    )
    before = elbo.baseline_net[-1].bias.detach().clone()
    for _ in range(3):
        optim.zero_grad()
        elbo(model, guide)(X2).backward()
        optim.step()
    assert not torch.equal(before, elbo.baseline_net[-1].bias)


def _scaled_continuous_pair():
    """A Bernoulli and a Normal site per datum, scaled so the signal's variance exceeds 1."""
    model, guide = make_pair(continuous=True)
    return poutine.scale(model, scale=20.0), poutine.scale(guide, scale=20.0)


def test_default_is_unbiased_beside_a_continuous_site():
    """Regression: the default was the paper's normalised NVIL, biased here (|z| = 20)."""
    model, guide = _scaled_continuous_pair()
    elbo = NVILELBO(x_dim=D, num_particles=4, vectorize_particles=True)
    assert elbo.normalize is False
    result = check_unbiased(model, guide, elbo, X2, num_draws=150, num_continuous_draws=16)
    assert result.passed, result.summary()


def test_normalised_variant_is_biased_beside_a_continuous_site():
    """The documented bias of ``normalize=True``: the score term alone is rescaled."""
    model, guide = _scaled_continuous_pair()
    elbo = NVILELBO(normalize=True, x_dim=D, num_particles=4, vectorize_particles=True)
    result = check_unbiased(model, guide, elbo, X2, num_draws=150, num_continuous_draws=16)
    assert not result.passed
    assert result.max_abs_z > 3 * result.threshold, result.summary()


def test_tensor_scale_without_a_baseline_input_is_unbiased_and_refused_with_one():
    """Regression: a ``poutine.scale`` by a tensor (a weight per row) crashed NVIL with
    "only one element tensors can be converted to Python scalars". Without a 'data' plate
    there is no baseline network to scale and the estimate is unbiased; with one, the
    per-datum baseline needs a scalar scale and the error names the site."""
    from lvmkit.inference.estimators import EstimatorError

    x = torch.tensor([[0.3, -1.2, 0.8], [2.0, 1.1, -0.4]])
    weights = torch.tensor([[1.0], [2.5]])

    def model():
        with pyro.plate("outer", 2, dim=-2), pyro.plate("inner", 3, dim=-1), \
                poutine.scale(scale=weights):
            b = pyro.sample("b", dist.Bernoulli(0.4))
            pyro.sample("y", dist.Normal(b, 1.0), obs=x)

    def guide():
        a = pyro.param("a", torch.tensor([0.2, -0.3, 0.5]))
        with pyro.plate("outer", 2, dim=-2), pyro.plate("inner", 3, dim=-1), \
                poutine.scale(scale=weights):
            pyro.sample("b", dist.Bernoulli(logits=a))

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    result = check_unbiased(model, guide, NVILELBO(), num_draws=200)
    assert result.passed, result.summary()

    def data_model(x):
        with pyro.plate("data", 2), poutine.scale(scale=weights[:, 0]):
            b = pyro.sample("b", dist.Bernoulli(0.4).expand([3]).to_event(1))
            pyro.sample("y", dist.Normal(b, 1.0).to_event(1), obs=x)

    def data_guide(x):
        a = pyro.param("a2", torch.zeros(3))
        with pyro.plate("data", 2), poutine.scale(scale=weights[:, 0]):
            pyro.sample("b", dist.Bernoulli(logits=a).to_event(1))

    with pytest.raises(EstimatorError, match="site 'b'.*scalar.*shape \\(2,\\)"):
        NVILELBO().loss_and_grads(data_model, data_guide, x)
