import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from lvmkit.data import Dataset
from lvmkit.inference.evaluate import elbo_per_datum, log_likelihood, log_weights

LATENT, DIM = 3, 6


def sbn_params():
    g = torch.Generator().manual_seed(3)
    return {
        "prior": torch.randn(LATENT, generator=g),
        "weight": 2 * torch.randn(LATENT, DIM, generator=g),
        "bias": torch.randn(DIM, generator=g),
    }


def sbn_model(x, labels=None):
    p = sbn_params()
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Bernoulli(logits=p["prior"]).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=z @ p["weight"] + p["bias"]).to_event(1), obs=x)


def sbn_model_pixel_plate(x, labels=None):
    """Same joint density, pixels in a nested plate instead of an event dim."""
    p = sbn_params()
    with pyro.plate("data", x.shape[0], dim=-2):
        z = pyro.sample("z", dist.Bernoulli(logits=p["prior"]).to_event(1))
        logits = (z @ p["weight"]).squeeze(-2)
        with pyro.plate("pixels", DIM, dim=-1):
            pyro.sample("x", dist.Bernoulli(logits=logits + p["bias"]), obs=x)


def configurations():
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=LATENT)))


def log_joint_all_configs(x):
    """log p(z, x) for every configuration z, shape (2^LATENT, N)."""
    p = sbn_params()
    configs = configurations()
    log_prior = dist.Bernoulli(logits=p["prior"]).log_prob(configs).sum(-1)
    logits = configs @ p["weight"] + p["bias"]
    log_lik = dist.Bernoulli(logits=logits.unsqueeze(1)).log_prob(x).sum(-1)
    return log_prior.unsqueeze(1) + log_lik


def marginal_logits(x):
    """Logits of the exact posterior marginals p(z_j = 1 | x), shrunk by 0.6: a deliberately
    imperfect mean-field guide (ELBO gap ~0.2 nats) with well-behaved importance weights."""
    posterior = torch.softmax(log_joint_all_configs(x), 0)  # (configs, N)
    marginals = (posterior.unsqueeze(-1) * configurations().unsqueeze(1)).sum(0)
    return 0.6 * torch.logit(marginals.clamp(1e-6, 1 - 1e-6))


def sbn_guide(x, labels=None):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Bernoulli(logits=marginal_logits(x)).to_event(1))


def sbn_guide_pixel_plate(x, labels=None):
    with pyro.plate("data", x.shape[0], dim=-2):
        logits = marginal_logits(x).unsqueeze(-2)
        pyro.sample("z", dist.Bernoulli(logits=logits).to_event(1))


def exact_log_px(x):
    """log sum_z p(z) p(x | z) over all 2^LATENT configurations."""
    return torch.logsumexp(log_joint_all_configs(x), 0)


@pytest.fixture(scope="module")
def sbn_data():
    g = torch.Generator().manual_seed(0)
    return torch.bernoulli(torch.full((5, DIM), 0.5), generator=g)


def standard_error(log_w):
    """Delta-method standard error of log mean(w), per datum."""
    w = (log_w - log_w.max(0).values).exp()
    return w.std(0) / (w.mean(0) * math.sqrt(log_w.shape[0]))


def test_iwae_estimate_approaches_exact_log_likelihood(sbn_data):
    exact = exact_log_px(sbn_data)
    log_w = log_weights(sbn_model, sbn_guide, sbn_data, num_samples=1000)
    assert log_w.shape == (1000, 5)
    se = standard_error(log_w)
    pyro.set_rng_seed(1)
    estimate = log_likelihood(sbn_model, sbn_guide, sbn_data, num_samples=1000)
    assert estimate.shape == (5,)
    assert torch.all(estimate <= exact + 3 * se)
    assert torch.allclose(estimate, exact, atol=0.05)
    elbo = elbo_per_datum(sbn_model, sbn_guide, sbn_data, num_samples=2000)
    assert torch.all(elbo < estimate)
    gap_1 = (exact - elbo).mean()  # E[L_1] = ELBO
    gap_1000 = (exact - estimate).abs().mean()
    assert gap_1 > 0.1 and gap_1000 < gap_1 / 5
    pyro.set_rng_seed(2)
    single = log_likelihood(sbn_model, sbn_guide, sbn_data, num_samples=1)
    assert torch.all(torch.isfinite(single)) and not torch.allclose(single, estimate, atol=0.05)


def test_log_weights_are_log_p_minus_log_q(sbn_data):
    pyro.set_rng_seed(4)
    guide_trace = pyro.poutine.trace(sbn_guide).get_trace(sbn_data)
    z = guide_trace.nodes["z"]["value"]
    p = sbn_params()
    expected = (dist.Bernoulli(logits=p["prior"]).log_prob(z).sum(-1)
                + dist.Bernoulli(logits=z @ p["weight"] + p["bias"]).log_prob(sbn_data).sum(-1)
                - dist.Bernoulli(logits=marginal_logits(sbn_data)).log_prob(z).sum(-1))
    pyro.set_rng_seed(4)
    # chunk_size=1 draws one particle the same way the guide trace above did.
    got = log_weights(sbn_model, sbn_guide, sbn_data, num_samples=1, chunk_size=1)
    assert torch.allclose(got[0], expected, atol=1e-5)


def test_chunked_equals_unchunked_statistically(sbn_data):
    pyro.set_rng_seed(5)
    whole = log_weights(sbn_model, sbn_guide, sbn_data, num_samples=1000, chunk_size=1000)
    pyro.set_rng_seed(6)
    chunked = log_likelihood(sbn_model, sbn_guide, sbn_data, num_samples=1000, chunk_size=37)
    reference = torch.logsumexp(whole, 0) - math.log(1000)
    assert torch.all((chunked - reference).abs() < 4 * standard_error(whole) * math.sqrt(2))


def test_nested_plates_reduce_to_the_same_weights(sbn_data):
    pyro.set_rng_seed(7)
    flat = log_weights(sbn_model, sbn_guide, sbn_data, num_samples=20, chunk_size=8)
    pyro.set_rng_seed(7)
    nested = log_weights(sbn_model_pixel_plate, sbn_guide_pixel_plate, sbn_data, num_samples=20,
                         chunk_size=8)
    assert nested.shape == (20, 5)
    assert torch.allclose(flat, nested, atol=1e-5)


def test_guide_factor_and_auxiliary_sites_count_in_log_q(sbn_data):
    shift = torch.arange(5.0)

    def guide_with_reverse_term(x, labels=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=marginal_logits(x)).to_event(1))
            pyro.factor("log_r", shift)  # -log r(a|x,z) would sit here

    pyro.set_rng_seed(8)
    base = log_likelihood(sbn_model, sbn_guide, sbn_data, num_samples=50)
    pyro.set_rng_seed(8)
    shifted = log_likelihood(sbn_model, guide_with_reverse_term, sbn_data, num_samples=50)
    assert torch.allclose(shifted, base - shift, atol=1e-5)

    def guide_with_auxiliary(x, labels=None):
        with pyro.plate("data", x.shape[0]):
            a = pyro.sample("a", dist.Normal(0.0, 1.0))
            # The guide carries -log r(a | x, z); log q subtracts it, so log w gains +log r.
            pyro.factor("neg_log_r", -dist.Normal(0.0, 1.0).log_prob(a))
            pyro.sample("z", dist.Bernoulli(logits=marginal_logits(x)).to_event(1))

    # q(a) cancels against r(a) = N(0, 1): log p(x) is recovered.
    pyro.set_rng_seed(9)
    aux = log_likelihood(sbn_model, guide_with_auxiliary, sbn_data, num_samples=500)
    assert torch.allclose(aux, exact_log_px(sbn_data), atol=0.1)


class GaussianVAE(pyro.nn.PyroModule):
    def __init__(self):
        super().__init__()
        self.decoder = torch.nn.Linear(2, DIM)
        self.encoder = torch.nn.Linear(DIM, 4)
        # q(z|x) = p(z) and a weak decoder keep the importance weights well behaved, so
        # independent estimates can be compared with a tight tolerance.
        with torch.no_grad():
            self.decoder.weight.mul_(0.3)
            self.encoder.weight.zero_()
            self.encoder.bias.zero_()

    def model(self, x, labels=None):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 0.5).to_event(1), obs=x)

    def guide(self, x, labels=None):
        pyro.module("encoder", self.encoder)
        loc, log_scale = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def test_gaussian_vae_minibatches_and_chunks():
    torch.manual_seed(0)
    vae = GaussianVAE()
    x = torch.randn(7, DIM)
    pyro.set_rng_seed(10)
    one_batch = log_likelihood(vae.model, vae.guide, x, num_samples=400, chunk_size=400,
                               batch_size=7)
    pyro.set_rng_seed(11)
    batched = log_likelihood(vae.model, vae.guide, x, num_samples=400, chunk_size=64,
                             batch_size=3, progress=True)
    assert batched.shape == (7,) and torch.all(torch.isfinite(batched))
    assert torch.allclose(one_batch, batched, atol=0.3)
    assert torch.all(batched >= elbo_per_datum(vae.model, vae.guide, x, num_samples=400) - 0.05)


def test_dataset_and_labels_are_passed():
    seen = []

    def model(x, labels=None):
        seen.append(labels)
        sbn_model(x)

    ds = Dataset(x=torch.full((4, DIM), 0.5), y=torch.arange(4), name="toy",
                 image_shape=(DIM,), binarize="dynamic")
    result = log_likelihood(model, sbn_guide, ds, num_samples=10, labels=True, batch_size=2)
    assert result.shape == (4,) and torch.all(torch.isfinite(result))
    assert torch.equal(seen[-1], torch.tensor([2, 3]))


def test_model_without_data_plate_is_refused(sbn_data):
    def no_plate_model(x, labels=None):
        pyro.sample("x", dist.Bernoulli(logits=torch.zeros(DIM)).to_event(1), obs=x[0])

    with pytest.raises(ValueError, match=r"no pyro.plate\('data', ...\)"):
        log_likelihood(no_plate_model, lambda x: None, sbn_data, num_samples=2)


def test_global_latent_is_refused(sbn_data):
    def global_model(x, labels=None):
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            logits = shift.unsqueeze(-1) * torch.ones(DIM)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def global_guide(x, labels=None):
        pyro.sample("shift", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="site 'shift' is outside"):
        log_likelihood(global_model, global_guide, sbn_data, num_samples=2)


@pytest.mark.parametrize("name", ["num_samples", "chunk_size", "batch_size"])
def test_bad_counts(sbn_data, name):
    with pytest.raises(ValueError, match=f"{name} must be a positive int"):
        log_likelihood(sbn_model, sbn_guide, sbn_data, **{name: 0})


def _with(data, index, value):
    data = data.clone()
    data[index] = value
    return data


@pytest.mark.parametrize("name, value", [
    ("num_samples", True), ("num_samples", -1), ("num_samples", 2.0), ("num_samples", "10"),
    ("chunk_size", 1.5), ("chunk_size", None), ("batch_size", False),
])
def test_bad_count_types(sbn_data, name, value):
    with pytest.raises(ValueError, match=f"{name} must be a positive int, got {value!r}"):
        log_likelihood(sbn_model, sbn_guide, sbn_data, **{name: value})


def test_numpy_integer_counts_are_counts(sbn_data):
    import numpy as np

    pyro.set_rng_seed(0)
    a = log_likelihood(sbn_model, sbn_guide, sbn_data, num_samples=np.int64(7))
    pyro.set_rng_seed(0)
    b = log_likelihood(sbn_model, sbn_guide, sbn_data, num_samples=7)
    assert torch.equal(a, b)


BAD_DATA = [  # {name}: the argument, "data" (or "x" for log_weights)
    ("nan", lambda x: _with(x, (1, 2), math.nan), ValueError,
     r"{name} has a non-finite value nan at index \[1, 2\]"),
    ("inf", lambda x: _with(x, (0, 0), -math.inf), ValueError,
     "{name} has a non-finite value -inf"),
    ("empty", lambda x: x[:0], ValueError, r"{name} is empty \(shape \(0, 6\)\)"),
    ("scalar", lambda x: x[0, 0], ValueError, r"{name} is empty \(shape \(\)\)"),
    ("bool", lambda x: x.bool(), TypeError, "{name} has dtype torch.bool"),
    ("complex", lambda x: x.to(torch.complex64), TypeError, "{name} has dtype torch.complex64"),
    ("numpy", lambda x: x.numpy(), TypeError, "{name} must be a torch.Tensor"),
    ("one datum, no batch dim", lambda x: x[0], ValueError,
     r"site 'x': observed value of shape \(6,\) has no dimension of size 6"),
    # the model's own error (ValueError from Pyro's validation, RuntimeError from torch
    # without it), with the data's shape and dtype added
    ("wrong width", lambda x: torch.zeros(5, DIM + 1), (ValueError, RuntimeError),
     r"data of shape \(5, 7\) and dtype torch.float32 failed"),
    ("integer pixels", lambda x: x.long(), RuntimeError,
     r"data of shape \(5, 6\) and dtype torch.int64 failed"),
]


@pytest.mark.parametrize("make, error, match", [case[1:] for case in BAD_DATA],
                         ids=[case[0] for case in BAD_DATA])
@pytest.mark.parametrize("fn", [log_likelihood, elbo_per_datum, log_weights])
@pytest.mark.parametrize("validate", [True, False])
def test_bad_data_is_refused_naming_it(sbn_data, fn, make, error, match, validate):
    data = make(sbn_data)
    match = match.format(name="x" if fn is log_weights else "data")
    # with validation off the checks must not lean on Pyro's support checks
    with pytest.raises(error, match=match), pyro.validation_enabled(validate):
        fn(sbn_model, sbn_guide, data, num_samples=3)


def test_non_finite_values_in_a_dataset_are_refused():
    x = torch.full((4, DIM), 0.5)
    x[2, 1] = math.nan
    ds = Dataset(x=x, y=torch.arange(4), name="toy", image_shape=(DIM,), binarize=None)
    with pytest.raises(ValueError, match=r"data\.x has a non-finite value nan at index \[2, 1\]"):
        log_likelihood(sbn_model, sbn_guide, ds, num_samples=2)


@pytest.mark.parametrize("labels, match", [
    (torch.arange(3), r"5 labels \(one per datum\), got \(3,\)"),
    ([0, 1, 0, 1, 0], "got list"),
    (torch.tensor(1), r"got \(\)"),
])
def test_bad_labels(sbn_data, labels, match):
    with pytest.raises(ValueError, match=match):
        log_likelihood(sbn_model, sbn_guide, sbn_data, num_samples=2, labels=labels)
    with pytest.raises(ValueError, match=match):
        log_weights(sbn_model, sbn_guide, sbn_data, num_samples=2, labels=labels)


@pytest.mark.parametrize("which", ["model", "guide"])
def test_model_and_guide_must_be_callable(sbn_data, which):
    pair = {"model": sbn_model, "guide": sbn_guide, which: None}
    with pytest.raises(TypeError, match=f"{which} must be a callable Pyro program"):
        log_likelihood(pair["model"], pair["guide"], sbn_data, num_samples=2)


def test_scalar_observations_in_the_data_plate_still_work():
    """A model in the Pyro tutorials' shape: one real number per datum, data of shape (N,)."""
    x = torch.tensor([0.3, -1.2, 2.0, 0.5])

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2, 0.5 ** 0.5))  # the exact posterior

    exact = dist.Normal(0.0, 2.0 ** 0.5).log_prob(x)
    assert torch.allclose(log_likelihood(model, guide, x, num_samples=2), exact, atol=1e-5)


@pytest.mark.parametrize("mask", [False, True])
def test_bool_masks_are_honoured(mask):
    """Regression: ``poutine.mask(mask=False)`` (Pyro takes a bool as well as a tensor)
    crashed ``torch.where``. With the exact posterior as the guide, a guide factor masked
    out leaves the exact log-likelihood; unmasked it shifts every datum by its value."""
    import pyro.poutine as poutine

    s = 0.7
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
            pyro.sample("x", dist.Normal(z, s).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / (1 + s**2),
                                         math.sqrt(s**2 / (1 + s**2))).to_event(1))
            with poutine.mask(mask=mask):
                pyro.factor("aux", torch.full((x.shape[0],), 5.0), has_rsample=True)

    exact = dist.Normal(0.0, math.sqrt(1 + s**2)).log_prob(x).sum(-1)
    got = log_likelihood(model, guide, x, num_samples=4)
    expected = exact - (5.0 if mask else 0.0)
    assert torch.allclose(got, expected, atol=1e-4)
