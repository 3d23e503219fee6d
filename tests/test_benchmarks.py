"""The step-time benchmark times what it claims: every implementation trains its model."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))

import step_time  # noqa: E402


@pytest.mark.parametrize("name", list(step_time.MODELS))
def test_every_timed_step_updates_all_model_and_guide_parameters(name):
    # A step that leaves the model's parameters alone does less work than a training
    # step, and its time would flatter it (the nn.Module path once did exactly that).
    x = torch.bernoulli(torch.full((32, 12), 0.4))
    steps = step_time.step_functions(name, x, batch_size=8, lr=1e-2, seed=0)
    assert set(steps) == set(step_time.LABELS)
    for label, (step, params) in steps.items():
        before = [p.detach().clone() for p in params]
        for i in range(2):
            step(x[8 * i:8 * (i + 1)])
        unchanged = [i for i, (p, b) in enumerate(zip(params, before, strict=True))
                     if torch.equal(p.detach(), b)]
        assert params and not unchanged, f"{label}: parameters {unchanged} not trained"


def test_handwritten_score_function_computes_trace_elbos_gradient(monkeypatch):
    """The yardstick of Pyro's overhead must do Trace_ELBO's work: same weights, same
    latent draw, same gradients."""
    import pyro
    import pyro.poutine as poutine
    from handwritten_rebar import HandwrittenScoreFunction
    from pyro.infer import Trace_ELBO

    from lvmkit.models import SigmoidBeliefNet

    x = torch.bernoulli(torch.full((5, 7), 0.4))
    hand = HandwrittenScoreFunction(7, units=3, nonlinear=True, hidden=4)
    model = SigmoidBeliefNet(7, layers=(3,), nonlinear=True, hidden=4, name="yard")
    guide = model.default_guide()
    pairs = _copy_weights(model, guide, hand)
    b = torch.bernoulli(torch.full((5, 3), 0.5))
    monkeypatch.setattr(torch, "bernoulli", lambda probs: b)
    monkeypatch.setattr(hand.optim, "step", lambda: None)  # keep the gradients
    hand.step(x)
    fixed = poutine.trace(guide).get_trace(x)
    fixed.nodes["b1"]["value"] = b
    Trace_ELBO().loss_and_grads(model, poutine.replay(guide, trace=fixed), x)
    for pyro_param, hand_param in pairs:
        torch.testing.assert_close(pyro_param.grad, hand_param.grad)
    assert pyro.get_param_store()  # the Pyro side really ran through the store


def _copy_weights(model, guide, hand) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Give the Pyro SBN the hand-written one's weights; the (Pyro, hand) parameter
    pairs of the model and of the guide."""
    with torch.no_grad():
        model.prior_logits.copy_(hand.prior_logits)
        for pyro_net, hand_net in ((model.decoders[0], hand.decoder),
                                   (guide.nets[0], hand.encoder)):
            for p, q in zip(pyro_net.parameters(), hand_net.parameters(), strict=True):
                p.copy_(q)
    model_pairs = [(model.prior_logits, hand.prior_logits)]
    model_pairs += zip(model.decoders[0].parameters(), hand.decoder.parameters(), strict=True)
    guide_pairs = list(zip(guide.nets[0].parameters(), hand.encoder.parameters(), strict=True))
    return model_pairs + guide_pairs


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("nonlinear", [True, False])
def test_handwritten_rebar_computes_rebar_elbos_gradients(monkeypatch, nonlinear, fuse):
    """The speed reference must do RebarELBO's work: on the same weights and uniforms, the
    same guide and model gradients and the same variance-objective gradients of eta and
    log lambda (whose score term, through the weight f(b) - eta f(s(z~)), it once left
    out)."""
    import pyro
    from handwritten_rebar import HandwrittenRebar

    from lvmkit.inference import RebarELBO
    from lvmkit.inference.estimators import _relax
    from lvmkit.inference.estimators import rebar as rebar_module
    from lvmkit.models import SigmoidBeliefNet

    pyro.clear_param_store()
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((5, 7), 0.4))
    scale = 3.0
    hand = HandwrittenRebar(7, units=3, nonlinear=nonlinear, hidden=4, temperature=0.7)
    model = SigmoidBeliefNet(7, layers=(3,), nonlinear=nonlinear, hidden=4, name="same")
    guide = model.default_guide()
    pairs = _copy_weights(model, guide, hand)
    # eta away from 1, so that a missing eta term cannot cancel
    with torch.no_grad():
        hand.eta_logit.fill_(0.3)
    u, v = torch.rand(5, 3), torch.rand(5, 3)

    def draw(shape, like, site, role):
        assert site == "b1" and tuple(shape) == (5, 3)
        return {"hard": u, "conditional": v}[role].to(like)

    monkeypatch.setattr(_relax, "draw_uniform", draw)
    monkeypatch.setattr(rebar_module, "draw_uniform", draw)
    loss, guide_grads, model_grads, control_grads = hand.estimate(x, scale, noise=(u, v))

    elbo = RebarELBO(temperature=0.7, eta=2 * torch.sigmoid(torch.tensor(0.3)).item(),
                     fuse_passes=fuse)

    def scaled(fn):
        def wrapped(*args):
            with pyro.poutine.scale(scale=scale):
                return fn(*args)
        return wrapped

    lvmkit_loss = elbo.loss_and_grads(scaled(model), scaled(guide), x)
    assert lvmkit_loss == pytest.approx(loss, rel=1e-5)
    hand_grads = dict(zip(hand.model_params + hand.guide_params,
                          list(model_grads) + list(guide_grads), strict=True))
    for pyro_param, hand_param in pairs:
        torch.testing.assert_close(pyro_param.grad, hand_grads[hand_param],
                                   rtol=1e-4, atol=1e-5)
    (eta_logit,) = elbo.controls.eta_logits.values()
    torch.testing.assert_close(elbo.controls.log_temperature.grad, control_grads[0],
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eta_logit.grad, control_grads[1], rtol=1e-4, atol=1e-5)
