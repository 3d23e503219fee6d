import json
import math
import os

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO
from pyro.nn import PyroModule

from lvmkit.data import Dataset
from lvmkit.inference.training import CHECKPOINT_NAME, History, fit
from lvmkit.models import build


class TinyVAE(PyroModule):
    """Gaussian latents, Bernoulli pixels; networks registered with pyro.module."""

    def __init__(self, dim=6, latent=2, hidden=8):
        super().__init__()
        self.latent = latent
        self.decoder = torch.nn.Sequential(
            torch.nn.Linear(latent, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, dim))

    def forward(self, x, labels=None):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.latent), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)


class TinyEncoder(PyroModule):
    def __init__(self, dim=6, latent=2, hidden=8):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2 * latent))

    def forward(self, x, labels=None):
        pyro.module("encoder", self.net)
        loc, log_scale = self.net(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def binary_data(n=30, dim=6, seed=0):
    return torch.bernoulli(torch.full((n, dim), 0.4), generator=torch.Generator().manual_seed(seed))


def fresh_pair(seed=1):
    """New networks, as a new process would build them."""
    torch.manual_seed(seed)
    return TinyVAE(), TinyEncoder()


def params_snapshot():
    return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


def run(steps, data, **kwargs):
    model, guide = fresh_pair()
    kwargs.setdefault("batch_size", 10)
    kwargs.setdefault("optim", pyro.optim.Adam({"lr": 0.01}))
    return fit(model, guide, data, steps=steps, progress=False, **kwargs)


def test_same_seed_same_history_and_params():
    data = binary_data()
    first = run(8, data)
    first_params = params_snapshot()
    pyro.clear_param_store()
    second = run(8, data)
    assert first.loss == second.loss
    assert all(torch.equal(first_params[k], v) for k, v in params_snapshot().items())
    pyro.clear_param_store()
    other = run(8, data, seed=1)
    assert other.loss != first.loss
    assert first.step == list(range(1, 9)) and len(first) == 8
    assert all(b >= a for a, b in zip(first.wall_time, first.wall_time[1:], strict=False))


# One parameter, no latents: with every x_n = 1 and loc = 0, d loss / d loc = -(scale) * B,
# so one SGD step moves loc to lr * N when the batch is scaled by N / B, lr * B if unscaled.
N, B, LR = 40, 8, 1e-3


def location_model(x, labels=None):
    loc = pyro.param("loc", torch.tensor(0.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x)


def subsampling_model(x, labels=None):
    loc = pyro.param("loc", torch.tensor(0.0))
    with pyro.plate("data", N, subsample=torch.arange(x.shape[0])):
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x)


def empty_guide(x, labels=None):
    pass


@pytest.mark.parametrize("model", [location_model, subsampling_model])
def test_scaling_by_n_over_b_applied_once(model):
    history = fit(model, empty_guide, torch.ones(N), steps=1, batch_size=B,
                  optim=pyro.optim.SGD({"lr": LR}), progress=False)
    assert pyro.param("loc").item() == pytest.approx(LR * N, rel=1e-5)
    # Per-datum loss: -log N(1; 0, 1).
    assert history.loss[0] == pytest.approx(0.5 + 0.5 * math.log(2 * math.pi), rel=1e-5)


def test_full_batch_is_unscaled():
    fit(location_model, empty_guide, torch.ones(N), steps=1, batch_size=N,
        optim=pyro.optim.SGD({"lr": LR}), progress=False)
    assert pyro.param("loc").item() == pytest.approx(LR * N, rel=1e-5)


def test_epochs_and_last_partial_batch():
    sizes = []

    def model(x, labels=None):
        sizes.append(x.shape[0])
        location_model(x)

    history = fit(model, empty_guide, torch.ones(10), epochs=2, batch_size=4,
                  optim=pyro.optim.SGD({"lr": LR}), progress=False)
    assert history.epoch == [0, 0, 0, 1, 1, 1]
    assert sizes[1:] == [4, 4, 2, 4, 4, 2]  # sizes[0] is the first (inspection) trace
    # Every datum is seen once per epoch with scale N/|batch|: 2 epochs of gradient -N.
    assert pyro.param("loc").item() == pytest.approx(LR * 10 * 6, rel=0.05)


def test_differentiable_loss_path_matches_svi_gradient():
    data = binary_data()
    run(1, data, optim=pyro.optim.SGD({"lr": 0.1}))
    svi_params = params_snapshot()
    pyro.clear_param_store()
    run(1, data, optim=pyro.optim.SGD({"lr": 0.1}), use_differentiable_loss=True)
    diff_params = params_snapshot()
    assert svi_params.keys() == diff_params.keys()
    for name, value in svi_params.items():
        assert torch.allclose(value, diff_params[name], atol=1e-6), name
    pyro.clear_param_store()
    fresh_pair()[0](data)  # initial values, same seed
    initial = {k: v.detach() for k, v in pyro.get_param_store().items()}
    moved = max((svi_params[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-4  # the step did something


def test_differentiable_loss_refused_for_elbo_without_it():
    with pytest.raises(TypeError, match="RenyiELBO has no differentiable_loss"):
        run(1, binary_data(), elbo=RenyiELBO(), use_differentiable_loss=True)


def bernoulli_latent_model(x, labels=None):
    weight = pyro.param("weight", torch.zeros(3, x.shape[1]))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(3)).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=z @ weight).to_event(1), obs=x)


def bernoulli_latent_guide(x, labels=None):
    proj = pyro.param("proj", torch.zeros(x.shape[1], 3))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Bernoulli(logits=x @ proj).to_event(1))


@pytest.mark.filterwarnings("ignore:TraceEnum_ELBO found no sample sites")
@pytest.mark.parametrize(
    "elbo",
    [Trace_ELBO(), TraceGraph_ELBO(), TraceEnum_ELBO(max_plate_nesting=1),
     RenyiELBO(alpha=0.5, num_particles=2)],
    ids=["trace", "tracegraph", "traceenum", "renyi"],
)
def test_any_pyro_elbo(elbo):
    data = binary_data(n=40, dim=5)
    data[:, :2] = 1.0  # learnable structure: two pixels always on
    history = fit(bernoulli_latent_model, bernoulli_latent_guide, data, elbo=elbo, steps=40,
                  batch_size=20, optim=pyro.optim.Adam({"lr": 0.1}), progress=False)
    assert len(history) == 40 and all(math.isfinite(v) for v in history.loss)
    # Per-datum loss starts at 5 log 2 (all logits 0) and must fall as the weights learn.
    assert history.loss[0] == pytest.approx(5 * math.log(2), rel=1e-4)
    assert sum(history.loss[-10:]) / 10 < history.loss[0] - 0.3


class CountingELBO(Trace_ELBO):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def loss_and_grads(self, model, guide, *args, **kwargs):
        self.calls += 1
        return super().loss_and_grads(model, guide, *args, **kwargs)

    def diagnostics(self):
        return {"calls": self.calls}


def test_history_extras_from_diagnostics_and_callback(tmp_path):
    history = run(5, binary_data(), elbo=CountingELBO(),
                  callback=lambda h: {"twice_loss": 2 * h.loss[-1]} if len(h) > 2 else None)
    assert history.extras["calls"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    twice = history.extras["twice_loss"]
    assert all(math.isnan(v) for v in twice[:2])
    assert twice[2:] == [2 * v for v in history.loss[2:]]
    history.save(tmp_path / "h.json")
    loaded = json.loads((tmp_path / "h.json").read_text())
    assert loaded["loss"] == history.loss and loaded["step"] == [1, 2, 3, 4, 5]
    assert History.from_dict(history.to_dict()).loss == history.loss


def test_progress_bar_shows_per_datum_loss(capsys):
    fit(location_model, empty_guide, torch.ones(N), steps=3, batch_size=B, progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "loss=" in err
    fit(location_model, empty_guide, torch.ones(N), steps=3, batch_size=B, progress=False)
    assert capsys.readouterr().err == ""


def test_dataset_dynamic_binarization_and_labels():
    seen = []

    def model(x, labels=None):
        seen.append((x.clone(), labels))
        with pyro.plate("data", x.shape[0]):
            # Bernoulli validation rejects grey values, the inspection trace included.
            pyro.sample("x", dist.Bernoulli(logits=torch.zeros(3)).to_event(1), obs=x)

    grey = torch.full((12, 3), 0.5)
    ds = Dataset(x=grey, y=torch.arange(12), name="toy", image_shape=(3,), binarize="dynamic")
    fit(model, empty_guide, ds, steps=3, batch_size=4, labels=True, progress=False,
        optim=pyro.optim.SGD({"lr": LR}))
    batches = [x for x, _ in seen[1:]]
    assert all(set(x.unique().tolist()) <= {0.0, 1.0} for x in batches)
    assert not all(torch.equal(batches[0], b) for b in batches[1:])
    labels = torch.cat([y for _, y in seen[1:]])
    assert sorted(labels.tolist()) == list(range(12))  # one epoch, each label once


def test_resume_matches_uninterrupted_run(tmp_path):
    data = binary_data()
    full = run(12, data)
    full_params = params_snapshot()
    pyro.clear_param_store()
    first = run(6, data, checkpoint_dir=tmp_path, checkpoint_every=4)
    assert first.loss == full.loss[:6]
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)["step"] == 6
    pyro.clear_param_store()  # as in a new process
    resumed = run(12, data, checkpoint_dir=tmp_path, checkpoint_every=4)
    assert resumed.step == list(range(1, 13))
    assert resumed.loss == pytest.approx(full.loss, abs=1e-6)
    resumed_params = params_snapshot()
    assert resumed_params.keys() == full_params.keys()
    for name, value in full_params.items():
        assert torch.allclose(resumed_params[name], value, atol=1e-6), name
    pyro.clear_param_store()
    restart = run(12, data, checkpoint_dir=tmp_path, resume=False)
    assert restart.loss == pytest.approx(full.loss, abs=1e-6)


def test_resume_refuses_a_different_batch_size(tmp_path):
    run(2, binary_data(), checkpoint_dir=tmp_path)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match="batch_size=10; this run has N=30, batch_size=5"):
        run(4, binary_data(), checkpoint_dir=tmp_path, batch_size=5)


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    run(4, binary_data(), checkpoint_dir=tmp_path, checkpoint_every=2)
    path = tmp_path / CHECKPOINT_NAME
    before = path.read_bytes()
    real_save = torch.save

    def crashing_save(obj, stream, *args, **kwargs):
        real_save(obj, stream, *args, **kwargs)
        stream.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    pyro.clear_param_store()
    with pytest.raises(OSError, match="disk full"):
        run(8, binary_data(), checkpoint_dir=tmp_path, checkpoint_every=2)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=False)["step"] == 4
    # no temporary file left behind; the previous checkpoint kept (keep_last=2), and the
    # history of the failed run beside them
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2.pt", CHECKPOINT_NAME, "history.json"]


@pytest.mark.filterwarnings("ignore:Encountered \\+inf")
def test_non_finite_loss_names_the_step_and_saves_nothing_bad(tmp_path):
    calls = {"n": 0}

    def model(x, labels=None):
        calls["n"] += 1
        location_model(x)
        if calls["n"] == 4:  # call 1 is the inspection trace, so this is step 3
            pyro.factor("broken", torch.tensor(float("inf")))

    with pytest.raises(FloatingPointError, match="at step 3"):
        fit(model, empty_guide, torch.ones(N), steps=5, batch_size=B, progress=False,
            checkpoint_dir=tmp_path, checkpoint_every=1)
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)
    assert saved["step"] == 2
    assert all(math.isfinite(v) for v in saved["history"]["loss"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 1, "batch_size": 0}, r"batch_size must be an int in \[1, N=40\]"),
        ({"steps": 1, "batch_size": 41}, r"batch_size must be an int in \[1, N=40\], got 41"),
        ({}, "exactly one of steps= and epochs="),
        ({"steps": 1, "epochs": 1}, "exactly one of steps= and epochs="),
        ({"steps": 1, "batch_size": B, "checkpoint_every": 0}, "checkpoint_every"),
        ({"steps": 1, "batch_size": B, "labels": torch.zeros(3)}, "tensor of 40 labels"),
        ({"steps": 1, "labels": True}, "labels=True needs a Dataset"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit(location_model, empty_guide, torch.ones(N), progress=False, **kwargs)


def test_empty_data():
    with pytest.raises(ValueError, match="data is empty"):
        fit(location_model, empty_guide, torch.ones(0, 3), steps=1, progress=False)
    with pytest.raises(TypeError, match="torch.Tensor or a Dataset"):
        fit(location_model, empty_guide, [1.0, 2.0], steps=1, progress=False)


def test_package_level_fit_is_the_function_after_module_import():
    import lvmkit.inference
    import lvmkit.inference.training  # noqa: F401  must not shadow the function

    assert lvmkit.inference.fit is fit and lvmkit.fit is fit

    history = lvmkit.inference.fit(location_model, empty_guide, torch.ones(N), steps=2,
                                   batch_size=B, progress=False)
    assert isinstance(history, History) and len(history) == 2


def sbn_pair():
    """A small sigmoid belief net and its guide, as a new process would build them."""
    from lvmkit.models import SigmoidBeliefNet

    torch.manual_seed(2)
    model = SigmoidBeliefNet(6, layers=(3,), name="ckpt_sbn")
    return model, model.default_guide()


def estimator(name):
    from lvmkit.inference import NVILELBO, RebarELBO, RelaxELBO

    # fixed names (in the param store): a new process would number its first ones alike
    return {"rebar": lambda: RebarELBO(module_name="ckpt_rebar"),
            "relax": lambda: RelaxELBO(module_name="ckpt_relax"),
            "nvil": lambda: NVILELBO(module_name="ckpt_nvil")}[name]()


def estimator_state(elbo):
    """What the estimator has learned and tracked, as plain tensors."""
    state = {k: v.detach().clone() for k, v in elbo.state_dict().items()
             if torch.is_tensor(v)}
    if hasattr(elbo, "diagnostics"):
        state.update({k: torch.tensor(v) for k, v in elbo.diagnostics().items()})
    return state


@pytest.mark.parametrize("name", ["rebar", "relax", "nvil"])
def test_resume_keeps_the_estimators_learned_state(name, tmp_path):
    """Temperature, etas, RELAX's network and the variance optimizer, NVIL's baseline net
    and running moments: a resumed run continues with them, as if never interrupted."""
    data = binary_data()

    def train(steps, **kwargs):
        model, guide = sbn_pair()
        elbo = estimator(name)
        history = fit(model, guide, data, elbo=elbo, steps=steps, batch_size=10,
                      progress=False, optim=pyro.optim.Adam({"lr": 0.05}), **kwargs)
        return history, elbo

    full, full_elbo = train(12)
    full_params, full_state = params_snapshot(), estimator_state(full_elbo)
    pyro.clear_param_store()
    train(6, checkpoint_dir=tmp_path, checkpoint_every=3)
    pyro.clear_param_store()  # as in a new process
    resumed, resumed_elbo = train(12, checkpoint_dir=tmp_path, checkpoint_every=3)
    assert resumed.loss == pytest.approx(full.loss, abs=1e-5)
    resumed_params = params_snapshot()
    assert resumed_params.keys() == full_params.keys()
    for key, value in full_params.items():
        torch.testing.assert_close(resumed_params[key], value, msg=key)
    resumed_state = estimator_state(resumed_elbo)
    assert resumed_state.keys() == full_state.keys() and full_state
    for key, value in full_state.items():
        torch.testing.assert_close(resumed_state[key], value, msg=key)


@pytest.mark.parametrize("name", ["nvil-numbered", "trace-vectorized", "rloo"])
def test_resume_continues_the_same_draws(name, tmp_path):
    """Regressions (found by a review): an NVIL with its default, per-instance numbered
    baseline name restored the saved net under the old name but trained a new one under
    its own; and an ELBO with vectorized particles guessed its plate nesting again after
    the generators were restored, drawing other latents from the resume step on. Both
    resume bit for bit now."""
    from pyro.infer import Trace_ELBO

    from lvmkit.inference import NVILELBO, RLOOELBO

    make = {"nvil-numbered": NVILELBO,
            "trace-vectorized": lambda: Trace_ELBO(num_particles=3, vectorize_particles=True),
            "rloo": lambda: RLOOELBO(num_particles=3)}[name]
    data = binary_data()

    def train(steps, **kwargs):
        model, guide = sbn_pair()
        return fit(model, guide, data, elbo=make(), steps=steps, batch_size=10,
                   progress=False, optim=pyro.optim.Adam({"lr": 0.05}), **kwargs)

    full = train(12)
    pyro.clear_param_store()
    train(6, checkpoint_dir=tmp_path, checkpoint_every=3)
    pyro.clear_param_store()
    resumed = train(12, checkpoint_dir=tmp_path, checkpoint_every=3)
    assert resumed.loss == pytest.approx(full.loss, abs=1e-5)


def test_resume_refuses_a_checkpoint_of_another_estimator(tmp_path):
    from lvmkit.inference import RebarELBO

    model, guide = sbn_pair()
    fit(model, guide, binary_data(), elbo=RebarELBO(), steps=2, batch_size=10,
        progress=False, checkpoint_dir=tmp_path)
    pyro.clear_param_store()
    model, guide = sbn_pair()
    with pytest.raises(ValueError, match="RebarELBO.*Trace_ELBO"):
        fit(model, guide, binary_data(), steps=4, batch_size=10, progress=False,
            checkpoint_dir=tmp_path)


@pytest.mark.parametrize("name", ["rebar", "relax"])
def test_differentiable_loss_path_trains_the_estimators_controls_as_svi_does(name):
    """Regression: on fit's differentiable_loss path the estimator's own parameters used
    to stay at their initial values; now fit's optimizer steps them on both paths."""
    results = {}
    for differentiable in (False, True):
        pyro.clear_param_store()
        model, guide = sbn_pair()
        elbo = estimator(name)
        history = fit(model, guide, binary_data(), elbo=elbo, steps=5, batch_size=10,
                      progress=False, use_differentiable_loss=differentiable)
        results[differentiable] = history.loss, elbo.diagnostics(), params_snapshot()
    (svi_loss, svi_controls, svi_params), (diff_loss, diff_controls, diff_params) = (
        results[False], results[True])
    assert diff_loss == pytest.approx(svi_loss, abs=1e-4)
    assert svi_controls["temperature"] != 0.5  # trained
    # the same up to float rounding in the surrogate's sums
    assert diff_controls == pytest.approx(svi_controls, rel=1e-3, abs=1e-5)
    for key, value in svi_params.items():
        torch.testing.assert_close(diff_params[key], value, rtol=1e-3, atol=1e-4, msg=key)


def test_fit_writes_lines_not_a_bar_when_stderr_is_not_a_terminal(capsys):
    model, guide = build("vae", 4, z_dim=2, hidden=(3,))
    x = torch.bernoulli(torch.full((20, 4), 0.5))
    fit(model, guide, x, steps=40, batch_size=10, progress=True)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 20 and lines[-1].startswith("fit: 40/40 (100%) loss=")
    assert "\r" not in err


def test_fit_gives_the_estimators_controls_their_own_rate():
    """The reference REBAR trains eta and lambda at 10x the model's rate: fit hands the
    estimator's controls its ``variance_optim_lr`` through per-parameter optimizer
    arguments, the model and guide keep ``optim``'s."""
    from lvmkit.inference import RebarELBO

    model, guide = sbn_pair()
    elbo = RebarELBO(variance_optim_lr=0.02, module_name="rate_rebar")
    optim = pyro.optim.Adam({"lr": 0.001})
    fit(model, guide, binary_data(), elbo=elbo, steps=2, batch_size=10, progress=False,
        optim=optim)
    store = pyro.get_param_store()
    rates = {store.param_name(p): o.param_groups[0]["lr"] for p, o in optim.optim_objs.items()}
    controls = {n: r for n, r in rates.items() if n.startswith("rate_rebar$$$")}
    assert set(controls) == {"rate_rebar$$$log_temperature", "rate_rebar$$$eta_logits.b1"}
    assert set(controls.values()) == {0.02}
    assert {r for n, r in rates.items() if n not in controls} == {0.001}


def test_resume_refuses_other_optimizer_settings_and_fewer_steps(tmp_path):
    """Regressions (found by a review): a resumed run silently kept the checkpoint's
    learning rate (torch's optimizer state carries it), crashed with a bare KeyError on
    another optimizer class, and with fewer steps than the checkpoint returned the
    longer-trained model."""
    def model(x):
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(pyro.param("mu", torch.tensor(0.0)), 1.0), obs=x)

    def guide(x):
        pass

    x = torch.full((10,), 5.0)
    pyro.clear_param_store()
    fit(model, guide, x, steps=5, batch_size=10, optim=pyro.optim.SGD({"lr": 1e-3}),
        checkpoint_dir=tmp_path, progress=False)
    cases = [(pyro.optim.SGD({"lr": 0.1}), 6, "lr=0.001 for parameter 'mu'.*lr=0.1"),
             (pyro.optim.Adam({"lr": 1e-3}), 6, "optimizer SGD; this run uses Adam"),
             (pyro.optim.SGD({"lr": 1e-3}), 3, "at step 5, past the 3 steps")]
    for optim, steps, match in cases:
        pyro.clear_param_store()
        with pytest.raises(ValueError, match=match):
            fit(model, guide, x, steps=steps, batch_size=10, optim=optim,
                checkpoint_dir=tmp_path, progress=False)
    pyro.clear_param_store()
    history = fit(model, guide, x, steps=6, batch_size=10, optim=pyro.optim.SGD({"lr": 1e-3}),
                  checkpoint_dir=tmp_path, progress=False)
    assert history.step == [1, 2, 3, 4, 5, 6]


def test_differentiable_loss_path_with_nothing_to_train():
    """Regression: use_differentiable_loss=True with no parameters raised torch's "element
    0 of tensors does not require grad"; it runs as the SVI path does."""
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    pyro.clear_param_store()
    history = fit(model, guide, torch.zeros(10), steps=2, batch_size=5, progress=False,
                  use_differentiable_loss=True)
    assert len(history) == 2
