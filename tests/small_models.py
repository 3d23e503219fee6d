"""Tiny model/guide pairs shared by the estimator tests, and their helpers.

Small enough that every discrete configuration can be enumerated for exact gradients.
"""

import zlib

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch

D, H = 3, 2


# Toy problem E[(b - t)^2], b ~ Bernoulli(sigmoid(theta)), theta = 0, t = 0.45 (Tucker et
# al. 2017, Section 6.1): log p(b) - log q(b) = 0 at theta = 0, so the ELBO integrand is
# -(b - t)^2; the score-function gradient has variance 0.01594.
T = 0.45


def toy_model():
    b = pyro.sample("b", dist.Bernoulli(0.5))
    pyro.factor("f", -((b - T) ** 2))


def toy_guide():
    theta = pyro.param("theta", torch.tensor(0.0))
    pyro.sample("b", dist.Bernoulli(logits=theta))


def _init(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.7


def make_pair(*, layers=1, subsample=False, continuous=False, categorical=False, bernoulli=True):
    """A tiny model/guide pair: few enough configurations to enumerate exactly."""

    def plate(x):
        return pyro.plate("data", x.shape[0], subsample_size=2 if subsample else None)

    def model(x):
        w = pyro.param("w", _init(H, D, seed=1))
        with plate(x) as idx:
            xb = x[idx]
            logits = torch.zeros(len(idx), D)
            if bernoulli:
                if layers == 2:
                    top_prior = pyro.param("top_prior", _init(1, seed=2))
                    w2 = pyro.param("w2", _init(1, H, seed=3))
                    top = pyro.sample(
                        "top", dist.Bernoulli(logits=top_prior).expand([len(idx), 1]).to_event(1)
                    )
                    z_logits = top @ w2
                else:
                    z_logits = pyro.param("prior", _init(H, seed=4)).expand(len(idx), H)
                z = pyro.sample("z", dist.Bernoulli(logits=z_logits).to_event(1))
                logits = logits + z @ w
            if categorical:
                wc = pyro.param("wc", _init(3, D, seed=5))
                c = pyro.sample("c", dist.OneHotCategorical(logits=torch.zeros(len(idx), 3)))
                logits = logits + c @ wc
            if continuous:
                a = pyro.param("a", _init(1, D, seed=6))
                y = pyro.sample("y", dist.Normal(0.0, 1.0).expand([len(idx), 1]).to_event(1))
                logits = logits + y @ a
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=xb)

    def guide(x):
        with plate(x) as idx:
            xb = x[idx]
            z_sum = torch.zeros(len(idx), 1)
            if bernoulli:
                v = pyro.param("v", _init(D, H, seed=7))
                z = pyro.sample("z", dist.Bernoulli(logits=xb @ v - 0.2).to_event(1))
                z_sum = z.sum(-1, keepdim=True)
                if layers == 2:
                    v2 = pyro.param("v2", _init(H, 1, seed=8))
                    pyro.sample("top", dist.Bernoulli(logits=z @ v2 + 0.3).to_event(1))
            if categorical:
                vc = pyro.param("vc", _init(D, 3, seed=9))
                pyro.sample("c", dist.OneHotCategorical(logits=xb @ vc))
            if continuous:
                m = pyro.param("m", _init(D, 1, seed=10))
                pyro.sample("y", dist.Normal(xb @ m + 0.5 * z_sum, 0.8).to_event(1))

    return model, guide


X2 = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
X4 = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def create_params(model, guide, x) -> None:
    """Run the guide and the model once, so that every param exists in the store."""
    poutine.trace(poutine.replay(model, poutine.trace(guide).get_trace(x))).get_trace(x)


def grads_of(elbo, model, guide, x, seed: int, via: str) -> dict[str, torch.Tensor]:
    """Param-store gradients of one estimate drawn with ``seed``, through
    ``loss_and_grads`` (``via="svi"``) or the ``nn.Module`` form (``via="module"``)."""
    create_params(model, guide, x)
    pyro.set_rng_seed(seed)
    params = dict(pyro.get_param_store().named_parameters())
    for p in params.values():
        p.grad = None
    if via == "svi":
        elbo.loss_and_grads(model, guide, x)
    else:
        elbo(model, guide)(x).backward()
    return {n: p.grad.clone() for n, p in params.items() if p.grad is not None}


def fixed_uniforms():
    """A ``draw_uniform`` whose draws depend only on (site, role, how many times that pair
    was drawn), not on the order of the calls or the device: two code paths that draw the
    same noises in different orders, or on CPU and GPU, then see the same numbers (drawn on
    the CPU, then moved to the device asked for)."""
    from lvmkit.inference.estimators import _relax

    counts: dict[tuple[str, str], int] = {}
    # Within one step (one StepNoise: a particle's passes, fused or not) a (site, role)
    # pair gets the same numbers however often it is drawn, as from StepNoise itself.
    in_step: dict[tuple[int, str, str], int] = {}
    steps = []  # alive, so that their ids are not reused

    def draw(shape, like, site, role):
        key = (site, role)
        step = _relax._STEPS[-1] if _relax._STEPS else None
        tag = None if step is None else (id(step), site, role)
        if tag is not None and tag in in_step:
            count = in_step[tag]
        else:
            counts[key] = counts.get(key, 0) + 1
            count = counts[key]
            if tag is not None:
                in_step[tag] = count
                steps.append(step)
        seed = zlib.crc32(f"{site}/{role}/{count}".encode())
        u = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=like.dtype)
        u = u.clamp(torch.finfo(like.dtype).tiny, 1 - torch.finfo(like.dtype).eps)
        return u.to(like.device)

    return draw
