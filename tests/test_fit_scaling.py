"""fit on models written the plain Pyro way: mini-batch scaling of global and local sites,
per-datum latents, the data plate, guides that lack a site, saturated logits (issue 10)."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal

from lvmkit.data import Dataset
from lvmkit.inference.training import SaturatedLogitsWarning, fit


def decaying_adam(lr):
    return pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.995})


# -- 1. global latents: the prior and the guide entropy count once -------------------------
def normal_mean_model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)


@pytest.mark.parametrize("batch_size", [1000, 100])
def test_global_posterior_sd_is_the_full_data_posterior(batch_size):
    """mu ~ N(0, 10), x_i ~ N(mu, 1), N = 1000: the posterior sd is 1 / sqrt(N + 1/100) =
    0.0316 whatever the batch size. Scaling the whole model by N / B gave 0.10 at B = 100
    (the posterior of one batch, about 1/sqrt(B))."""
    n = 1000
    x = 1.5 + torch.randn(n, generator=torch.Generator().manual_seed(0))
    guide = AutoNormal(normal_mean_model)
    fit(normal_mean_model, guide, x, steps=600, batch_size=batch_size,
        optim=decaying_adam(0.05), progress=False)
    exact_sd = 1 / math.sqrt(n + 1 / 100)
    exact_mean = float(x.sum()) / (n + 1 / 100)
    assert pyro.param("AutoNormal.scales.mu").item() == pytest.approx(exact_sd, rel=0.2)
    assert pyro.param("AutoNormal.locs.mu").item() == pytest.approx(exact_mean, abs=0.03)


class RecordingELBO(Trace_ELBO):
    """Keeps the traces of the last step, to read the scales fit gave each site."""

    def _get_trace(self, model, guide, args, kwargs):
        self.traces = super()._get_trace(model, guide, args, kwargs)
        return self.traces


def local_and_global_model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("obs", dist.Normal(z, 1.0), obs=x)
    pyro.factor("penalty", -mu**2)


def local_and_global_guide(x):
    pyro.sample("mu", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x, 1.0))


def subsampling_model(x):
    """Pyro's own idiom: the model takes the whole data and indexes it."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x), subsample_size=10) as ind:
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("obs", dist.Normal(z, 1.0), obs=x[ind])


def subsampling_guide(x):
    pyro.sample("mu", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))
    with pyro.plate("data", len(x), subsample_size=10) as ind:
        pyro.sample("z", dist.Normal(x[ind], 1.0))


@pytest.mark.parametrize("pair", [(local_and_global_model, local_and_global_guide),
                                  (subsampling_model, subsampling_guide)],
                         ids=["plain", "pyro-subsampling"])
def test_only_data_plate_sites_are_scaled_in_model_and_guide(pair):
    model, guide = pair
    elbo = RecordingELBO()
    fit(model, guide, torch.randn(40), elbo=elbo, steps=1, batch_size=10, progress=False)
    model_trace, guide_trace = elbo.traces
    scales = {name: float(site["scale"]) for name, site in model_trace.nodes.items()
              if site["type"] == "sample"}
    assert scales["mu"] == 1.0 and scales["z"] == 4.0 and scales["obs"] == 4.0
    if "penalty" in scales:
        assert scales["penalty"] == 1.0
    assert float(guide_trace.nodes["mu"]["scale"]) == 1.0
    assert float(guide_trace.nodes["z"]["scale"]) == 4.0  # local entropies, once (not 16)


# -- 2. local latents: datum i stays at plate position i -----------------------------------
N_LOCAL = 40


def local_data():
    return 2 * torch.randn(N_LOCAL, generator=torch.Generator().manual_seed(0))


def local_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(z, 0.5), obs=x)


def test_per_datum_latents_at_full_batch():
    """z_i ~ N(0, 1), x_i ~ N(z_i, 0.5): the posterior mean is 0.8 x_i. Shuffling the rows
    every step gave a max error of 3.3; plain SVI gets < 0.1."""
    x = local_data()
    fit(local_model, AutoNormal(local_model), x, steps=300, batch_size=N_LOCAL,
        optim=decaying_adam(0.1), progress=False)
    error = (pyro.param("AutoNormal.locs.z").detach() - 0.8 * x).abs().max().item()
    assert error < 0.2


def subsampled_local_model(x, batch_size=10):
    with pyro.plate("data", len(x), subsample_size=batch_size) as ind:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(z, 0.5), obs=x[ind])


def declared_local_model(x):
    """The full size declared, the batch passed; fit fixes the indices to the batch."""
    with pyro.plate("data", N_LOCAL, subsample=torch.arange(len(x))):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(z, 0.5), obs=x)


@pytest.mark.parametrize("model", [subsampled_local_model, declared_local_model],
                         ids=["subsample_size", "declared-size"])
def test_per_datum_latents_at_small_batch(model):
    x = local_data()
    fit(model, AutoNormal(model), x, steps=600, batch_size=10, optim=decaying_adam(0.1),
        progress=False)
    locs = pyro.param("AutoNormal.locs.z").detach()
    assert locs.shape == (N_LOCAL,)
    assert (locs - 0.8 * x).abs().max().item() < 0.3


def test_per_datum_autoguide_over_a_batch_plate_is_refused():
    calls = []

    def model(x):
        calls.append(len(x))
        local_model(x)

    with pytest.raises(ValueError, match=r"AutoNormal keeps per-datum parameters for site\(s\) "
                                         r"\['z'\].*subsample_size=10\) as ind"):
        fit(model, AutoNormal(model), local_data(), steps=5, batch_size=10, progress=False)
    assert len(calls) <= 2  # the first trace and the guide's prototype, no step


def schools_data(j=24):
    g = torch.Generator().manual_seed(0)
    sigma = 3 + 3 * torch.rand(j, generator=g)
    y = 5 + 10 * torch.randn(j, generator=g) + sigma * torch.randn(j, generator=g)
    return y, sigma


def make_schools(sigma, subsample_size):
    """Eight schools (Rubin 1981), non-centred, with 24 synthetic schools."""

    def schools(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        tau = pyro.sample("tau", dist.HalfCauchy(10.0))
        with pyro.plate("data", len(y), subsample_size=subsample_size) as ind:
            eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(mu + tau * eta, sigma[ind]), obs=y[ind])

    return schools


def test_schools_at_small_batch_match_full_batch_svi():
    y, sigma = schools_data()
    steps = 600

    def locs():
        return torch.cat([pyro.param("AutoNormal.locs.mu").detach().view(1) / 10,
                          pyro.param("AutoNormal.locs.eta").detach()])

    full = make_schools(sigma, None)
    svi = SVI(full, AutoNormal(full), decaying_adam(0.05), Trace_ELBO())
    for _ in range(steps):
        svi.step(y)
    reference = locs()
    pyro.clear_param_store()
    batched = make_schools(sigma, 6)
    fit(batched, AutoNormal(batched), y, steps=steps, batch_size=6,
        optim=decaying_adam(0.05), progress=False)
    assert reference.std() > 0.5  # the schools differ: a mix-up would show
    assert (locs() - reference).abs().max().item() < 0.4


def test_subsampling_model_gets_whole_data_and_labels_with_fresh_pixels():
    seen = []

    def model(x, labels=None):
        with pyro.plate("data", len(x), subsample_size=4) as ind:
            seen.append((x.shape[0], labels.shape[0], ind.clone(), x[ind].clone(),
                         labels[ind].clone()))
            pyro.sample("x", dist.Bernoulli(logits=torch.zeros(3)).to_event(1), obs=x[ind])

    grey = torch.full((12, 3), 0.5)
    ds = Dataset(x=grey, y=torch.arange(12), name="toy", image_shape=(3,), binarize="dynamic")
    fit(model, lambda x, labels=None: None, ds, steps=3, batch_size=4, labels=True,
        progress=False)
    steps = seen[1:]  # seen[0]: the first trace
    assert all(rows == 12 and nlabels == 12 for rows, nlabels, *_ in steps)
    assert all(set(xb.unique().tolist()) <= {0.0, 1.0} for *_, xb, _ in steps)
    # the batch's labels are the labels of the batch's rows: one epoch, each datum once
    assert sorted(torch.cat([ind for _, _, ind, _, _ in steps]).tolist()) == list(range(12))
    assert all(torch.equal(ind, yb) for _, _, ind, _, yb in steps)


def test_subsample_size_must_equal_batch_size():
    with pytest.raises(ValueError, match="subsample_size=10, but fit's batch_size is 8"):
        fit(subsampled_local_model, AutoNormal(subsampled_local_model), local_data(),
            steps=1, batch_size=8, progress=False)


def test_declared_size_must_be_the_data_size():
    def model(x):
        with pyro.plate("data", 1000, subsample=torch.arange(len(x))):
            pyro.sample("obs", dist.Normal(0.0, 1.0), obs=x)

    with pytest.raises(ValueError, match="declares size 1000, but the data has N=40"):
        fit(model, lambda x: None, local_data(), steps=1, batch_size=8, progress=False)


# -- the data plate -------------------------------------------------------------------------
def location_model(plate_name):
    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate(plate_name, x.shape[0]):
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=x)

    return model


def test_data_plate_of_another_name_is_found_by_size():
    # One SGD step from loc = 0 on x = 1: loc moves by lr * N when the batch is scaled.
    fit(location_model("rows"), lambda x: None, torch.ones(40), steps=1, batch_size=8,
        optim=pyro.optim.SGD({"lr": 1e-3}), progress=False)
    assert pyro.param("loc").item() == pytest.approx(1e-3 * 40, rel=1e-5)


def test_data_plate_argument():
    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("rows", x.shape[0]):
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=x)
        with pyro.plate("copies", x.shape[0]):  # the same size: ambiguous
            pyro.sample("obs2", dist.Normal(loc, 1.0), obs=x)

    with pytest.raises(ValueError, match=r"several plates of size 8.*\['copies', 'rows'\]"
                                         r".*data_plate"):
        fit(model, lambda x: None, torch.ones(40), steps=1, batch_size=8, progress=False)
    with pytest.raises(ValueError, match=r"data_plate='row': the model has no such plate"):
        fit(model, lambda x: None, torch.ones(40), steps=1, batch_size=8, data_plate="row",
            progress=False)
    pyro.clear_param_store()
    fit(model, lambda x: None, torch.ones(40), steps=1, batch_size=8, data_plate="rows",
        optim=pyro.optim.SGD({"lr": 1e-3}), progress=False)
    # "rows" scaled by 5, "copies" counted once: 1e-3 * (5 * 8 + 8)
    assert pyro.param("loc").item() == pytest.approx(1e-3 * 48, rel=1e-5)


def test_no_data_plate_at_small_batch_is_refused():
    def model(x):
        pyro.sample("obs", dist.Normal(0.0, 1.0).expand([len(x)]).to_event(1), obs=x)

    with pytest.raises(ValueError, match="must know which sites are per datum"):
        fit(model, lambda x: None, torch.ones(40), steps=1, batch_size=8, progress=False)
    fit(model, lambda x: None, torch.ones(40), steps=1, batch_size=40, progress=False)


# -- 5. a guide without a model site ----------------------------------------------------------
def test_guide_missing_a_latent_site_is_one_error_before_the_first_step():
    calls = []

    def model(x):
        calls.append(1)
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pyro's own warning must not appear either
        with pytest.raises(ValueError, match=r"model's latent sample site\(s\) \['z'\]"):
            fit(model, guide, torch.ones(20), steps=20, batch_size=10, progress=False)
    assert len(calls) == 1  # the first trace only


def test_model_enumerated_and_subsample_sites_need_no_guide_site():
    def model(x):
        with pyro.plate("data", len(x), subsample_size=5) as ind:
            c = pyro.sample("c", dist.Bernoulli(0.3), infer={"enumerate": "parallel"})
            pyro.sample("obs", dist.Normal(3 * c, 1.0), obs=x[ind])

    history = fit(model, lambda x: None, torch.randn(20), elbo=TraceEnum_ELBO(max_plate_nesting=1),
                  steps=3, batch_size=5, progress=False)
    assert len(history) == 3


# -- 7. saturated guide logits ------------------------------------------------------------------
def bernoulli_pair(init_logit):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            b = pyro.sample("b", dist.Bernoulli(logits=torch.zeros(3)).to_event(1))
            pyro.sample("obs", dist.Normal(b.sum(-1), 1.0), obs=x)

    def guide(x):
        logits = pyro.param("logits", torch.full((3,), init_logit))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("b", dist.Bernoulli(logits=logits).to_event(1))

    return model, guide


def test_saturated_logits_warn_once_naming_the_site():
    model, guide = bernoulli_pair(50.0)
    with pytest.warns(SaturatedLogitsWarning, match=r"guide site 'b': 30 of 30 logits") as seen:
        fit(model, guide, torch.ones(10), steps=4, batch_size=10, progress=False,
            optim=pyro.optim.Adam({"lr": 0.1}))
    assert len([w for w in seen if w.category is SaturatedLogitsWarning]) == 1
    # they are stuck: the gradient is exactly zero
    assert torch.equal(pyro.param("logits").detach(), torch.full((3,), 50.0))


@pytest.mark.parametrize("site_fn", [
    lambda logits: dist.Categorical(logits=logits),
    lambda logits: dist.OneHotCategorical(logits=logits),
    lambda logits: dist.RelaxedBernoulli(torch.tensor(0.5), logits=logits).to_event(1),
], ids=["categorical", "onehot", "relaxed"])
def test_saturated_logits_of_other_discrete_sites(site_fn):
    def model(x):
        pyro.sample("c", site_fn(torch.zeros(3)))
        pyro.sample("obs", dist.Normal(0.0, 1.0).expand([4]).to_event(1), obs=x)

    def guide(x):
        pyro.sample("c", site_fn(pyro.param("l", torch.tensor([60.0, 0.0, 0.0]))))

    with pytest.warns(SaturatedLogitsWarning, match="guide site 'c'"):
        fit(model, guide, torch.ones(4), steps=1, batch_size=4,
            progress=False)


def test_moderate_logits_do_not_warn():
    model, guide = bernoulli_pair(5.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SaturatedLogitsWarning)
        fit(model, guide, torch.ones(10), steps=2, batch_size=10, progress=False)


def test_autodelta_global_guide_is_accepted_at_small_batch():
    # Global latents only: nothing per datum, no refusal.
    fit(normal_mean_model, AutoDelta(normal_mean_model), torch.randn(40), steps=2,
        batch_size=10, progress=False)


def test_local_site_outside_the_guides_data_plate_is_refused():
    """Its guide entropy would count once while the model's log-density counts N / B."""

    def guide(x):
        loc = pyro.param("loc", torch.zeros(len(x)))
        pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))  # the batch as an event

    with pytest.raises(ValueError, match=r"\['z'\] are inside plate 'data' in only one of "
                                         r"model and guide \(inside it in: \{'z': 'model'\}"):
        fit(local_model, guide, local_data(), steps=1, batch_size=10, progress=False)


def test_declared_model_plate_with_a_guide_plate_over_the_batch_is_refused():
    """Pyro replays the guide's subsample indices into the model: a guide plate over the
    batch would hand the model the positions 0..B-1 in place of the batch's indices."""

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x, 1.0))

    with pytest.raises(ValueError, match="declares the full size N=40, the guide's has size 10"):
        fit(declared_local_model, guide, local_data(), steps=1, batch_size=10, progress=False)


def test_logits_that_saturate_later_are_caught_by_the_periodic_check(monkeypatch):
    import lvmkit.inference.training as training

    monkeypatch.setattr(training, "SATURATION_CHECK_EVERY", 3)
    calls = []
    model, _ = bernoulli_pair(0.0)

    def guide(x):
        calls.append(1)
        # calls 1-2: the first trace and step 1 (checked, fine); saturated from step 2 on
        logits = torch.full((3,), 0.0 if len(calls) <= 2 else 40.0)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("b", dist.Bernoulli(logits=logits).to_event(1))

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fit(model, guide, torch.ones(10), steps=2, batch_size=10, progress=False)
    assert not [w for w in seen if w.category is SaturatedLogitsWarning]  # step 2 unchecked
    calls.clear()
    with pytest.warns(SaturatedLogitsWarning, match="guide site 'b'"):
        fit(model, guide, torch.ones(10), steps=3, batch_size=10, progress=False)


def test_hand_written_per_datum_guide_with_a_plain_model():
    """The guide declares the full size (its own per-datum parameters); the model is plain.
    Every batch has B data even where N / B is not whole (the guide's plate draws B)."""
    x = local_data()

    def guide(x):
        loc = pyro.param("loc", torch.zeros(N_LOCAL))
        scale = pyro.param("scale", torch.ones(N_LOCAL), constraint=dist.constraints.positive)
        with pyro.plate("data", N_LOCAL, subsample_size=len(x)) as ind:
            pyro.sample("z", dist.Normal(loc[ind], scale[ind]))

    sizes = []

    def model(x):
        sizes.append(len(x))
        local_model(x)

    fit(model, guide, x, epochs=150, batch_size=12, optim=decaying_adam(0.1), progress=False)
    assert set(sizes) == {12}
    assert (pyro.param("loc").detach() - 0.8 * x).abs().max().item() < 0.3
