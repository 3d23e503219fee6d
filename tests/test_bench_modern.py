"""benchmarks/modern.py: its evaluation scores the model it trains, and every estimator of
its line-up trains the encoder, the decoder and the prior."""

import os
import sys
from types import SimpleNamespace

import pyro
import pyro.poutine as poutine
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))

import modern  # noqa: E402

from lvmkit.data import Dataset  # noqa: E402


@pytest.mark.parametrize("nonlinear", [False, True])
def test_log_weight_is_the_pyro_models_log_density_ratio(nonlinear):
    pyro.clear_param_store()
    vae = modern.BinaryVAE(*modern.networks(nonlinear, torch.zeros(modern.PIXELS), seed=0))
    x = torch.bernoulli(torch.full((3, modern.PIXELS), 0.3))
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, guide_trace)).get_trace(x)
    expected = model_trace.log_prob_sum() - guide_trace.log_prob_sum()
    got = vae.log_weight(x, guide_trace.nodes["b"]["value"]).sum()
    torch.testing.assert_close(got, expected.detach())


@pytest.mark.slow
def test_every_estimator_trains_encoder_decoder_and_prior():
    grey = torch.rand(12, modern.PIXELS)
    train = Dataset(x=grey, y=torch.zeros(12).long(), name="toy", image_shape=(28, 28),
                    binarize="dynamic")
    x = torch.bernoulli(grey[:4])
    bias = torch.zeros(modern.PIXELS)
    data = (train, x, x[:2], x, bias)
    args = SimpleNamespace(seed=0, lr=1e-2, control_lr=1e-2, steps=2, batch_size=4,
                           var_draws=2, iwae_samples=3, smooth=2)
    encoder, decoder = modern.networks(False, bias, args.seed)  # run_one's initial state
    for k in (2, 3):
        for label, make in modern.estimators(k).items():
            result = modern.run_one(label, make, False, data, args)
            assert set(result["log10_var"]) == {"0", "1", "2"}, label
            assert all(torch.isfinite(torch.tensor(v)) for v in result["log10_var"].values())
            store = dict(pyro.get_param_store().named_parameters())
            for name, initial in (("encoder$$$weight", encoder.weight),
                                  ("decoder$$$weight", decoder.weight),
                                  ("prior_logits", torch.zeros(modern.LATENT))):
                assert not torch.equal(store[name].detach(), initial.detach()), (label, name)
