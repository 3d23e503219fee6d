"""AmortizedAutoHVM: per-datum hierarchical guide in a (subsampled) data plate.

Checks the bound against exact log evidences (conjugate Gaussian, Gamma-Poisson, and a
bimodal per-datum posterior by quadrature), posterior recovery by ``fit`` at B < N against
AutoNormal, the gain over an amortized mean-field encoder on held-out seeds, the
unbiasedness of the mini-batch estimate, and the refusals.
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from pyro.nn import PyroModule

from lvmkit.guides import AmortizedAutoHVM, AutoHVM
from lvmkit.guides.hierarchical import check_auxiliary_guide
from lvmkit.inference import fit, log_likelihood
from lvmkit.nn import gaussian_params, mlp

SIGMA = 0.5  # conjugate model: z ~ N(0, 1), x ~ N(z, SIGMA); z | x ~ N(0.8 x, 0.2)
SQUARE_NOISE = 0.3  # bimodal model: x ~ N(z^2, SQUARE_NOISE)


def conjugate_batch_plate(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, SIGMA), obs=x)


def conjugate_subsampled(batch_size):
    def model(x):
        with pyro.plate("data", len(x), subsample_size=batch_size) as ind:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, SIGMA), obs=x[ind])

    return model


def square_model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z**2, SQUARE_NOISE), obs=x)


def gamma_poisson(x):
    with pyro.plate("data", len(x)):
        rate = pyro.sample("rate", dist.Gamma(2.0, 0.5))
        pyro.sample("x", dist.Poisson(rate), obs=x)


def conjugate_log_evidence(x):
    return float(dist.Normal(0.0, (1 + SIGMA**2) ** 0.5).log_prob(x).sum())


def square_log_evidence(x):
    grid = torch.linspace(-6, 6, 6001, dtype=torch.float64)
    x = x.double()
    log_joint = dist.Normal(0.0, 1.0).log_prob(grid) + dist.Normal(
        grid**2, SQUARE_NOISE
    ).log_prob(x[:, None])
    return float((torch.logsumexp(log_joint, -1) + math.log(grid[1] - grid[0])).sum())


def gamma_poisson_log_evidence(x):
    # rate ~ Gamma(2, 0.5), x | rate ~ Poisson: x ~ NegativeBinomial(2, p = 1 / 1.5)
    return float(dist.NegativeBinomial(2.0, probs=torch.tensor(1 / 1.5)).log_prob(x).sum())


def bound(model, guide, x, seeds, particles=200, nesting=1):
    """Mean and standard error over ``seeds`` of ``particles``-draw ELBO estimates."""
    values = []
    for seed in seeds:
        pyro.set_rng_seed(seed)
        elbo = Trace_ELBO(
            num_particles=particles, vectorize_particles=True, max_plate_nesting=nesting
        )
        with torch.no_grad():
            values.append(-elbo.loss(model, guide, x))
    values = torch.tensor(values)
    return float(values.mean()), float(values.std() / len(values) ** 0.5)


def posterior_moments(guide, x, draws=200):
    """Per-datum mean and sd of q(z | x) from guide draws (a guide over the batch plate)."""
    with torch.no_grad():
        z = torch.stack([guide(x)["z"] for _ in range(draws)])
    return z.mean(0), z.std(0)


class MeanFieldEncoder(PyroModule):
    """The amortized mean-field baseline: q(z_i | x_i) = N(mu(x_i), sigma(x_i)^2)."""

    def __init__(self):
        super().__init__("mean_field")
        self.net = mlp(1, (32,), 2)

    def forward(self, x):
        loc, scale = gaussian_params(self.net(x[:, None]))
        with pyro.plate("data", len(x)):
            return pyro.sample("z", dist.Normal(loc[:, 0], scale[:, 0]))


def adam(lr=2e-2):
    return pyro.optim.Adam({"lr": lr})


@pytest.fixture(autouse=True)
def _fresh():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


# -- (a) a lower bound -----------------------------------------------------------------------
def particles(count=8):
    return Trace_ELBO(num_particles=count, vectorize_particles=True, max_plate_nesting=1)


@pytest.mark.parametrize(
    "model, log_evidence, data",
    [
        (conjugate_batch_plate, conjugate_log_evidence, lambda: torch.randn(40) * 1.1),
        (square_model, square_log_evidence, lambda: torch.randn(40) ** 2 + 0.3 * torch.randn(40)),
        (gamma_poisson, gamma_poisson_log_evidence, lambda: dist.Poisson(
            dist.Gamma(2.0, 0.5).sample((40,))).sample()),
    ],
    ids=["conjugate", "square", "gamma-poisson"],
)
@pytest.mark.parametrize("num_aux_samples", [0, 3])
def test_untrained_bound_is_below_the_exact_log_evidence(model, log_evidence, data,
                                                        num_aux_samples):
    """With wide components and noise, where a missing or unscaled reverse term shows."""
    x = data()
    exact = log_evidence(x)
    wide = AmortizedAutoHVM(model, hidden=(16,), noise_scale=1.0, component_scale=1.0,
                            num_aux_samples=num_aux_samples)
    mean, se = bound(model, wide, x, seeds=range(5))
    assert mean < exact + 4 * se, (mean, se, exact)


def test_trained_bound_on_a_positive_latent_is_tight_and_below_log_evidence():
    """Gamma-Poisson: the rate is positive, so the Delta sites carry the log-Jacobian of
    exp; a wrong sign or a missing term would put the trained bound above log p(x) or far
    below it."""
    x = dist.Poisson(dist.Gamma(2.0, 0.5).sample((20,))).sample()
    exact = gamma_poisson_log_evidence(x)
    guide = AmortizedAutoHVM(gamma_poisson, hidden=(32,))
    fit(gamma_poisson, guide, x, steps=200, batch_size=10, optim=adam(2e-2), elbo=particles(),
        progress=False)
    mean, se = bound(gamma_poisson, guide, x, seeds=range(100, 105))
    # the log-Jacobian is E log(rate), about 1.4 nats per datum here: a missing or
    # wrongly-signed one is far outside this window
    assert exact - 0.25 * len(x) < mean < exact + 4 * se, (mean, se, exact)


def test_the_reverse_term_is_what_makes_it_a_bound():
    """Auxiliary coordinates that q(z | a) ignores, made wide: dropping the reverse factor
    (``is_auxiliary`` alone, r = 1) credits their entropy and the objective exceeds
    log p(x), so the checks above can fail; with the factor it stays below."""
    x = torch.randn(40) * 1.1
    exact = conjugate_log_evidence(x)
    guide = AmortizedAutoHVM(conjugate_batch_plate, hidden=(16,), aux_dim=4)
    widened(guide, x, 5.0)
    unchecked = poutine.block(guide, hide=["_AmortizedAutoHVM_reverse"])
    mean, se = bound(conjugate_batch_plate, unchecked, x, seeds=range(5))
    assert mean > exact + 4 * se, (mean, se, exact)
    mean, se = bound(conjugate_batch_plate, guide, x, seeds=range(5))
    assert mean < exact + 4 * se, (mean, se, exact)


def test_importance_weighted_bound_and_the_auxiliary_check():
    """``log_likelihood`` (IWAE over z of the hierarchical weights, valid per the
    hierarchical module's docstring) lies between the plain bound and log p(x), and
    ``check_auxiliary_guide`` finds every guide-only site accounted for."""
    x = torch.randn(40) * 1.1
    exact = conjugate_log_evidence(x)
    guide = AmortizedAutoHVM(conjugate_batch_plate, hidden=(16,), noise_scale=0.5,
                             component_scale=0.5)
    guide(x)
    check_auxiliary_guide(conjugate_batch_plate, guide, x)
    plain, _ = bound(conjugate_batch_plate, guide, x, seeds=range(3))
    with torch.no_grad():
        iw = torch.tensor([float(log_likelihood(conjugate_batch_plate, guide, x,
                                                num_samples=200).sum()) for _ in range(4)])
    se = float(iw.std() / 2)
    assert plain < float(iw.mean()) < exact + 4 * se + 1e-3, (plain, iw, exact)


def test_more_reverse_draws_tighten_the_bound():
    x = torch.randn(30) ** 2 + 0.3 * torch.randn(30)
    guide = AmortizedAutoHVM(square_model, hidden=(32,), noise_scale=0.5)
    fit(square_model, guide, x, steps=150, batch_size=10, optim=adam(1e-2), elbo=particles(),
        progress=False)
    results = {}
    for k in (0, 8):
        guide.num_aux_samples = k
        results[k] = bound(square_model, guide, x, seeds=range(200, 205))
    (m0, s0), (m8, s8) = results[0], results[8]
    assert m8 > m0 - 3 * (s0**2 + s8**2) ** 0.5, results
    assert m8 < square_log_evidence(x) + 4 * s8


# -- (b) posterior recovery at B < N ---------------------------------------------------------
def test_fit_at_b_below_n_recovers_the_conjugate_posterior_like_autonormal():
    n, b, steps = 100, 20, 300
    x = torch.randn(n) * (1 + SIGMA**2) ** 0.5
    model = conjugate_subsampled(b)
    guide = AmortizedAutoHVM(model, hidden=(32,))
    fit(model, guide, x, steps=steps, batch_size=b, optim=adam(1e-2), elbo=particles(4),
        progress=False)
    # the same parameters over the whole data: a batch-plate twin of the guide
    twin = AmortizedAutoHVM(conjugate_batch_plate, hidden=(32,))
    twin(x)
    twin.load_state_dict(guide.state_dict())
    mean, sd = posterior_moments(twin, x)
    error = float(((mean - 0.8 * x) ** 2).mean().sqrt())
    assert abs(float(sd.mean()) - 0.2**0.5) < 0.08, float(sd.mean())

    pyro.clear_param_store()
    normal = AutoNormal(model)
    fit(model, normal, x, steps=steps, batch_size=b, optim=adam(1e-2), elbo=particles(4),
        progress=False)
    error_normal = float(((normal.locs.z.detach() - 0.8 * x) ** 2).mean().sqrt())
    # AutoNormal sees each datum every N / B steps; the encoder shares what it learns
    assert error < max(1.5 * error_normal, 0.1), (error, error_normal)
    assert error < 0.15, error  # measured 0.05-0.07 (the draws' own error is 0.03)


# -- (c) a bimodal per-datum posterior ---------------------------------------------------------
def test_bimodal_posteriors_beat_amortized_mean_field_on_held_out_seeds():
    n, b, steps = 40, 10, 400
    x = torch.randn(n) ** 2 + SQUARE_NOISE * torch.randn(n)
    results = {}
    for name in ("hvm", "mean_field"):
        pyro.clear_param_store()
        pyro.set_rng_seed(1)
        guide = AmortizedAutoHVM(square_model, hidden=(32,)) if name == "hvm" else (
            MeanFieldEncoder())
        fit(square_model, guide, x, steps=steps, batch_size=b, optim=adam(1e-2),
            elbo=particles(), progress=False)
        results[name] = bound(square_model, guide, x, seeds=range(1000, 1008))
    (m_h, s_h), (m_m, s_m) = results["hvm"], results["mean_field"]
    se = (s_h**2 + s_m**2) ** 0.5
    # mean-field misses one of two modes on about half the data: up to log 2 per datum
    assert m_h - m_m > max(5 * se, 0.1 * n), results
    assert m_h < square_log_evidence(x) + 4 * s_h


# -- (d) mini-batch scaling ------------------------------------------------------------------
def widened(guide, x, raw_scale):
    """Set up ``guide`` on ``x`` and widen q(a | x) on the coordinates a_1.. that
    u's location u0 + f(x) + P a ignores (and its noise starts without), so that
    log r(a | z, x) is large: a reverse term scaled wrongly under subsampling would then
    bias the estimate visibly."""
    guide(x)
    with torch.no_grad():
        guide.aux_net[-1].bias.view(2, guide.num_components, guide.aux_dim)[1, :, 1:] = raw_scale
    return guide


def test_minibatch_estimate_is_unbiased_for_the_full_data_bound():
    """Pyro's subsampled plate: the mean over random batches of B = 10 of N = 40 of the
    bound estimate matches the full-data bound of a twin guide with the same parameters;
    the reverse term (inside the plate) is scaled by N / B with the rest."""
    n, b = 40, 10
    x = torch.randn(n) * 1.1
    model = conjugate_subsampled(b)
    guide = widened(AmortizedAutoHVM(model, hidden=(16,), aux_dim=3), x, 1.0)
    twin = AmortizedAutoHVM(conjugate_batch_plate, hidden=(16,), aux_dim=3)
    twin(x)
    twin.load_state_dict(guide.state_dict())
    with torch.no_grad():
        pyro.set_rng_seed(3)
        sub = torch.tensor([-particles(32).loss(model, guide, x) for _ in range(150)])
        pyro.set_rng_seed(4)
        full = torch.tensor([-particles(32).loss(conjugate_batch_plate, twin, x)
                             for _ in range(150)])
    z = (sub.mean() - full.mean()) / (sub.var() / len(sub) + full.var() / len(full)) ** 0.5
    assert abs(float(z)) < 4, (float(sub.mean()), float(full.mean()), float(z))


def test_fit_scales_a_plate_over_the_batch_without_bias():
    """fit's own N / B scaling of a plate over the batch (the guide's sites included): the
    per-datum losses of steps at a negligible learning rate average to the full-data one."""
    n, b = 40, 10
    x = torch.randn(n) * 1.1
    guide = widened(AmortizedAutoHVM(conjugate_batch_plate, hidden=(16,), aux_dim=3), x, 1.0)
    history = fit(conjugate_batch_plate, guide, x, steps=120, batch_size=b, optim=adam(1e-12),
                  elbo=particles(32), progress=False)
    sub = torch.tensor(history.loss)
    with torch.no_grad():
        full = torch.tensor([particles(32).loss(conjugate_batch_plate, guide, x) / n
                             for _ in range(120)])
    z = (sub.mean() - full.mean()) / (sub.var() / len(sub) + full.var() / len(full)) ** 0.5
    assert abs(float(z)) < 4, (float(sub.mean()), float(full.mean()), float(z))


# -- global latents, shapes ------------------------------------------------------------------
def test_global_latents_get_a_mean_field_part():
    n, b = 60, 15
    x = torch.randn(n) * 1.2 + 1.5

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("data", len(x), subsample_size=b) as ind:
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, SIGMA), obs=x[ind])

    guide = AmortizedAutoHVM(model, hidden=(32,))
    fit(model, guide, x, steps=200, batch_size=b, optim=adam(2e-2), elbo=particles(4),
        progress=False)
    # exact: x_i ~ N(mu, 1.25), mu ~ N(0, 4)
    precision = 1 / 4 + n / 1.25
    exact_mean = float(x.sum() / 1.25 / precision)
    draws = Predictive(model, guide=guide, num_samples=100)(x)
    assert draws["mu"].shape == (100, 1) and draws["z"].shape == (100, b)  # Pyro keeps a 1
    assert abs(float(draws["mu"].mean()) - exact_mean) < 4 * precision**-0.5, (
        float(draws["mu"].mean()), exact_mean)


def test_event_dims_nested_plates_constrained_sites_and_vectorized_particles():
    x = torch.randn(12)

    def model(x):
        with pyro.plate("data", len(x), dim=-2):
            w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
            with pyro.plate("inner", 2, dim=-1):
                s = pyro.sample("s", dist.Gamma(2.0, 2.0))
            mean = w.sum(-1) * s.sum(-1, keepdim=True)
            pyro.sample("x", dist.Normal(mean, 1.0), obs=x[:, None])

    guide = AmortizedAutoHVM(model, hidden=(8,), num_aux_samples=2)
    values = guide(x)
    assert values["w"].shape == (12, 1, 3) and values["s"].shape == (12, 2)
    assert bool((values["s"] > 0).all())
    assert guide.latent_dim == 5
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=2)
    svi = SVI(model, guide, adam(), elbo)
    losses = [svi.step(x) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize(
    "elbo",
    [
        lambda: pyro.infer.TraceGraph_ELBO(),
        lambda: pyro.infer.RenyiELBO(alpha=0.0, num_particles=3),
        lambda: pyro.infer.TraceEnum_ELBO(max_plate_nesting=1),
    ],
    ids=["tracegraph", "renyi", "traceenum"],
)
def test_other_pyro_elbos_train_it(elbo):
    model = conjugate_subsampled(5)
    guide = AmortizedAutoHVM(model, hidden=(8,), num_aux_samples=2)
    svi = SVI(model, guide, adam(), elbo())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TraceEnum: nothing to enumerate
        losses = [svi.step(torch.randn(10)) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)


# -- (e) refusals ----------------------------------------------------------------------------
def _no_plate(x):
    z = pyro.sample("z", dist.Normal(torch.zeros(len(x)), 1.0).to_event(1))
    pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def _nothing_local(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def _discrete_local(x):
    with pyro.plate("data", len(x)):
        k = pyro.sample("k", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(k, 1.0), obs=x)


def _outer_plate(x):
    with pyro.plate("groups", 2, dim=-2), pyro.plate("data", len(x), dim=-1):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def _no_per_datum_argument(n):
    with pyro.plate("data", n):
        pyro.sample("z", dist.Normal(0.0, 1.0))


@pytest.mark.parametrize(
    "model, args, match",
    [
        (_no_plate, (torch.randn(5),), "no plate named 'data'"),
        (_nothing_local, (torch.randn(5),), "no latent sample site inside plate 'data'"),
        (_discrete_local, (torch.randn(5),), "latent site 'k' is discrete"),
        (_outer_plate, (torch.randn(5),), r"'z' also lies in plate\(s\) \['groups'\]"),
        (_no_per_datum_argument, (5,), "pass input_fn"),
        (conjugate_batch_plate, (torch.tensor([0.0, float("nan")]),), "non-finite"),
    ],
    ids=["no-plate", "no-local", "discrete", "outer-plate", "no-input", "nan"],
)
def test_bad_models_are_refused(model, args, match):
    with pytest.raises(ValueError, match=match):
        AmortizedAutoHVM(model)(*args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_aux_samples=-1), "num_aux_samples"),
        (dict(noise_scale=0.0), "noise_scale"),
        (dict(component_scale=float("nan")), "component_scale"),
        (dict(num_components=0), "num_components"),
        (dict(data_plate=""), "data_plate"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AmortizedAutoHVM(conjugate_batch_plate, **kwargs)


def test_inputs_of_another_shape_are_refused_after_setup():
    guide = AmortizedAutoHVM(conjugate_subsampled(4))
    guide(torch.randn(10))
    with pytest.raises(ValueError, match="12 rows"):
        guide(torch.randn(12))


def test_input_fn_picks_the_encoder_inputs():
    x, covariate = torch.randn(8), torch.randn(8, 3)

    def model(x, covariate):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z + covariate.sum(-1), 1.0), obs=x)

    default = AmortizedAutoHVM(model)
    assert default(x, covariate)["z"].shape == (8,)
    assert default.input_dim == 4  # every per-datum tensor argument, flattened
    guide = AmortizedAutoHVM(model, input_fn=lambda x, covariate: covariate)
    guide(x, covariate)
    assert guide.input_dim == 3


# -- fit: the amortized guide at B < N, and the joint autoguides it replaces -----------------
def test_fit_trains_it_on_a_plate_over_the_batch_at_b_below_n():
    """fit refuses AutoNormal there (per-datum parameters); the amortized guide has none."""
    x = torch.randn(30)
    history = fit(conjugate_batch_plate, AmortizedAutoHVM(conjugate_batch_plate, hidden=(8,)),
                  x, steps=3, batch_size=10, progress=False)
    assert len(history.loss) == 3
    with pytest.raises(ValueError, match="per-datum parameters"):
        fit(conjugate_batch_plate, AutoNormal(conjugate_batch_plate), x, steps=1,
            batch_size=10, progress=False)


@pytest.mark.parametrize("guide_class", [AutoHVM, AutoDiagonalNormal])
def test_fit_refuses_joint_autoguides_over_a_subsampled_data_plate(guide_class):
    """Regression: an AutoContinuous guide's latent vector follows the batch's positions,
    not the data; fit used to train it silently."""
    model = conjugate_subsampled(5)
    with pytest.raises(ValueError, match="AmortizedAutoHVM"):
        fit(model, guide_class(model), torch.randn(20), steps=2, batch_size=5, progress=False)


def test_autohvm_refuses_latents_in_a_subsampled_plate():
    model = conjugate_subsampled(5)
    with pytest.raises(ValueError, match="subsampled plate 'data'"):
        AutoHVM(model)(torch.randn(20))
