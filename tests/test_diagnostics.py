"""Tests of lvmkit.inference.diagnostics: ArviZ export, PSIS k-hat, NUTS comparison."""

import math
import warnings

import matplotlib.image
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from lvmkit.inference.arviz_compat import group_names
from lvmkit.inference.diagnostics import (
    KhatResult,
    NutsComparison,
    compare_with_nuts,
    psis_khat,
    to_arviz,
)

# --------------------------------------------------------------------------- a tiny VAE/SBN

N_DATA, X_DIM, Z_DIM, B_DIM = 6, 4, 2, 3


class TinyLocal(nn.Module):
    """A VAE with one Gaussian and one Bernoulli (SBN-like) local latent."""

    def __init__(self):
        super().__init__()
        self.decoder = nn.Linear(Z_DIM + B_DIM, X_DIM)
        self.encoder = nn.Linear(X_DIM, 2 * Z_DIM + B_DIM)
        self.prior_logits = nn.Parameter(torch.tensor([0.3, -0.2, 0.1]))

    def model(self, x, labels=None):
        pyro.module("tiny", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], Z_DIM), 1.0).to_event(1))
            logits = self.prior_logits.expand(x.shape[0], B_DIM)
            b = pyro.sample("b", dist.Bernoulli(logits=logits).to_event(1))
            x_logits = self.decoder(torch.cat([z, b], -1))
            pyro.sample("x", dist.Bernoulli(logits=x_logits).to_event(1), obs=x)

    def encode(self, x):
        out = self.encoder(x)
        return out[..., :Z_DIM], out[..., Z_DIM : 2 * Z_DIM].exp(), out[..., 2 * Z_DIM :]

    def guide(self, x, labels=None):
        pyro.module("tiny", self)
        loc, scale, b_logits = self.encode(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))
            pyro.sample("b", dist.Bernoulli(logits=b_logits).to_event(1))


@pytest.fixture
def tiny():
    torch.manual_seed(1)
    net = TinyLocal()
    x = torch.bernoulli(torch.full((N_DATA, X_DIM), 0.4))
    return net, x


def test_to_arviz_local_latents_groups_dims_coords(tiny):
    net, x = tiny
    tree = to_arviz(net.model, net.guide, x, num_samples=7)
    assert {"posterior", "log_likelihood", "observed_data", "sample_stats"} <= group_names(tree)
    post = tree["posterior"]
    assert set(post.data_vars) == {"z", "b"}
    assert post["z"].dims == ("chain", "draw", "data", "z_dim_0")
    assert post["z"].shape == (1, 7, N_DATA, Z_DIM)
    assert post["b"].dims == ("chain", "draw", "data", "b_dim_0")
    assert set(np.unique(post["b"].values)) <= {0.0, 1.0}
    np.testing.assert_array_equal(post["data"].values, np.arange(N_DATA))
    assert tree["log_likelihood"]["x"].dims == ("chain", "draw", "data")
    assert tree["log_likelihood"]["x"].shape == (1, 7, N_DATA)
    assert tree["observed_data"]["x"].dims == ("data", "x_dim_0")
    np.testing.assert_array_equal(tree["observed_data"]["x"].values, x.numpy())
    assert tree["sample_stats"]["log_weight"].dims == ("chain", "draw")
    assert tree.attrs["vectorized_draws"] == 1


def test_to_arviz_log_likelihood_and_log_weight_by_hand(tiny):
    net, x = tiny
    tree = to_arviz(net.model, net.guide, x, num_samples=24)
    draw = 3
    z = torch.as_tensor(tree["posterior"]["z"].values[0, draw])
    b = torch.as_tensor(tree["posterior"]["b"].values[0, draw])
    with torch.no_grad():
        x_logits = net.decoder(torch.cat([z, b], -1))
        log_lik = dist.Bernoulli(logits=x_logits).log_prob(x).sum(-1)
        log_prior = (
            dist.Normal(0.0, 1.0).log_prob(z).sum()
            + dist.Bernoulli(logits=net.prior_logits).log_prob(b).sum()
        )
        loc, scale, b_logits = net.encode(x)
        log_q = (
            dist.Normal(loc, scale).log_prob(z).sum()
            + dist.Bernoulli(logits=b_logits).log_prob(b).sum()
        )
    np.testing.assert_allclose(
        tree["log_likelihood"]["x"].values[0, draw], log_lik.numpy(), rtol=1e-5, atol=1e-5
    )
    expected = float(log_lik.sum() + log_prior - log_q)
    assert tree["sample_stats"]["log_weight"].values[0, draw] == pytest.approx(expected, abs=1e-4)
    assert tree["sample_stats"]["lp"].values[0, draw] == pytest.approx(
        float(log_lik.sum() + log_prior), abs=1e-4
    )


def test_to_arviz_passes_labels_to_model_and_guide(tiny):
    net, x = tiny
    seen = []

    def model(x, labels=None):
        seen.append(labels)
        net.model(x)

    labels = torch.arange(N_DATA)
    to_arviz(model, net.guide, x, num_samples=3, labels=labels)
    assert seen and all(lab is labels for lab in seen)


# --------------------------------------------------------------------------- global latents

FEATURES = torch.tensor(
    [[1.0, 0.5], [-0.3, 1.2], [0.8, -1.0], [0.1, 0.2], [-1.5, 0.4], [0.6, 0.9], [1.1, -0.7]]
)
NOISE_SD = 0.5


def blr_model(x):
    """Bayesian linear regression of responses x on fixed FEATURES; vectorizes over draws."""
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    bias = pyro.sample("bias", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal((w * FEATURES).sum(-1) + bias, NOISE_SD), obs=x)


def blr_model_matmul(x):
    """Same model written with a matmul, which does not broadcast over a batch of draws."""
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    bias = pyro.sample("bias", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(FEATURES @ w + bias, NOISE_SD), obs=x)


def blr_guide(x):
    loc = pyro.param("w_loc", torch.tensor([0.2, -0.1]))
    pyro.sample("w", dist.Normal(loc, 0.3).to_event(1))
    pyro.sample("bias", dist.Normal(pyro.param("b_loc", torch.tensor(0.1)), 0.4))


def blr_log_weight(x, w, bias):
    log_p = (
        dist.Normal(0.0, 1.0).log_prob(w).sum()
        + dist.Normal(0.0, 1.0).log_prob(bias)
        + dist.Normal(FEATURES @ w + bias, NOISE_SD).log_prob(x).sum()
    )
    log_q = dist.Normal(torch.tensor([0.2, -0.1]), 0.3).log_prob(w).sum() + dist.Normal(
        0.1, 0.4
    ).log_prob(bias)
    return float(log_p - log_q)


@pytest.fixture
def responses():
    return torch.tensor([0.9, 0.4, -0.2, 0.3, -0.8, 1.0, 0.1])


@pytest.mark.parametrize("model", [blr_model, blr_model_matmul])
def test_to_arviz_global_latents(model, responses):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tree = to_arviz(model, blr_guide, responses, num_samples=9)
    post = tree["posterior"]
    assert post["w"].dims == ("chain", "draw", "w_dim_0")
    assert post["w"].shape == (1, 9, 2)
    assert post["bias"].dims == ("chain", "draw")
    assert "data" not in post.dims
    assert tree["log_likelihood"]["x"].dims == ("chain", "draw", "data")
    vectorizes = model is blr_model
    assert tree.attrs["vectorized_draws"] == int(vectorizes)
    assert any("drawing one at a time" in str(w.message) for w in caught) != vectorizes
    for draw in (0, 8):
        w = torch.as_tensor(post["w"].values[0, draw])
        bias = torch.as_tensor(post["bias"].values[0, draw])
        got = tree["sample_stats"]["log_weight"].values[0, draw]
        assert got == pytest.approx(blr_log_weight(responses, w, bias), abs=1e-4)


def test_to_arviz_vectorize_true_refuses_a_model_that_does_not_broadcast(responses):
    with pytest.raises(ValueError, match="does not vectorize"):
        to_arviz(blr_model_matmul, blr_guide, responses, num_samples=4, vectorize=True)


def test_to_arviz_detects_a_model_that_mixes_draws():
    """A factor that reduces with ``.sum()`` runs vectorized but adds up all the draws; the
    re-scoring of draw 0 catches it and the export falls back to a loop."""

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.factor("penalty", -(mu**2).sum())
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(0.5, 0.2))

    x = torch.tensor([0.3, 0.7, 1.1])
    with pytest.warns(UserWarning, match="drawing one at a time"):
        tree = to_arviz(model, guide, x, num_samples=6)
    mu = torch.as_tensor(tree["posterior"]["mu"].values[0])
    expected = (
        dist.Normal(0.0, 1.0).log_prob(mu)
        - mu**2
        + dist.Normal(mu[:, None], 1.0).log_prob(x).sum(-1)
        - dist.Normal(0.5, 0.2).log_prob(mu)
    )
    np.testing.assert_allclose(
        tree["sample_stats"]["log_weight"].values[0], expected.numpy(), rtol=1e-5, atol=1e-4
    )
    assert "penalty" not in tree["log_likelihood"]


def test_to_arviz_excludes_auxiliary_and_guide_factor_sites():
    """A hierarchical guide q(a) q(mu | a) with its reverse model r(a | mu) as a guide factor
    and an observed guide site: only the model's latent is exported, and log q includes
    log q(a) + log q(mu | a) - log r(a | mu) + the observed guide term."""
    recorded = []

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        a = pyro.sample("a", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True})
        recorded.append(a)
        mu = pyro.sample("mu", dist.Normal(0.4 + 0.3 * a, 0.5))
        pyro.factor("reverse", -dist.Normal(0.5 * mu, 0.8).log_prob(a), has_rsample=True)
        pyro.sample("a_check", dist.Normal(a, 1.0), obs=torch.tensor(0.2))

    x = torch.tensor([0.3, -0.4, 1.2, 0.8])
    num_samples = 8
    tree = to_arviz(model, guide, x, num_samples=num_samples)
    assert set(tree["posterior"].data_vars) == {"mu"}
    assert set(tree["log_likelihood"].data_vars) == {"x"}
    assert set(tree["observed_data"].data_vars) == {"x"}
    mu = torch.as_tensor(tree["posterior"]["mu"].values[0])
    # the vectorized pass is the one call that drew all the draws of a at once
    (a,) = [value.reshape(-1) for value in recorded if value.numel() == num_samples]
    log_p = dist.Normal(0.0, 2.0).log_prob(mu) + dist.Normal(mu[:, None], 1.0).log_prob(x).sum(-1)
    log_q = (
        dist.Normal(0.0, 1.0).log_prob(a)
        + dist.Normal(0.4 + 0.3 * a, 0.5).log_prob(mu)
        - dist.Normal(0.5 * mu, 0.8).log_prob(a)
        + dist.Normal(a, 1.0).log_prob(torch.tensor(0.2))
    )
    stats = tree["sample_stats"]
    np.testing.assert_allclose(stats["lp"].values[0], log_p.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(stats["log_q"].values[0], log_q.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        stats["log_weight"].values[0], (log_p - log_q).numpy(), rtol=1e-5, atol=1e-4
    )


def test_to_arviz_errors_name_the_problem(tiny):
    net, x = tiny
    with pytest.raises(ValueError, match="num_samples"):
        to_arviz(net.model, net.guide, x, num_samples=0)

    def guide_without_latents(x, labels=None):
        pyro.sample("unrelated", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"not sample the model's latent site\(s\) \['z', 'b'\]"):
        to_arviz(net.model, guide_without_latents, x, num_samples=2)


def test_a_model_enumerated_site_the_guide_lacks_is_drawn_from_its_prior():
    """A guide trained with TraceEnum_ELBO leaves out the sites the model enumerates: those
    are drawn from their prior (with a warning) and left out of the weights, which stay a
    valid importance weight for p(x), the enumerated site summed over by the sampling."""
    def model(x):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(loc + c, 1.0), obs=x)

    def guide(x):
        pyro.sample("loc", dist.Normal(0.3, 0.5))

    x = torch.tensor([0.1, 1.2, 0.7])
    with pytest.warns(UserWarning, match=r"model sites \['c'\] are not sampled by the guide"):
        tree = to_arviz(model, guide, x, num_samples=4)
    assert set(tree["posterior"].data_vars) == {"loc"}
    with pytest.raises(ValueError, match=r"latent site\(s\) \['loc'\]"):
        to_arviz(model, lambda x: None, x, num_samples=4)


# --------------------------------------------------------------------------- PSIS k-hat

PRIOR_SD = 2.0


def normal_model(x):
    mu = pyro.sample("mu", dist.Normal(torch.zeros(x.shape[-1]), PRIOR_SD).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(mu, 1.0).to_event(1), obs=x)


def exact_posterior(x):
    precision = 1.0 / PRIOR_SD**2 + x.shape[0]
    return x.sum(0) / precision, precision**-0.5


def scaled_posterior_guide(x_data, factor):
    loc, scale = exact_posterior(x_data)

    def guide(x):
        pyro.sample("mu", dist.Normal(loc, scale * factor).to_event(1))

    return guide


@pytest.fixture
def normal_data():
    torch.manual_seed(0)
    return torch.randn(20, 2) + 1.0


def test_khat_exact_posterior_is_good(normal_data):
    """Regression: the exact posterior as guide gives constant ratios; k-hat used to print
    as -inf. It is 0, flagged as constant weights, with a warning and a note."""
    with pytest.warns(UserWarning, match="constant up to rounding.*k-hat = 0"):
        result = psis_khat(
            normal_model, scaled_posterior_guide(normal_data, 1.0), normal_data, num_samples=500
        )
    assert isinstance(result, KhatResult)
    assert result.khat == 0.0 and result.verdict == "good"
    assert result.constant_weights
    assert "k-hat = 0.000 (good" in str(result) and "ratios are constant" in str(result)
    # q is the posterior, so every ratio is p(x): the weights are uniform.
    assert result.ess == pytest.approx(500, rel=1e-6)
    x = normal_data
    log_evidence = dist.MultivariateNormal(
        torch.zeros(20 * 2),
        (torch.eye(20 * 2) + PRIOR_SD**2 * torch.kron(torch.ones(20, 20), torch.eye(2))),
    ).log_prob(x.reshape(-1))
    assert result.log_evidence == pytest.approx(float(log_evidence), abs=1e-3)


def test_khat_slightly_wide_guide_is_good(normal_data):
    result = psis_khat(
        normal_model, scaled_posterior_guide(normal_data, 1.2), normal_data, num_samples=1000
    )
    assert math.isfinite(result.khat) and result.khat < 0.5
    assert result.verdict == "good"
    assert not result.constant_weights and "constant" not in str(result)
    assert np.exp(result.log_weights).sum() == pytest.approx(1.0, abs=1e-9)


def test_khat_far_too_narrow_guide_is_poor(normal_data):
    narrow = psis_khat(
        normal_model, scaled_posterior_guide(normal_data, 0.1), normal_data, num_samples=2000
    )
    assert narrow.khat > 0.7
    assert narrow.verdict == "poor"
    assert "poor" in str(narrow) and f"{narrow.khat:.3f}" in str(narrow)
    assert narrow.ess < 0.2 * narrow.num_samples


@pytest.mark.slow
def test_khat_narrow_guide_is_poor_for_most_seeds(normal_data):
    khats = []
    for seed in range(20):
        pyro.set_rng_seed(seed)
        khats.append(
            psis_khat(
                normal_model,
                scaled_posterior_guide(normal_data, 0.1),
                normal_data,
                num_samples=2000,
            ).khat
        )
    # The true k of a 0.1x too narrow Gaussian q is 1 - 0.1^2 = 0.99.
    assert np.median(khats) > 0.8
    assert np.mean(np.array(khats) > 0.7) >= 0.85


def test_khat_verdict_thresholds():
    ratios = np.zeros(10)
    assert KhatResult(0.3, ratios, ratios).verdict == "good"
    assert KhatResult(0.6, ratios, ratios).verdict == "ok"
    assert KhatResult(0.7, ratios, ratios).verdict == "poor"
    assert KhatResult(0.3, ratios, ratios).thresholds == (0.5, 0.7)
    assert not KhatResult(0.3, ratios, ratios).constant_weights


def test_khat_rejects_too_few_draws(normal_data):
    with pytest.raises(ValueError, match="at least 25 draws"):
        psis_khat(
            normal_model, scaled_posterior_guide(normal_data, 1.1), normal_data, num_samples=24
        )


# --------------------------------------------------------------------------- NUTS


def test_compare_with_nuts_matches_analytic_posterior(normal_data, tmp_path):
    x = normal_data[:8]
    loc, scale = exact_posterior(x)
    guide = scaled_posterior_guide(x, 1.0)
    path = tmp_path / "forest.png"
    result = compare_with_nuts(normal_model, guide, x, num_samples=120, warmup=80, plot_path=path)
    assert isinstance(result, NutsComparison)
    table = result.table
    assert list(table.index) == ["mu[0]", "mu[1]"]
    for i, row in enumerate(table.index):
        nuts, guide = table.loc[row, "nuts"], table.loc[row, "guide"]
        # The Monte Carlo standard error is ESS-based: sd / sqrt(ESS).
        assert nuts["mcse_mean"] == pytest.approx(nuts["sd"] / math.sqrt(nuts["ess_bulk"]), rel=0.5)
        # Means agree with the analytic posterior within 4 Monte Carlo standard errors.
        assert abs(nuts["mean"] - float(loc[i])) < 4 * nuts["mcse_mean"]
        assert abs(guide["mean"] - float(loc[i])) < 4 * guide["mcse_mean"]
        assert nuts["sd"] == pytest.approx(scale, rel=0.3)
        assert nuts["r_hat"] < 1.1 or math.isnan(nuts["r_hat"])
    assert result.khat.verdict == "good"
    assert result.nuts_posterior["posterior"]["mu"].dims == ("chain", "draw", "mu_dim_0")
    assert result.nuts_posterior["posterior"]["mu"].shape == (1, 120, 2)
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    assert "mu[0]" in str(result)


def test_compare_with_nuts_restores_rng_and_plots_with_matplotlib(normal_data, tmp_path):
    x = normal_data[:5]
    guide = scaled_posterior_guide(x, 1.5)
    pyro.set_rng_seed(11)
    expected_next = torch.rand(())
    pyro.set_rng_seed(11)
    path = tmp_path / "forest_mpl.png"
    result = compare_with_nuts(
        normal_model,
        guide,
        x,
        num_samples=30,
        warmup=20,
        num_chains=2,
        plot_path=path,
        plot_backend="matplotlib",
    )
    assert torch.rand(()) == expected_next
    assert result.nuts_posterior["posterior"]["mu"].shape == (2, 30, 2)
    assert matplotlib.image.imread(path).shape[:2] == (250, 600)  # 1.5 + 0.5 per row
    assert ("diff", "z") in result.table.columns
    with pytest.raises(ValueError, match="plot_backend"):
        compare_with_nuts(normal_model, guide, x, plot_backend="bokeh")


def test_to_arviz_with_lvmkit_vae_and_auxiliary_encoder():
    """The package's own hierarchical guide: auxiliary "a" and factor "a_reverse" stay out."""
    from lvmkit.guides.hierarchical import AuxiliaryEncoder
    from lvmkit.models.vae import VAE

    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((5, 6), 0.5))
    vae = VAE(6, 2, (4,))
    tree = to_arviz(vae, AuxiliaryEncoder(6, 2, 3, (4,)), x, num_samples=4)
    assert set(tree["posterior"].data_vars) == {"z"}
    assert tree["posterior"]["z"].dims == ("chain", "draw", "data", "z_dim_0")
    assert tree.attrs["vectorized_draws"] == 1
    assert np.isfinite(tree["sample_stats"]["log_weight"].values).all()


# --------------------------------------------------------------------------- common idioms
# Models written the way Pyro's tutorials write them: an observed site named "obs", the
# response passed positionally, pyro.deterministic inside the data plate, an autoguide.

REG_X = torch.linspace(-1.0, 1.0, 12)
REG_Y = 0.5 + 2.0 * REG_X + 0.3 * torch.sin(7.0 * REG_X)


def regression(x, y=None):
    a = pyro.sample("a", dist.Normal(0.0, 5.0))
    b = pyro.sample("b", dist.Normal(0.0, 5.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        mean = pyro.deterministic("mean", a + b * x)
        pyro.sample("obs", dist.Normal(mean, sigma), obs=y)


def regression_without_deterministic(x, y=None):
    a = pyro.sample("a", dist.Normal(0.0, 5.0))
    b = pyro.sample("b", dist.Normal(0.0, 5.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(a + b * x, sigma), obs=y)


def fitted_autonormal(model, *args, steps=150):
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal

    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(steps):
        svi.step(*args)
    return guide


@pytest.fixture(scope="module")
def regression_guide():
    """Trained once: an AutoNormal keeps its values in its module across the param store
    clears between tests."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    return fitted_autonormal(regression, REG_X, REG_Y)


def test_to_arviz_observed_site_named_obs_fills_log_likelihood(regression_guide):
    """Regression: the data dim used to be called "obs", so a site "obs" became its coordinate
    and log_likelihood / observed_data came out empty."""
    model = regression_without_deterministic  # the same latents as the guide's
    tree = to_arviz(model, regression_guide, REG_X, y=REG_Y, num_samples=40)
    assert set(tree["log_likelihood"].data_vars) == {"obs"}
    assert tree["log_likelihood"]["obs"].dims == ("chain", "draw", "data")
    assert tree["log_likelihood"]["obs"].shape == (1, 40, REG_X.shape[0])
    np.testing.assert_allclose(tree["observed_data"]["obs"].values, REG_Y.numpy())
    a = tree["posterior"]["a"].values[0, :, None]
    b = tree["posterior"]["b"].values[0, :, None]
    sigma = tree["posterior"]["sigma"].values[0, :, None]
    expected = dist.Normal(torch.as_tensor(a + b * REG_X.numpy()), torch.as_tensor(sigma))
    np.testing.assert_allclose(
        tree["log_likelihood"]["obs"].values[0],
        expected.log_prob(REG_Y).numpy(),
        rtol=1e-4,
        atol=1e-4,
    )


def test_to_arviz_data_dim_can_be_renamed_and_refuses_a_collision(regression_guide):
    tree = to_arviz(regression, regression_guide, REG_X, y=REG_Y, num_samples=5, data_dim="i")
    assert tree["log_likelihood"]["obs"].dims == ("chain", "draw", "i")
    assert tree["posterior"]["mean"].dims == ("chain", "draw", "i")
    for name in ("obs", "mean", "sigma"):
        with pytest.raises(ValueError, match=f"data_dim='{name}'.*site '{name}'"):
            to_arviz(regression, regression_guide, REG_X, y=REG_Y, num_samples=5, data_dim=name)
    with pytest.raises(ValueError, match="data_dim must be a non-empty string"):
        to_arviz(regression, regression_guide, REG_X, y=REG_Y, num_samples=5, data_dim="")


def test_to_arviz_data_dim_refuses_another_plates_name():
    def model(x):
        scale = pyro.sample("scale", dist.HalfNormal(1.0))
        groups = pyro.plate("groups", 2, dim=-2)
        with groups:
            offset = pyro.sample("offset", dist.Normal(0.0, 1.0))
        with groups, pyro.plate("data", x.shape[-1]):
            pyro.sample("x", dist.Normal(offset, scale), obs=x)

    def guide(x):
        pyro.sample("scale", dist.LogNormal(0.0, 0.3))
        with pyro.plate("groups", 2, dim=-2):
            pyro.sample("offset", dist.Normal(torch.zeros(2, 1), 1.0))

    x = torch.randn(2, 5)
    tree = to_arviz(model, guide, x, num_samples=6)
    assert tree["posterior"]["offset"].dims == ("chain", "draw", "groups")
    assert tree["log_likelihood"]["x"].dims == ("chain", "draw", "groups", "data")
    with pytest.raises(ValueError, match="data_dim='groups'.*plate 'groups'"):
        to_arviz(model, guide, x, num_samples=6, data_dim="groups")


def test_pyro_refuses_a_site_named_like_its_plate():
    """What makes the default data dim safe: Pyro records a plate as a site of its name."""

    def model():
        with pyro.plate("data", 3):
            pyro.sample("data", dist.Normal(0.0, 1.0))

    with pytest.raises(RuntimeError, match="Multiple sample sites named 'data'"):
        pyro.poutine.trace(model).get_trace()


def test_to_arviz_takes_model_arguments_positionally(regression_guide):
    """Regression: to_arviz(model, guide, X, y) used to take y for num_samples."""
    model = regression_without_deterministic
    pyro.set_rng_seed(3)
    positional = to_arviz(model, regression_guide, REG_X, REG_Y, num_samples=30)
    pyro.set_rng_seed(3)
    keyword = to_arviz(model, regression_guide, REG_X, y=REG_Y, num_samples=30)
    assert positional["posterior"]["a"].shape == (1, 30)
    np.testing.assert_allclose(positional["observed_data"]["obs"].values, REG_Y.numpy())
    for group, name in (("posterior", "a"), ("log_likelihood", "obs"), ("sample_stats", "lp")):
        np.testing.assert_array_equal(
            positional[group][name].values, keyword[group][name].values
        )


@pytest.mark.parametrize("vectorize", [None, False])
def test_to_arviz_deterministic_in_data_plate_gets_the_data_dim(regression_guide, vectorize):
    """Regression: pyro.deterministic without event_dim records the whole value as its
    event (Delta(value, event_dim=value.ndim)); inside the data plate that gave a
    coordinate-size error."""
    tree = to_arviz(
        regression, regression_guide, REG_X, y=REG_Y, num_samples=8, vectorize=vectorize
    )
    assert tree.attrs["vectorized_draws"] == int(vectorize is None)
    mean = tree["posterior"]["mean"]
    assert mean.dims == ("chain", "draw", "data")
    a = tree["posterior"]["a"].values[0, :, None]
    b = tree["posterior"]["b"].values[0, :, None]
    np.testing.assert_allclose(mean.values[0], a + b * REG_X.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vectorize", [None, False])
def test_to_arviz_deterministic_event_dims(vectorize):
    """Deterministics of every kind: per datum with an event vector, a global vector used
    inside the plate, a global outside, and an explicit event_dim, which is kept."""
    num_data, width = 5, 3

    def model(x):
        w = pyro.sample("w", dist.Normal(torch.zeros(width), 1.0).to_event(1))
        pyro.deterministic("w_norm", w.norm(dim=-1))
        with pyro.plate("data", num_data):
            pyro.deterministic("scaled", x * w)  # (N, width): per datum, an event vector each
            pyro.deterministic("w_twice", 2 * w)  # (width,): global, inside the plate
            pyro.deterministic("first", x[:, 0] * w[..., 0], event_dim=0)
            pyro.sample("x", dist.Normal(w, 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.sample("w", dist.Normal(torch.tensor([0.5, -0.5, 1.0]), 0.2).to_event(1))

    x = torch.randn(num_data, width)
    tree = to_arviz(model, guide, x, num_samples=6, vectorize=vectorize)
    post = tree["posterior"]
    w = post["w"].values[0]
    assert post["w_norm"].dims == ("chain", "draw")
    np.testing.assert_allclose(post["w_norm"].values[0], np.linalg.norm(w, axis=-1), rtol=1e-5)
    assert post["scaled"].dims == ("chain", "draw", "data", "scaled_dim_0")
    np.testing.assert_allclose(post["scaled"].values[0], x.numpy() * w[:, None], rtol=1e-5)
    assert post["w_twice"].dims == ("chain", "draw", "w_twice_dim_0")
    np.testing.assert_allclose(post["w_twice"].values[0], 2 * w, rtol=1e-5)
    assert post["first"].dims == ("chain", "draw", "data")
    np.testing.assert_allclose(post["first"].values[0], x[:, 0].numpy() * w[:, :1], rtol=1e-5)
    assert tree.attrs["vectorized_draws"] == int(vectorize is None)


# --------------------------------------------------------------------------- installed ArviZ


def test_installed_arviz_reads_the_export(regression_guide, tmp_path):
    """az.summary, a posterior plot and az.loo of the installed ArviZ on to_arviz's result:
    InferenceData on ArviZ 0.x, DataTree on 1.x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lvmkit.inference import arviz_compat

    az = arviz_compat.arviz()
    tree = to_arviz(regression, regression_guide, REG_X, REG_Y, num_samples=300)
    if arviz_compat.is_legacy(az):
        assert isinstance(tree, az.InferenceData)
    else:
        import xarray

        assert isinstance(tree, xarray.DataTree)
    summary = az.summary(tree, var_names=["a", "b", "sigma"])
    assert list(summary.index) == ["a", "b", "sigma"]
    for name in ("a", "b", "sigma"):
        draws = tree["posterior"][name].values
        assert summary.loc[name, "mean"] == pytest.approx(draws.mean(), abs=0.01)
        assert summary.loc[name, "sd"] == pytest.approx(draws.std(ddof=1), rel=0.02, abs=0.01)
    before = set(plt.get_fignums())
    if hasattr(az, "plot_posterior"):  # ArviZ 0.x
        az.plot_posterior(tree, var_names=["a", "mean"], coords={"data": [0, 5]})
    else:  # ArviZ 1.x: plot_dist is its posterior plot
        az.plot_dist(tree, var_names=["a", "mean"], coords={"data": [0, 5]})
    figures = set(plt.get_fignums()) - before
    assert len(figures) == 1
    figure = plt.figure(figures.pop())
    assert len(figure.axes) == 3  # a, mean[0], mean[5]
    figure.savefig(tmp_path / "posterior.png")
    plt.close(figure)
    assert matplotlib.image.imread(tmp_path / "posterior.png").shape[0] > 50
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a Pareto-k warning on a few points
        loo = az.loo(tree)
    assert int(loo["n_data_points"]) == REG_X.shape[0]
    assert int(loo["n_samples"]) == 300
    elpd = float(loo["elpd_loo"] if arviz_compat.is_legacy(az) else loo["elpd"])
    # elpd_loo is below the in-sample log predictive density sum_i log mean_s p(y_i | z_s),
    # by about the effective number of parameters (3 here).
    log_lik = tree["log_likelihood"]["obs"].values[0]
    lppd = np.sum(np.logaddexp.reduce(log_lik, axis=0) - np.log(log_lik.shape[0]))
    assert lppd - 10.0 < elpd < lppd


def test_to_arviz_deterministic_with_a_wrong_shape_names_the_site():
    def model(x, wrong):
        w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            if wrong == "event_dim":  # (N, 3) has event_dim 1
                pyro.deterministic("scaled", x * w, event_dim=0)
            else:  # a leading dim that no plate owns
                pyro.deterministic("scaled", (x * w)[None], event_dim=1)
            pyro.sample("x", dist.Normal(w, 1.0).to_event(1), obs=x)

    def guide(x, wrong):
        pyro.sample("w", dist.Normal(torch.zeros(3), 0.5).to_event(1))

    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="site scaled"):  # Pyro's own plate check
        to_arviz(model, guide, x, "event_dim", num_samples=3)
    with pytest.raises(ValueError, match="site 'scaled'.*extra batch dims.*event_dim="):
        to_arviz(model, guide, x, "extra", num_samples=3, vectorize=False)


def test_diagnostics_reexports_the_split_modules():
    """lvmkit.inference.diagnostics stays importable; the names live in their own modules."""
    import lvmkit.inference as inference
    from lvmkit.inference import arviz_export, diagnostics, nuts, psis

    assert diagnostics.to_arviz is arviz_export.to_arviz is inference.to_arviz
    assert diagnostics.psis_khat is psis.psis_khat is inference.psis_khat
    assert diagnostics.KhatResult is psis.KhatResult is inference.KhatResult
    assert diagnostics.compare_with_nuts is nuts.compare_with_nuts is inference.compare_with_nuts
    assert diagnostics.NutsComparison is nuts.NutsComparison is inference.NutsComparison
    for name in inference.__all__:  # the lazy table names only modules that define the name
        assert getattr(inference, name) is not None, name


# ------------------------------------------------------- regressions of the second review


def _normal_mean_pair(mask=None, subsample_size=None, site="y"):
    data = torch.tensor([0.3, -1.2, 0.8, 2.0])

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
            with pyro.poutine.mask(mask=True if mask is None else mask[idx]):
                pyro.sample(site, dist.Normal(mu, 1.0), obs=x[idx])

    def guide(x):
        pyro.sample("mu", dist.Normal(0.2, 0.5))

    return model, guide, data


def test_to_arviz_log_likelihood_leaves_masked_observations_out():
    """Masked observations (missing values filled with a placeholder) got a
    log-likelihood, so az.loo counted them as data; lp already left them out."""
    mask = torch.tensor([True, False, True, False])
    model, guide, data = _normal_mean_pair(mask)
    pyro.set_rng_seed(0)
    out = to_arviz(model, guide, data, num_samples=20)
    log_lik = torch.tensor(np.asarray(out["log_likelihood"]["y"].values[0]))
    mu = torch.tensor(np.asarray(out["posterior"]["mu"].values[0]))
    expected = dist.Normal(mu[:, None], 1.0).log_prob(data) * mask
    assert torch.allclose(log_lik, expected.to(log_lik.dtype), atol=1e-5)


@pytest.mark.parametrize("what", ["to_arviz", "log_likelihood"])
def test_subsampled_plates_are_refused_by_full_data_scoring(what):
    """Pyro's subsample_size idiom made every draw score another random subset (to_arviz)
    or crashed on a shape (log_likelihood); both refuse it, naming the plate."""
    from lvmkit.inference.evaluate import log_likelihood

    model, guide, data = _normal_mean_pair(subsample_size=2)
    with pytest.raises(ValueError, match="subsampled plate 'data'.*subsample_size 2 of 4"):
        if what == "to_arviz":
            to_arviz(model, guide, data, num_samples=5)
        else:
            log_likelihood(model, guide, data, num_samples=5)


def test_to_arviz_leaves_out_the_likelihood_of_models_with_enumerated_latents():
    """With an enumerated latent the guide leaves out, a draw of it from the prior made the
    log_likelihood group log p(x_i | z, c_i) (per datum about -16 where log p(x_i | z) is
    about -1); the group is left out, with a warning saying why."""
    from pyro.infer import config_enumerate

    x = torch.tensor([2.1, -1.9, 2.3, -2.2, 1.8])

    @config_enumerate
    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 3.0))
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(z * (2 * c - 1), 0.5), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(2.0, 0.1))

    pyro.set_rng_seed(0)
    with pytest.warns(UserWarning, match="log_likelihood group is left out"):
        out = to_arviz(model, guide, x, num_samples=20)
    assert "log_likelihood" not in group_names(out)
    assert "posterior" in group_names(out)


def test_to_arviz_refuses_a_site_named_like_a_sample_stat():
    model, guide, data = _normal_mean_pair(site="lp")
    with pytest.raises(ValueError, match=r"site\(s\) \['lp'\].*rename"):
        to_arviz(model, guide, data, num_samples=5)
