"""Hierarchical guides: validity and tightness of the auxiliary bound, AutoHVM, errors.

The reference model is conjugate: z_n ~ N(0, 1), x_n | z_n ~ N(z_n, s^2), so
log p(x_n) = log N(x_n; 0, 1 + s^2) and p(z_n | x_n) = N(x_n / (1 + s^2), s^2 / (1 + s^2)).
A hand-written hierarchical guide q(a) = N(m, sa^2), q(z | a) = N(a, sz^2) has the Gaussian
marginal q(z) = N(m, sa^2 + sz^2) and the closed-form q(a | z), so every bound has an exact
value to compare with.
"""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import (
    SVI,
    Predictive,
    RenyiELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    config_enumerate,
)
from pyro.infer.autoguide import AutoNormal
from pyro.optim import Adam

from lvmkit.guides.hierarchical import (
    AutoHVM,
    AuxiliaryEncoder,
    EqualMixtureNormal,
    check_auxiliary_guide,
    iw_hierarchical_correction,
    reverse_factor,
)
from lvmkit.models.targets import RingOfModes

NOISE = 0.8
X = torch.tensor([[-1.5], [0.3], [2.0]])


def conjugate_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, NOISE).to_event(1), obs=x)


def exact_log_px(x):
    return dist.Normal(0.0, math.sqrt(1 + NOISE**2)).log_prob(x).sum(-1)


def posterior(x):
    var = NOISE**2 / (1 + NOISE**2)
    return x / (1 + NOISE**2), math.sqrt(var)


def make_guide(mean, sa, sz, reverse="exact", num_aux=1):
    """A hierarchical guide with q(z) = N(mean, sa^2 + sz^2) and a chosen reverse model."""

    def exact_reverse(z):
        precision = 1 / sa**2 + 1 / sz**2
        loc = (mean / sa**2 + z / sz**2) / precision
        return dist.Normal(loc, precision**-0.5).to_event(1)

    def bad_reverse(z):
        return dist.Normal(3.0 - 0.5 * z, 0.4).to_event(1)

    reverse_model = exact_reverse if reverse == "exact" else bad_reverse

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            q_a = dist.Normal(mean * torch.ones_like(x), sa).to_event(1)
            a = pyro.sample("a", q_a, infer={"is_auxiliary": True})
            q_z = dist.Normal(a, sz).to_event(1)
            z = pyro.sample("z", q_z)
            r = reverse_model(z)
            extra_q = extra_r = None
            if num_aux > 1:
                extra = r.sample((num_aux - 1,))
                extra_q = q_a.log_prob(extra) + dist.Normal(extra, sz).to_event(1).log_prob(z)
                extra_r = r.log_prob(extra)
            correction = iw_hierarchical_correction(
                q_a.log_prob(a), q_z.log_prob(z), r.log_prob(a), extra_q, extra_r
            )
            reverse_factor("a_reverse", correction, ["a"])

    return guide


def marginal_elbo(x, mean, var_q):
    """Closed-form ELBO of q(z) = N(mean, var_q) for the conjugate model, per datum."""
    exp_log_prior = -0.5 * math.log(2 * math.pi) - 0.5 * (mean**2 + var_q)
    exp_log_lik = (
        -0.5 * math.log(2 * math.pi * NOISE**2) - 0.5 * ((x - mean) ** 2 + var_q) / NOISE**2
    )
    entropy = 0.5 * math.log(2 * math.pi * math.e * var_q)
    return (exp_log_prior + exp_log_lik + entropy).sum(-1)


def exact_posterior_guide(reverse="exact", num_aux=1):
    loc, sd = posterior(X)
    sa = 0.6 * sd
    sz = math.sqrt(sd**2 - sa**2)
    return make_guide(loc, sa, sz, reverse, num_aux)


@pytest.mark.parametrize(
    "elbo",
    [
        Trace_ELBO(),
        TraceGraph_ELBO(),
        TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False),
        RenyiELBO(alpha=0.0, num_particles=4),
        RenyiELBO(alpha=0.0, num_particles=4, vectorize_particles=True, max_plate_nesting=1),
        Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1),
    ],
    ids=["trace", "tracegraph", "traceenum", "renyi0", "renyi0-vectorized", "trace-vectorized"],
)
@pytest.mark.parametrize("num_aux", [1, 5])
def test_every_elbo_is_exact_when_q_is_the_posterior_and_r_is_exact(elbo, num_aux):
    # q(z) = p(z | x) and r = q(a | z): the weight p(x, z) r / q(a, z) equals p(x) for every
    # draw, so any ELBO that counts the reverse factor with the right sign returns log p(x)
    # with no Monte Carlo error; a dropped or sign-flipped factor would be far off.
    guide = exact_posterior_guide(num_aux=num_aux)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = -elbo.loss(conjugate_model, guide, X)
    assert value == pytest.approx(float(exact_log_px(X).sum()), abs=1e-4)


def test_aux_bound_equals_marginal_elbo_with_common_random_numbers():
    mean, sa, sz = 0.4, 0.7, 0.5
    guide = make_guide(mean, sa, sz)
    guide_trace = poutine.trace(guide).get_trace(X)
    model_trace = poutine.trace(poutine.replay(conjugate_model, guide_trace)).get_trace(X)
    aux = model_trace.log_prob_sum() - guide_trace.log_prob_sum()
    z = guide_trace.nodes["z"]["value"]
    q_z = dist.Normal(mean, math.sqrt(sa**2 + sz**2)).log_prob(z).sum()
    marginal = model_trace.log_prob_sum() - q_z
    assert float(aux) == pytest.approx(float(marginal), abs=1e-5)


def _estimate(elbo_value_fn, draws):
    values = torch.tensor([elbo_value_fn() for _ in range(draws)])
    return float(values.mean()), float(values.std() / math.sqrt(draws))


def test_bounds_stay_below_evidence_for_a_bad_reverse_model():
    mean, sa, sz = 0.2, 0.9, 0.4
    log_px = float(exact_log_px(X).sum())
    marginal = float(marginal_elbo(X, mean, sa**2 + sz**2).sum())
    elbo = Trace_ELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=1)
    single = -elbo.loss(conjugate_model, make_guide(mean, sa, sz, reverse="bad"), X)
    iw = -elbo.loss(conjugate_model, make_guide(mean, sa, sz, reverse="bad", num_aux=32), X)
    renyi = RenyiELBO(alpha=0.0, num_particles=64, vectorize_particles=True, max_plate_nesting=1)
    iw_outer, se = _estimate(
        lambda: -renyi.loss(conjugate_model, make_guide(mean, sa, sz, reverse="bad"), X), 40
    )
    # the bad reverse model costs E KL(q(a|z) || r) > 0 relative to the marginal ELBO
    assert single < marginal - 1.0
    # more auxiliary draws tighten the bound, which stays below the marginal ELBO + MC error
    assert single + 1.0 < iw < marginal + 0.05
    assert iw_outer < log_px + 3 * se
    assert marginal < log_px


def test_log_likelihood_of_an_auxiliary_guide_is_below_the_evidence():
    from lvmkit.inference import log_likelihood

    guide = make_guide(0.2, 0.9, 0.4, reverse="bad")
    estimate = log_likelihood(conjugate_model, guide, X, num_samples=400, chunk_size=200)
    exact = exact_log_px(X)
    assert estimate.shape == (3,)
    assert bool((estimate < exact + 0.05).all())
    exact_guide = exact_posterior_guide()
    tight = log_likelihood(conjugate_model, exact_guide, X, num_samples=20, chunk_size=20)
    assert torch.allclose(tight, exact, atol=1e-4)


def test_check_auxiliary_guide_refuses_an_uncorrected_auxiliary_site():
    def naive_guide(x):
        with pyro.plate("data", x.shape[0]):
            a = pyro.sample(
                "a", dist.Normal(torch.zeros_like(x), 1.0).to_event(1), infer={"is_auxiliary": True}
            )
            pyro.sample("z", dist.Normal(a, 0.5).to_event(1))

    with pytest.raises(ValueError, match="guide site 'a'.*no reverse density"):
        check_auxiliary_guide(conjugate_model, naive_guide, X)
    check_auxiliary_guide(conjugate_model, make_guide(0.0, 1.0, 0.5), X)


def test_equal_mixture_normal_density_and_sampling():
    locs = torch.tensor([[-2.0, 0.0], [2.0, 1.0]])
    scales = torch.tensor([[0.5, 1.0], [0.3, 0.2]])
    mix = EqualMixtureNormal(locs, scales)
    value = torch.tensor([0.3, -0.1])
    expected = torch.logsumexp(dist.Normal(locs, scales).log_prob(value).sum(-1), 0) - math.log(2)
    assert torch.allclose(mix.log_prob(value), expected)
    draws = mix.expand((5,)).rsample((4000,))
    assert draws.shape == (4000, 5, 2)
    assert draws[..., 0].mean().abs() < 0.1  # equal weights: first coordinate mean 0
    with pytest.raises(ValueError, match="share a shape"):
        EqualMixtureNormal(locs, scales[:1])


def constrained_model():
    scale = pyro.sample("scale", dist.LogNormal(0.0, 0.5))
    loc = pyro.sample("loc", dist.Normal(0.0, 2.0))
    with pyro.plate("obs", 4):
        pyro.sample("y", dist.Normal(loc, scale), obs=torch.tensor([0.5, 1.0, 1.5, 0.7]))


@pytest.mark.parametrize(
    "elbo",
    [
        Trace_ELBO(),
        TraceGraph_ELBO(),
        RenyiELBO(alpha=0.0, num_particles=3, vectorize_particles=True, max_plate_nesting=1),
        TraceEnum_ELBO(max_plate_nesting=1, strict_enumeration_warning=False),
    ],
    ids=["trace", "tracegraph", "renyi0", "traceenum"],
)
def test_autohvm_trains_with_every_elbo_without_warnings(elbo):
    guide = AutoHVM(constrained_model, num_aux_samples=2, hidden=(16,))
    svi = SVI(constrained_model, guide, Adam({"lr": 0.01}), elbo)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses = [svi.step() for _ in range(5)]
    assert all(math.isfinite(v) for v in losses)
    samples = Predictive(constrained_model, guide=guide, num_samples=50)()
    # Predictive pads scalar sites with the plate's singleton dim: (50, 1)
    assert samples["scale"].squeeze(-1).shape == (50,)
    assert bool((samples["scale"] > 0).all())
    assert samples["loc"].squeeze(-1).shape == (50,)
    assert set(samples) == {"scale", "loc", "y"}  # the auxiliary sites are not model sites


def test_autohvm_with_enumerated_discrete_model_sites():
    @config_enumerate
    def mixture(data):
        loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 3.0).to_event(1))
        with pyro.plate("data", data.shape[0]):
            which = pyro.sample("which", dist.Categorical(torch.ones(2) / 2))
            pyro.sample("obs", dist.Normal(loc[which], 1.0), obs=data)

    data = torch.tensor([-2.0, -1.5, 2.0, 2.5])
    guide = AutoHVM(poutine.block(mixture, hide=["which"]), hidden=(16,))
    svi = SVI(mixture, guide, Adam({"lr": 0.01}), TraceEnum_ELBO(max_plate_nesting=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        losses = [svi.step(data) for _ in range(5)]
    assert all(math.isfinite(v) for v in losses)
    with pytest.raises(ValueError, match="'which'"):
        AutoHVM(mixture)(data)


def test_autohvm_refuses_discrete_site_and_bad_reverse_shape():
    def discrete_model():
        pyro.sample("coin", dist.Bernoulli(0.3))

    with pytest.raises(ValueError, match="AutoHVM.*'coin'"):
        AutoHVM(discrete_model)()

    def model():
        pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    def wrong_reverse(u):
        return dist.Normal(torch.zeros(u.shape[:-1] + (5,)), 1.0).to_event(1)

    guide = AutoHVM(model, aux_dim=2, reverse=wrong_reverse)
    with pytest.raises(ValueError, match=r"event shape \(5,\).*\(2,\)"):
        guide()
    with pytest.raises(ValueError, match="num_aux_samples"):
        AutoHVM(model, num_aux_samples=-1)


def test_autohvm_bound_is_valid_on_conjugate_model():
    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, NOISE).to_event(1), obs=X[0])

    guide = AutoHVM(model, hidden=(16,), num_aux_samples=4)
    svi = SVI(
        model, guide, Adam({"lr": 0.01}), Trace_ELBO(num_particles=8, vectorize_particles=True)
    )
    for _ in range(150):
        svi.step()
    elbo = Trace_ELBO(num_particles=4000, vectorize_particles=True)
    value = -elbo.loss(model, guide)
    log_px = float(exact_log_px(X[0]))
    assert value < log_px + 0.02
    assert value > log_px - 0.5  # it has learned something


def test_autohvm_beats_autonormal_on_multimodal_target():
    target = RingOfModes()
    evaluation = Trace_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=0)

    def train(guide, steps):
        svi = SVI(
            target.model,
            guide,
            Adam({"lr": 0.01}),
            Trace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=0),
        )
        for _ in range(steps):
            svi.step()
        return -evaluation.loss(target.model, guide)

    normal = train(AutoNormal(target.model), 300)
    pyro.clear_param_store()
    hvm = train(AutoHVM(target.model, hidden=(32,)), 400)
    assert hvm < target.log_Z + 0.02
    assert target.log_Z - hvm < 0.75 * (target.log_Z - normal)


def test_auxiliary_encoder_with_vae_shapes_and_bound():
    from lvmkit.models import VAE

    x = torch.bernoulli(torch.full((6, 8), 0.4))
    vae = VAE(8, z_dim=3, hidden=(10,))
    encoder = AuxiliaryEncoder(8, 3, 2, hidden=(10,), num_aux_samples=3)
    guide_trace = poutine.trace(encoder).get_trace(x)
    assert guide_trace.nodes["a"]["value"].shape == (6, 2)
    assert guide_trace.nodes["z"]["value"].shape == (6, 3)
    assert guide_trace.nodes["a_reverse"]["fn"].log_factor.shape == (6,)
    check_auxiliary_guide(vae, encoder, x)
    svi = SVI(vae, encoder, Adam({"lr": 0.01}), Trace_ELBO())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = sum(svi.step(x) for _ in range(5))
        for _ in range(40):
            svi.step(x)
        last = sum(svi.step(x) for _ in range(5))
    assert last < first
    with pytest.raises(ValueError, match="site 'x'"):
        encoder(torch.zeros(6, 7))


@pytest.mark.parametrize(
    "name",
    [
        "NVILELBO",
        "ARMELBO",
        "DisARMELBO",
        "RebarELBO",
        "RelaxELBO",
        "ConcreteELBO",
        "VIMCOELBO",
    ],
)
def test_lvmkit_estimators_count_the_reverse_factor(name):
    import lvmkit.inference

    cls = getattr(lvmkit.inference, name)
    elbo = cls(num_particles=4) if name == "VIMCOELBO" else cls()
    value = -elbo.loss(conjugate_model, exact_posterior_guide(num_aux=3), X)
    assert value == pytest.approx(float(exact_log_px(X).sum()), abs=1e-4)


def test_autohvm_components_can_start_at_prior_draws():
    guide = AutoHVM(constrained_model, num_components=5, component_spread=None, hidden=(8,))
    guide()
    locs = guide.aux_locs.detach()
    assert locs.shape == (5, 2)
    assert float(locs.std(0).min()) > 0.05  # distinct draws, not all at the init point
    loss = Trace_ELBO().loss(constrained_model, guide)
    assert math.isfinite(loss)


# -- IWHVI as published: K reverse draws plus a_0, DReG for the reverse model -------------
SIGMA_V = 0.6


def _toy_iwhvi(shift, log_s, v, num_samples, dreg):
    """q(a) = N(0, 1), q(v | a) = N(a, SIGMA_V^2), τ(a | v) = N(c v + shift, e^{2 log_s}):
    the exact log q(v) is log N(v; 0, 1 + SIGMA_V^2) and the exact posterior has
    c = 1 / (1 + SIGMA_V^2)."""
    from lvmkit.guides.hierarchical import iwhvi_log_q_hat

    c = 1 / (1 + SIGMA_V**2)
    generator = dist.Normal(torch.zeros_like(v), 1.0)
    a0 = generator.sample()  # not the exact ancestral draw; fine for gradient checks

    def log_joint(a, detach):
        return dist.Normal(0.0, 1.0).log_prob(a).sum(-1) + dist.Normal(a, SIGMA_V).log_prob(v).sum(
            -1
        )

    def reverse_params(v_, detach):
        s_, ls = (shift.detach(), log_s.detach()) if detach else (shift, log_s)
        return c * v_ + s_, ls.exp().expand_as(v_)

    return iwhvi_log_q_hat(log_joint, reverse_params, a0, v, num_samples, dreg=dreg)


def test_iwhvi_dreg_gradient_is_unbiased_and_less_noisy():
    torch.manual_seed(0)
    n = 4000
    grads = {}
    for dreg in (False, True):
        # one copy of the parameters per draw, so that one backward pass gives per-draw
        # gradients
        shift = torch.full((n, 1), 0.4, requires_grad=True)
        log_s = torch.full((n, 1), math.log(0.9), requires_grad=True)
        value = _toy_iwhvi(shift, log_s, torch.randn(n, 1), 16, dreg)
        grads[dreg] = torch.cat(torch.autograd.grad(value.sum(), [shift, log_s]), -1)
    plain, dreg = grads[False], grads[True]
    for j in range(2):
        se = math.sqrt(plain[:, j].var() / n + dreg[:, j].var() / n)
        assert abs(float(plain[:, j].mean() - dreg[:, j].mean())) < 4 * se
    # the signal-to-noise ratio is what DReG improves at large K (Tucker et al. 2019)
    assert float(dreg.var(0).sum()) < 0.5 * float(plain.var(0).sum())


@pytest.mark.parametrize("dreg", [False, True])
def test_iwhvi_value_is_the_published_estimate(dreg):
    # K = 0 is the HVM term log q(a0) + log q(v | a0) - log τ(a0 | v): no reverse draw
    torch.manual_seed(1)
    shift, log_s = torch.tensor(0.3), torch.tensor(-0.2)
    v = torch.randn(5, 1)
    torch.manual_seed(2)
    value = _toy_iwhvi(shift, log_s, v, 0, dreg)
    torch.manual_seed(2)
    a0 = torch.randn(5, 1)
    c = 1 / (1 + SIGMA_V**2)
    expected = (
        dist.Normal(0.0, 1.0).log_prob(a0)
        + dist.Normal(a0, SIGMA_V).log_prob(v)
        - dist.Normal(c * v + shift, log_s.exp()).log_prob(a0)
    ).sum(-1)
    assert torch.allclose(value, expected, atol=1e-5)


def test_iwhvi_upper_bound_decreases_monotonically_in_K_to_log_q():
    # a_0 drawn exactly from q(a | v): E log q̂ >= log q(v), decreasing in K (K+1 terms)
    torch.manual_seed(3)
    from lvmkit.guides.hierarchical import iwhvi_log_q_hat

    n = 40000
    a0 = torch.randn(n, 1)
    v = a0 + SIGMA_V * torch.randn(n, 1)
    exact = dist.Normal(0.0, math.sqrt(1 + SIGMA_V**2)).log_prob(v).sum(-1)

    def log_joint(a, detach):
        return dist.Normal(0.0, 1.0).log_prob(a).sum(-1) + dist.Normal(a, SIGMA_V).log_prob(v).sum(
            -1
        )

    def bad_reverse(v_, detach):
        return 0.2 * v_ - 0.3, torch.full_like(v_, 1.2)

    means, ses = [], []
    for K in (0, 1, 4, 16):
        gap = iwhvi_log_q_hat(log_joint, bad_reverse, a0, v, K) - exact
        means.append(float(gap.mean()))
        ses.append(float(gap.std()) / math.sqrt(n))
    assert means[0] > 0.2  # the bad reverse model costs E KL(q(a|v) || τ) at K = 0
    for before, after, se_b, se_a in zip(means, means[1:], ses, ses[1:], strict=False):
        assert after < before + 2 * math.hypot(se_b, se_a)
    assert means[-1] > -3 * ses[-1]  # still an upper bound on log q(v)
    assert means[-1] < 0.35 * means[0]


def _bound(target_model, guide, num_aux_samples, reps=4, particles=4000):
    guide.num_aux_samples = num_aux_samples
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=0)
    with torch.no_grad():
        values = torch.tensor([-elbo.loss(target_model, guide) for _ in range(reps)])
    return float(values.mean()), float(values.std()) / math.sqrt(reps)


def test_more_auxiliary_draws_never_loosen_a_trained_guides_bound():
    from lvmkit.models.targets import Banana

    target = Banana(curvature=0.8)
    pyro.set_rng_seed(4)
    guide = AutoHVM(target.model, hidden=(16,), num_components=4, num_aux_samples=2)
    svi = SVI(
        target.model,
        guide,
        Adam({"lr": 0.01}),
        Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=0),
    )
    for _ in range(300):
        svi.step()
    results = [_bound(target.model, guide, K) for K in (0, 1, 4, 16)]
    for (before, se_b), (after, se_a) in zip(results, results[1:], strict=False):
        assert after > before - 2 * math.hypot(se_b, se_a)
    assert results[-1][0] > results[0][0] + 0.02  # K = 16 is really tighter than HVM's K = 0
    assert results[-1][0] < target.log_Z + 3 * results[-1][1]


@pytest.mark.parametrize("num_flows", [1, 2])
def test_autohvm_with_flows_is_a_valid_bound_and_learns(num_flows):
    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, NOISE).to_event(1), obs=torch.tensor([1.0, -0.5]))

    log_px = float(exact_log_px(torch.tensor([1.0, -0.5])))
    pyro.set_rng_seed(0)
    guide = AutoHVM(model, hidden=(16,), num_flows=num_flows, num_aux_samples=2)
    svi = SVI(
        model, guide, Adam({"lr": 0.01}), Trace_ELBO(num_particles=8, vectorize_particles=True)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(200):
            svi.step()
    value, se = _bound(model, guide, 2)
    assert value < log_px + 3 * se + 1e-3
    assert value > log_px - 0.3
    assert len(guide.flows) == num_flows
    samples = Predictive(model, guide=guide, num_samples=500)()["z"]
    assert samples.shape == (500, 2)


def test_autohvm_latent_density_matches_its_transform():
    # log q(u | a0) of the latent site is log q(v | a0) - log|det T'(v)|, whatever the flows
    pyro.set_rng_seed(1)
    guide = AutoHVM(constrained_model, hidden=(8,), num_flows=1)
    trace = poutine.trace(guide).get_trace()
    site = trace.nodes[f"_{guide._pyro_name}_latent"]
    u = site["value"]
    transform = guide.transform()
    v = transform.inv(u)
    a0 = trace.nodes[f"_{guide._pyro_name}_aux"]["value"]
    expected = guide.conditional(a0).log_prob(v) - transform.log_abs_det_jacobian(v, u)
    assert torch.allclose(site["fn"].log_prob(u), expected, atol=1e-4)


def test_equal_mixture_draws_are_stratified_but_each_is_uniform():
    locs = torch.arange(8.0).unsqueeze(-1) * 100  # component k sits at 100 k
    mix = EqualMixtureNormal(locs, torch.full_like(locs, 1e-3)).expand((16,))
    counts = torch.zeros(8)
    for _ in range(200):
        which = (mix.rsample() / 100).round().long().squeeze(-1)
        per_call = torch.bincount(which, minlength=8)
        assert per_call.tolist() == [2] * 8  # every component, every call
        counts[which[0]] += 1  # the first draw alone is uniform over the components
    assert float(counts.min()) > 5


def test_default_autohvm_finds_the_modes_of_a_target_seen_through_squares():
    # each coordinate is observed only through its square: eight symmetric modes at
    # (±sqrt(y1), ±sqrt(y2), ±sqrt(y3)); a Gaussian covering one of them misses about
    # 3 log 2 nats. The old defaults' components fell into one or two modes and did far
    # worse than that.
    from lvmkit.models.target_suite import SquaredObservationTarget

    target = SquaredObservationTarget([2.5, 1.8, 3.0], [0.4, 0.5, 0.6])
    pyro.set_rng_seed(0)
    guide = AutoHVM(target.model)
    svi = SVI(
        target.model,
        guide,
        Adam({"lr": 5e-3}),
        Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=0),
    )
    for _ in range(300):
        svi.step()
    value, se = _bound(target.model, guide, guide.num_aux_samples, reps=2, particles=2000)
    # old defaults: 15 nats here; new: about 1.5 after these few steps
    assert target.log_Z - value < 3 * math.log(2)


def test_residual_gaussian_is_one_parameter_tensor_and_starts_at_the_identity():
    # one tensor instead of one per layer (Pyro keeps a torch optimizer per tensor); the
    # output layer starts at zero, so loc = P (v - v0) and scale = init_scale exactly
    from lvmkit.guides.hierarchical import _ResidualGaussian

    net = _ResidualGaussian(3, 2, (5, 4), init_scale=0.3)
    assert [name for name, _ in net.named_parameters()] == ["flat"]
    assert net.flat.numel() == (3 * 5 + 5) + (5 * 4 + 4) + (4 * 4 + 4)
    v = torch.randn(6, 3)
    loc, scale = net(v, v0=1.0)
    assert torch.allclose(loc, (v - 1.0)[:, :2])
    assert torch.allclose(scale, torch.full((6, 2), 0.3), atol=1e-3)
    with torch.no_grad():
        net.flat.normal_()
    loc, scale = net(v, detach=True)
    assert not loc.requires_grad and not scale.requires_grad
    v.requires_grad_(True)
    loc, _ = net(v, detach=True)
    (grad,) = torch.autograd.grad(loc.sum(), v)  # v stays live when the weights are held
    assert grad.abs().sum() > 0
    loc_live, _ = net(v.detach())
    (g_flat,) = torch.autograd.grad(loc_live.sum(), net.flat)
    assert g_flat.abs().sum() > 0


def test_laplace_init_starts_at_the_mean_field_optimum_of_a_gaussian():
    # for a Gaussian posterior with precision L the reverse-KL mean-field optimum has
    # variances 1 / L_ii: the guide's global scale starts there, whatever init_scale says
    cov = torch.tensor([[1.0, 0.6, 0.0], [0.6, 0.5, 0.1], [0.0, 0.1, 4.0]])
    loc = torch.tensor([1.0, -2.0, 0.5])

    def model():
        pyro.sample("z", dist.MultivariateNormal(loc, cov))

    pyro.set_rng_seed(0)
    # the Hessian of a Gaussian is the same everywhere: no search needed
    guide = AutoHVM(model, init_scale=1.0, laplace_init=True, init_search=0)
    guide()
    expected = torch.linalg.inv(cov).diagonal().rsqrt()
    assert torch.allclose(guide.log_scale0.exp().detach(), expected, rtol=1e-4)
    pyro.clear_param_store()
    off = AutoHVM(model, init_scale=0.7, init_search=0)  # the default: no Laplace
    off()
    assert torch.allclose(off.log_scale0.exp().detach(), torch.full((3,), 0.7))


def test_laplace_init_keeps_init_scale_where_the_curvature_is_not_positive():
    # u0 at a local minimum of the density in the first coordinate (log p = +z1^2 / 2 near
    # 0, bounded by the quartic): its curvature is negative, so that coordinate falls back
    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.factor("bump", z[..., 0] ** 2 - 0.05 * z[..., 0] ** 4)

    pyro.set_rng_seed(0)
    guide = AutoHVM(model, init_scale=0.6, init_search=0, laplace_init=True)
    guide()
    scale = guide.log_scale0.exp().detach()
    assert torch.allclose(scale, torch.tensor([0.6, 1.0]), atol=1e-5)


def test_component_means_keep_their_positions_under_the_laplace_scale():
    # the searched component means are found in units of init_scale and rescaled to the
    # Laplace scale: u0 + s * a must land on the same points either way
    from lvmkit.models.target_suite import SquaredObservationTarget

    target = SquaredObservationTarget([2.5, 1.8], [0.4, 0.5])
    points = []
    for laplace in (False, True):
        pyro.clear_param_store()
        pyro.set_rng_seed(3)  # the same search either way
        guide = AutoHVM(target.model, laplace_init=laplace, init_search=64,
                        mode_search_steps=0)
        guide()
        with torch.no_grad():
            points.append(guide.loc0 + guide.log_scale0.exp() * guide.aux_locs)
    assert torch.allclose(points[0], points[1], atol=1e-5)


def test_components_start_at_distinct_modes_found_by_the_search():
    # three separated modes in 4-D: the searched candidates climb to their local maxima, so
    # each mode gets a component at it (the raw candidates alone land between modes)
    from lvmkit.models.target_suite import GaussianMixtureTarget

    locs = torch.tensor([[3.0, 0.0, 0.0, 1.0], [-2.0, 2.0, 0.0, 0.0], [0.0, -2.5, 1.5, -1.0]])
    weights = torch.tensor([0.4, 0.3, 0.3], dtype=torch.float64)
    target = GaussianMixtureTarget(locs, torch.full((3, 4), 0.4), weights)

    def nearest(guide):
        with torch.no_grad():
            points = guide.loc0 + guide.log_scale0.exp() * guide.aux_locs
        return torch.cdist(locs.float(), points).amin(-1)

    pyro.set_rng_seed(0)
    guide = AutoHVM(target.model, num_components=4)
    guide()
    assert (nearest(guide) < 0.3).all()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    raw = AutoHVM(target.model, num_components=4, mode_search_steps=0)
    raw()
    assert not (nearest(raw) < 0.3).all()



def test_component_allocation_is_the_exact_reverse_kl_minimiser():
    # against brute force over every way of splitting the components, on random masses
    import itertools

    from lvmkit.guides.hierarchical import _allocate_components

    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        modes = int(torch.randint(2, 5, (), generator=generator))
        count = int(torch.randint(2, 9, (), generator=generator))
        log_masses = 2 * torch.randn(modes, generator=generator, dtype=torch.float64)
        weights = torch.softmax(log_masses, 0)

        def kl(counts, weights=weights, count=count):
            return sum((n / count) * math.log(n / (count * float(w)))
                       for n, w in zip(counts, weights, strict=True) if n)

        best = min(kl(c) for c in itertools.product(range(count + 1), repeat=modes)
                   if sum(c) == count)
        got = _allocate_components(log_masses, count)
        assert sum(got) == count
        assert kl(got) <= best + 1e-12
    # a mode 800 nats lighter: its weight underflows, and it gets nothing
    assert _allocate_components(torch.tensor([0.0, -800.0], dtype=torch.float64), 3) == [3, 0]


def test_laplace_mass_of_a_gaussian_is_its_normaliser():
    # Laplace's method is exact for a Gaussian: C N(z; m, S) has mass C, correlations included
    cov = torch.tensor([[1.0, 0.6, 0.0], [0.6, 2.0, -0.3], [0.0, -0.3, 0.5]])
    mean = torch.tensor([1.0, -2.0, 0.5])
    log_c = 1.7

    def model():
        z = pyro.sample("z", dist.Normal(0.0, 5.0).expand([3]).to_event(1))
        gaussian = dist.MultivariateNormal(mean, cov)
        pyro.factor("f", gaussian.log_prob(z) + log_c - dist.Normal(0.0, 5.0).log_prob(z).sum())

    guide = AutoHVM(model, init_search=0)
    guide._setup_prototype()
    # from a point off the mode: Newton's steps reach it, and the mass is C's
    mode, log_mass = guide._laplace_log_mass(mean + torch.tensor([0.3, -0.2, 0.1]))
    assert torch.allclose(mode, mean, atol=1e-4)
    assert abs(log_mass - log_c) < 1e-4
    # not at a mode of a density with a saddle: no mass
    def saddle():
        z = pyro.sample("z", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
        pyro.factor("f", z[0] ** 2 - z[1] ** 2 - dist.Normal(0.0, 5.0).log_prob(z).sum())

    guide = AutoHVM(saddle, init_search=0)
    guide._setup_prototype()
    assert guide._laplace_log_mass(torch.zeros(2)) is None

    # a non-Gaussian mode (log p = -z^4 / 4 - z^2 / 2 per coordinate, in float64) needs
    # several Newton steps from afar; the mass is that of the quadratic at the mode
    def quartic():
        z = pyro.sample("z", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
        pyro.factor("f", (-z**4 / 4 - z**2 / 2).sum() - dist.Normal(0.0, 5.0).log_prob(z).sum())

    guide = AutoHVM(quartic, init_search=0)
    guide._setup_prototype()
    mode, log_mass = guide._laplace_log_mass(torch.tensor([0.6, -0.5], dtype=torch.float64))
    assert torch.allclose(mode, torch.zeros(2, dtype=torch.float64), atol=1e-4)
    assert abs(log_mass - math.log(2 * math.pi)) < 1e-6  # det(-H) = 1 at the mode


def test_components_are_shared_out_by_the_modes_masses():
    # two separated modes holding 0.8 and 0.2 of the mass: eight equal components start
    # six at the heavy mode and two at the light one (one each, as before, would give the
    # light mode half of q); with equal masses, one at each mode and the spares elsewhere
    from lvmkit.models.target_suite import GaussianMixtureTarget

    locs = torch.tensor([[3.0, 0.0, 1.0], [-2.0, 2.0, -1.0]])

    def shares(weights, mode_weighting):
        target = GaussianMixtureTarget(locs, torch.full((2, 3), 0.5),
                                       torch.tensor(weights, dtype=torch.float64))
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoHVM(target.model, mode_weighting=mode_weighting)
        guide()
        with torch.no_grad():
            points = guide.loc0 + guide.log_scale0.exp() * guide.aux_locs
        distance = torch.cdist(points, locs.float())
        # the search's climbs end within a few tenths of a mode; spares start far away
        at_mode = distance.amin(-1) < 0.5
        return torch.bincount(distance.argmin(-1)[at_mode], minlength=2).tolist(), points

    weighted, _ = shares([0.8, 0.2], True)
    assert weighted == [6, 2], weighted  # the reverse-KL optimum for 0.8 / 0.2
    unweighted, _ = shares([0.8, 0.2], False)
    assert unweighted == [1, 1], unweighted
    equal, points = shares([0.5, 0.5], True)
    assert equal == [1, 1], equal  # both modes found, one component each
    assert (torch.cdist(points, locs.float()).amin(0) < 1e-3).all()  # at the modes exactly
    # distinct modes of almost equal mass (a log ratio of 0.04) are not symmetric copies:
    # their masses differ by far more than rounding error, and they share all eight
    close, _ = shares([0.51, 0.49], True)
    assert close == [4, 4], close


def test_symmetric_copies_of_a_large_float32_model_count_as_copies():
    # 20,000 float32 observations seen through z0^2: the two sign-flipped modes are exact
    # copies, but at |log p| ~ 28,000 float32 rounds their Laplace masses apart by more than
    # 1e-3 nats; they must still count as copies (one component each, spares elsewhere)
    # rather than be weighted as distinct modes of equal mass
    from lvmkit.guides.hierarchical import _EQUAL_MASSES

    generator = torch.Generator().manual_seed(0)
    y = 4.0 + torch.randn(20000, generator=generator)

    def model(y):
        z = pyro.sample("z", dist.Normal(0.0, 3.0).expand([2]).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(z[0] * z[0] + 0.5 * z[1], 1.0), obs=y)

    pyro.set_rng_seed(0)
    guide = AutoHVM(model, mode_search_steps=0)
    guide._setup_prototype(y)
    starts = torch.tensor([[2.0, 0.1], [-1.999, 0.11]])
    masses = [guide._laplace_log_mass(u, y) for u in starts]
    assert all(m is not None for m in masses)
    assert abs(masses[0][0][0] + masses[1][0][0]) < 1e-3  # mirrored modes
    assert abs(masses[0][1] - masses[1][1]) > _EQUAL_MASSES  # float32 rounding
    with torch.no_grad():
        placement = guide._components_by_mass(starts, y)
    assert placement is not None
    points, weighted = placement
    assert not weighted and len(points) == 2


def test_exploring_climbs_start_far_from_the_modes_found():
    # the search's climbs found one of two modes; the exploring climbs start from the
    # better-scored candidates farthest from it, and find the other
    from lvmkit.models.target_suite import GaussianMixtureTarget

    locs = torch.tensor([[-3.0, 0.0], [3.0, 0.5]])
    target = GaussianMixtureTarget(locs, torch.full((2, 2), 0.5),
                                   torch.tensor([0.6, 0.4], dtype=torch.float64))
    pyro.set_rng_seed(0)
    guide = AutoHVM(target.model, num_components=2, init_search=0)
    guide._setup_prototype()
    generator = torch.Generator().manual_seed(1)
    candidates = torch.cat([locs[0] + torch.randn(30, 2, generator=generator),
                            locs[1] + torch.randn(10, 2, generator=generator)])
    scores = torch.tensor([guide._log_joint_at(c) for c in candidates])
    with torch.no_grad():
        found = guide._explored_modes(locs[:1], candidates, scores)
    assert len(found) >= 2
    assert torch.equal(found[0], locs[0])  # the modes given come first, unchanged
    assert float(torch.cdist(found[1:], locs[1:]).min()) < 0.3


def test_an_exploring_climb_off_any_mode_is_left_out_not_a_veto():
    # the search's own modes must all verify; an exploring climb's mode that does not is
    # dropped, and the others are still weighed
    from lvmkit.models.target_suite import GaussianMixtureTarget

    locs = torch.tensor([[-3.0, 0.0], [3.0, 0.5]])
    target = GaussianMixtureTarget(locs, torch.full((2, 2), 0.5),
                                   torch.tensor([0.75, 0.25], dtype=torch.float64))
    pyro.set_rng_seed(0)
    guide = AutoHVM(target.model, init_search=0)
    guide._setup_prototype()
    far = torch.tensor([40.0, 40.0])
    real = guide._laplace_log_mass

    def unverified_far_away(u, *args, **kwargs):
        return None if float(u.norm()) > 20 else real(u, *args, **kwargs)

    guide._laplace_log_mass = unverified_far_away
    guide._climb = lambda point, steps, *a, **k: (point, 0.0)  # modes given are exact
    modes = torch.cat([locs, far[None]])
    with torch.no_grad():
        points, weighted = guide._components_by_mass(modes, required=2)
        assert weighted
        counts = torch.cdist(points, locs).argmin(-1).bincount(minlength=2).tolist()
        assert counts == [6, 2], counts
        assert guide._components_by_mass(modes) is None  # as one of the search's own


def test_mode_search_does_not_climb_down_an_unbounded_neck():
    """A density that grows without bound along a neck has no mode there. Climbing the
    density itself runs down it (here ``log p = -log s - x^2 / 2s^2`` per coordinate in
    ``log s``: unbounded as ``s -> 0`` at ``x = 0``); climbing the expected log density over
    a component-sized ball stops where a component of that width fits."""

    def model():
        log_s = pyro.sample("log_s", dist.Normal(0.0, 3.0))
        x = pyro.sample("x", dist.Normal(0.0, 3.0).expand([4]).to_event(1))
        pyro.factor("neck", dist.Normal(0.0, log_s.exp()).log_prob(x).sum())

    lowest = {}
    for smoothing in (0.0, 1.0):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoHVM(model, num_components=2, init_search=32, mode_search_steps=60,
                        mode_search_smoothing=smoothing)
        points = torch.zeros(4, 5)
        points[:, 0] = torch.tensor([-1.0, -0.5, 0.0, 0.5])
        guide._setup_prototype()
        with torch.no_grad():
            modes = guide._distinct_modes(points)
        lowest[smoothing] = float(modes[:, 0].min())
    assert lowest[0.0] < lowest[1.0] - 1.0, lowest
    with pytest.raises(ValueError, match="mode_search_smoothing"):
        AutoHVM(model, mode_search_smoothing=-1.0)


@pytest.mark.parametrize("guide_class", ["AutoDiagonalNormal", "AutoIAFNormal", "AutoHVM",
                                         "AutoGuideList"])
def test_check_auxiliary_guide_accepts_joint_autoguides(guide_class):
    """An AutoContinuous guide's joint latent is a bijection of the model's latents, not an
    auxiliary variable: check_auxiliary_guide refused every one of them before."""
    from pyro.infer import autoguide

    from lvmkit.guides.hierarchical import check_auxiliary_guide

    def model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.LogNormal(a, 1.0).expand([2]).to_event(1))

    pyro.clear_param_store()
    if guide_class == "AutoHVM":
        guide = AutoHVM(model)
    elif guide_class == "AutoGuideList":
        guide = autoguide.AutoGuideList(model)
        guide.append(autoguide.AutoDiagonalNormal(poutine.block(model, expose=["a"])))
        guide.append(autoguide.AutoDiagonalNormal(poutine.block(model, expose=["b"])))
    else:
        guide = getattr(autoguide, guide_class)(model)
    check_auxiliary_guide(model, guide)  # raised ValueError before

    class Leaky(autoguide.AutoDiagonalNormal):  # a genuine auxiliary, no reverse density
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            pyro.sample("extra", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True})
            return out

    with pytest.raises(ValueError, match="guide site 'extra'"):
        check_auxiliary_guide(model, Leaky(model))


def test_custom_reverse_runs_with_the_default_no_extra_draws():
    """Regression (found by a review): AutoHVM(reverse=...) with the default
    num_aux_samples=0 crashed ("cannot reshape tensor of 0 elements"). K = 0 is the plain
    auxiliary bound, whose estimate of log q(z) is log q(a0, z) - log r(a0 | z)."""
    from pyro.infer import Trace_ELBO

    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoHVM(model, reverse=lambda v: dist.Normal(v, 0.3).to_event(1), init_search=8)
    for elbo in (Trace_ELBO(), Trace_ELBO(num_particles=4, vectorize_particles=True,
                                          max_plate_nesting=0)):
        assert math.isfinite(elbo.loss(model, guide))
    # the bound stays below the evidence (log Z = 0 here) within Monte-Carlo error
    elbo = Trace_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=0)
    assert -elbo.loss(model, guide) < 0.05
