"""AuxiliaryEncoder: validity of its importance-weighted evaluation against an exact log p(x),
IWHVI tightening in K, DReG gradients, and the shared first-layer products.

The reference is a VAE with a one-dimensional z, so that log p(x) = log ∫ p(z) p(x | z) dz
is exact by quadrature on a fine grid.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from lvmkit.guides import AuxiliaryEncoder, GaussianEncoder
from lvmkit.inference import elbo_per_datum, log_likelihood, log_weights
from lvmkit.models import VAE
from lvmkit.nn import gaussian_params

X_DIM = 4
X = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])


def exact_log_px(model: VAE, x: torch.Tensor) -> torch.Tensor:
    """log p(x) by quadrature over the one-dimensional z (trapezoid on [-10, 10])."""
    z = torch.linspace(-10.0, 10.0, 20001, dtype=torch.float64).unsqueeze(-1)
    with torch.no_grad():
        logits = model.decoder.double()(z)
        model.decoder.float()
    log_lik = dist.Bernoulli(logits=logits.unsqueeze(1)).log_prob(x.double()).sum(-1)
    log_joint = dist.Normal(0.0, 1.0).log_prob(z) + log_lik  # (grid, N)
    dz = float(z[1, 0] - z[0, 0])
    return (torch.logsumexp(log_joint, 0) + math.log(dz)).float()


def make_pair(num_aux: int | None, seed: int = 0, a_weight: float = 3.0,
              decoder_scale: float = 2.0, widen: float = 0.0):
    """A tiny VAE and an encoder; for the auxiliary one the first layer's a columns are
    scaled up so that q(z | a, x) depends on a strongly (random init barely uses it).
    ``widen`` raises the pre-softplus scale of q(z | ...) (a wider proposal: lighter-tailed
    importance weights)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = VAE(X_DIM, z_dim=1, hidden=(6,))
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.mul_(decoder_scale)  # > 1: a posterior unlike the prior
    if num_aux is None:
        guide = GaussianEncoder(X_DIM, 1, hidden=(6,))
        with torch.no_grad():
            guide.net[-1].bias[1:] += widen
        return model, guide
    guide = AuxiliaryEncoder(X_DIM, 1, 2, hidden=(6,), num_aux_samples=num_aux)
    with torch.no_grad():
        guide.z_net[0].weight[:, X_DIM:] *= a_weight
        guide.z_net[-1].bias[1:] += widen
    return model, guide


@pytest.mark.parametrize("num_aux", [None, 0, 5], ids=["mean-field", "aux-K0", "iwhvi-K5"])
def test_importance_weights_are_unbiased_for_the_exact_evidence(num_aux):
    # E[w] = p(x) exactly for w = p(x, z) r(a | x, z) / q(a, z | x) (K = 0) and for
    # w = p(x, z) / q̂(z) (K > 0); that is what makes every IWAE-M a valid bound. A guide
    # that dropped r, or scored r with the wrong sign, would be off by nats.
    model, guide = make_pair(num_aux)
    exact = exact_log_px(model, X)
    pyro.set_rng_seed(1)
    log_w = log_weights(model, guide, X, num_samples=40000, chunk_size=10000).double()
    estimate = torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])
    w = (log_w - estimate).exp()  # w / mean(w)
    se = w.std(0) / math.sqrt(log_w.shape[0])  # delta method: s.e. of log mean w
    assert bool((se < 0.05).all()), se
    assert torch.allclose(estimate.float(), exact, atol=float(4 * se.max()) + 1e-3), (
        estimate, exact)
    # and the single-sample ELBO lies below log p(x) by more than its MC error
    elbo = log_w.mean(0)
    assert bool((elbo < exact.double() - 5 * log_w.std(0) / math.sqrt(log_w.shape[0])).all())


@pytest.mark.parametrize("num_aux", [None, 0, 5], ids=["mean-field", "aux-K0", "iwhvi-K5"])
def test_log_likelihood_is_a_bound_that_approaches_the_exact_evidence(num_aux):
    # a posterior near the prior and a wide proposal: light-tailed weights, so that L_M's
    # MC error is small (a random-init encoder is narrower than the posterior)
    model, guide = make_pair(num_aux, decoder_scale=1.0, widen=1.5)
    exact = exact_log_px(model, X)
    pyro.set_rng_seed(2)
    # 200 independent draws of L_4 for each datum, in one call
    few = log_likelihood(model, guide, X.repeat(200, 1), num_samples=4).reshape(200, -1)
    many = log_likelihood(model, guide, X, num_samples=20000, chunk_size=5000)
    # E L_4 <= log p(x): the mean of 200 draws of L_4, within 3 s.e.
    se_few = few.std(0) / math.sqrt(200)
    assert bool((few.mean(0) < exact + 3 * se_few).all())
    assert bool((few.mean(0) < many + 3 * se_few).all())  # L_M increases with M
    # ... towards log p(x) (the tight check is the unbiased-weights test above)
    assert torch.allclose(many, exact, atol=0.02)


def test_iwhvi_bound_tightens_with_the_number_of_reverse_draws():
    # E log q̂_K(z) decreases in K, so the ELBO with K reverse draws increases; with a
    # strongly a-dependent q(z | a, x) and an untrained r the gain is large.
    # The same seed gives the same (a_0, z) draws for every K (the reverse draws come
    # after them), so the differences are paired.
    model, guide = make_pair(0)
    x = X.repeat(200, 1)
    per_datum = {}
    for k in (0, 5, 25):
        guide.num_aux_samples = k
        pyro.set_rng_seed(3)
        per_datum[k] = elbo_per_datum(model, guide, x, num_samples=8)
    for small, large in ((0, 5), (5, 25)):
        gain = per_datum[large] - per_datum[small]
        assert float(gain.mean()) > 3 * float(gain.std() / math.sqrt(len(gain))), (small, large)
    # still a bound: below log p(x) (by more than its MC error)
    exact = exact_log_px(model, X).repeat(200)
    slack = exact - per_datum[25]
    assert float(slack.mean()) > 3 * float(slack.std() / math.sqrt(len(slack)))


def _reverse_grads(guide, model, x, dreg: bool) -> torch.Tensor:
    guide.dreg = dreg
    guide.zero_grad()
    loss = pyro.infer.Trace_ELBO().differentiable_loss(model, guide, x)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in guide.reverse_net.parameters()])


def test_dreg_and_plain_reverse_gradients_agree_in_expectation():
    model, guide = make_pair(5, a_weight=2.0)
    x = X.repeat(3000, 1)
    pyro.set_rng_seed(4)
    dreg = torch.stack([_reverse_grads(guide, model, x, True) for _ in range(4)])
    plain = torch.stack([_reverse_grads(guide, model, x, False) for _ in range(4)])
    # per-datum gradients averaged over 12,000 draws each; s.e. from the 4 repeats
    se = torch.sqrt(dreg.var(0) / 4 + plain.var(0) / 4)
    diff = (dreg.mean(0) - plain.mean(0)).abs()
    scale = plain.mean(0).abs().max()
    assert bool((diff < 5 * se + 0.02 * scale).all()), (diff, se)
    # and DReG is what the encoder uses: its per-step gradient is less noisy (about half
    # the variance here; Tucker et al. 2019)
    small = X.repeat(100, 1)
    dreg = torch.stack([_reverse_grads(guide, model, small, True) for _ in range(20)])
    plain = torch.stack([_reverse_grads(guide, model, small, False) for _ in range(20)])
    assert float(dreg.var(0).sum()) < 0.8 * float(plain.var(0).sum())


def test_shared_first_layer_gives_the_plain_mlp_densities():
    # the encoder computes the x columns of its first layers once per datum; the densities
    # must equal those of the nets applied to cat([x, a]) and cat([x, z])
    model, guide = make_pair(0)
    guide_trace = poutine.trace(guide).get_trace(X)
    a = guide_trace.nodes["a"]["value"]
    z = guide_trace.nodes["z"]["value"]
    loc, scale = gaussian_params(guide.z_net(torch.cat([X, a], -1)))
    expected_z = dist.Normal(loc, scale).to_event(1).log_prob(z)
    r_loc, r_scale = gaussian_params(guide.reverse_net(torch.cat([X, z], -1)))
    expected_r = dist.Normal(r_loc, r_scale).to_event(1).log_prob(a)
    assert torch.allclose(guide_trace.nodes["z"]["fn"].log_prob(z), expected_z, atol=1e-5)
    log_factor = guide_trace.nodes["a_reverse"]["fn"].log_factor
    assert torch.allclose(log_factor, -expected_r, atol=1e-5)
