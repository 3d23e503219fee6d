"""The estimators, training and evaluation on a CUDA device (skipped without one).

CI has no GPU; these run wherever one is present (``pytest tests/test_cuda.py``). On the
CPU the same code paths are covered by the other test files; what is checked here is
what only a GPU exercises: tensors and learned controls following the data to the
device, the CUDA random generators in checkpoints and in ``RandomState``, and agreement
of CUDA and CPU gradients on the same random draws.
"""

import copy

import pyro
import pyro.optim
import pytest
import torch
from small_models import fixed_uniforms

from lvmkit._rng import RandomState
from lvmkit.inference import (
    ARMELBO,
    NVILELBO,
    VIMCOELBO,
    ConcreteELBO,
    DisARMELBO,
    RebarELBO,
    RelaxELBO,
    fit,
    log_likelihood,
)
from lvmkit.inference.estimators import _relax
from lvmkit.inference.estimators import rebar as rebar_module
from lvmkit.inference.training import CHECKPOINT_NAME
from lvmkit.models import SigmoidBeliefNet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
ESTIMATORS = {
    "rebar": RebarELBO,
    "relax": RelaxELBO,
    "nvil": NVILELBO,
    "vimco": lambda: VIMCOELBO(num_particles=4),
    "arm": ARMELBO,
    "disarm": DisARMELBO,
    "concrete": ConcreteELBO,
}


def data(n=40, dim=10, seed=0) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, dim), 0.4),
                           generator=torch.Generator().manual_seed(seed))


def sbn(name="cuda_sbn", layers=(4,), device=CUDA):
    torch.manual_seed(5)
    model = SigmoidBeliefNet(10, layers=layers, name=name, init_data=data())
    guide = model.default_guide()
    return model.to(device), guide.to(device)


def store_devices() -> set[str]:
    return {value.device.type for _, value in pyro.get_param_store().items()}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_estimator_trains_on_cuda(name):
    model, guide = sbn(layers=(4, 3))
    elbo = ESTIMATORS[name]()
    history = fit(model, guide, data(), elbo=elbo, steps=6, batch_size=10, device="cuda",
                  progress=False, optim=pyro.optim.Adam({"lr": 0.02}))
    assert all(torch.isfinite(torch.tensor(history.loss)))
    assert store_devices() == {"cuda"}
    if isinstance(elbo, RebarELBO):
        assert {p.device.type for p in elbo.controls.parameters()} == {"cuda"}
        assert all(torch.isfinite(torch.tensor(v)) for v in elbo.diagnostics().values())


@pytest.mark.parametrize("estimator", [RebarELBO, RelaxELBO])
@pytest.mark.parametrize("fuse", [True, False])
def test_cuda_gradients_match_cpu_on_the_same_draws(estimator, fuse, monkeypatch):
    x = data()[:10]
    cpu_model, cpu_guide = sbn(layers=(4, 3), device="cpu")
    grads, controls = {}, {}
    for device in ("cpu", "cuda"):
        monkeypatch.setattr(_relax, "draw_uniform", fixed_uniforms())
        monkeypatch.setattr(rebar_module, "draw_uniform", _relax.draw_uniform)
        pyro.clear_param_store()
        model = copy.deepcopy(cpu_model).to(device)
        guide = copy.deepcopy(cpu_guide).to(device)
        elbo = estimator(fuse_passes=fuse, module_name="cuda_controls")
        elbo.loss_and_grads(model, guide, x.to(device))
        grads[device] = {k: v.grad.detach().cpu() for k, v in pyro.get_param_store().items()}
        controls[device] = elbo.diagnostics()
    assert grads["cpu"].keys() == grads["cuda"].keys()
    assert any(k.startswith("cuda_controls$$$") for k in grads["cpu"])  # their gradients too
    for key, g in grads["cpu"].items():
        torch.testing.assert_close(grads["cuda"][key], g, rtol=1e-4, atol=1e-5, msg=key)
    for key, value in controls["cpu"].items():
        assert controls["cuda"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_resume_on_cuda_matches_uninterrupted_run(tmp_path):
    def train(steps, **kwargs):
        model, guide = sbn()
        elbo = RebarELBO(module_name="cuda_rebar")
        history = fit(model, guide, data(), elbo=elbo, steps=steps, batch_size=10,
                      device="cuda", progress=False, optim=pyro.optim.Adam({"lr": 0.05}),
                      **kwargs)
        return history, elbo

    full, full_elbo = train(10)
    full_params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    pyro.clear_param_store()
    train(5, checkpoint_dir=tmp_path, checkpoint_every=5)
    saved = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)
    assert saved["rng"]["cuda"] is not None
    pyro.clear_param_store()
    resumed, resumed_elbo = train(10, checkpoint_dir=tmp_path, checkpoint_every=5)
    assert resumed.loss == pytest.approx(full.loss, abs=1e-5)
    for key, value in full_params.items():
        torch.testing.assert_close(pyro.get_param_store()[key], value, msg=key)
    assert resumed_elbo.diagnostics() == pytest.approx(full_elbo.diagnostics())


@pytest.mark.parametrize("torch_only", [False, True])
def test_random_state_restores_the_cuda_generators(torch_only):
    torch.rand(1, device=CUDA)  # CUDA in use
    state = RandomState(torch_only=torch_only)
    first = torch.rand(5, device=CUDA).cpu()
    state.restore()
    assert torch.equal(torch.rand(5, device=CUDA).cpu(), first)


def test_log_likelihood_on_cuda_agrees_with_cpu():
    x = data()[:8]
    estimates = {}
    for device in ("cpu", "cuda"):
        pyro.clear_param_store()
        model, guide = sbn(device=device)
        pyro.set_rng_seed(0)
        estimates[device] = log_likelihood(model, guide, x.to(device), num_samples=4000,
                                           chunk_size=500)
    assert estimates["cuda"].device.type == "cpu"  # as documented
    # different random streams: agreement within the Monte Carlo error of 4000 samples
    torch.testing.assert_close(estimates["cuda"], estimates["cpu"], rtol=0, atol=0.05)
