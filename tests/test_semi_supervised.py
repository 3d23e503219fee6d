"""M2, ADGM and SDGM: shapes, the enumerated unlabelled bound, masking, training, errors."""

from __future__ import annotations

import warnings

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, TraceEnum_ELBO
from pyro.optim import Adam

from lvmkit.models.semi_supervised import ADGM, M2, SDGM

X = torch.bernoulli(torch.full((6, 12), 0.3), generator=torch.Generator().manual_seed(1))
LABELS = torch.tensor([0, -1, 2, -1, 1, -1])


def build(cls, **kwargs):
    if cls is M2:
        return M2(12, num_classes=3, z_dim=2, hidden=(8,), **kwargs)
    return cls(12, num_classes=3, z_dim=2, a_dim=2, hidden=(8,), **kwargs)


def elbo(num_particles=1):
    return TraceEnum_ELBO(
        max_plate_nesting=1, num_particles=num_particles, vectorize_particles=num_particles > 1
    )


@pytest.mark.parametrize("cls", [M2, ADGM, SDGM])
@pytest.mark.parametrize(
    "labels",
    [None, LABELS, torch.full((6,), -1), torch.tensor([0, 1, 2] * 2)],
    ids=["none", "mixed", "all-unlabelled", "all-labelled"],
)
def test_finite_loss_and_no_warnings(cls, labels):
    model = build(cls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = elbo().loss(model, model.guide, X, labels=labels)
    assert torch.isfinite(torch.tensor(loss))


@pytest.mark.parametrize("cls", [M2, ADGM, SDGM])
def test_guide_shapes_and_classify(cls):
    model = build(cls)
    trace = poutine.trace(model.guide).get_trace(X, labels=LABELS)
    assert trace.nodes["z"]["value"].shape == (6, 2)
    assert trace.nodes["y_unobserved"]["value"].shape == (6, 3)
    assert torch.equal(trace.nodes["y_unobserved"]["mask"], LABELS < 0)
    if cls is not M2:
        assert trace.nodes["a"]["value"].shape == (6, 2)
    probs = model.classify(X)
    assert probs.shape == (6, 3)
    assert torch.allclose(probs.sum(-1), torch.ones(6))


@pytest.mark.parametrize("cls", [M2, ADGM, SDGM])
def test_one_short_training_run_lowers_the_loss(cls):
    model = build(cls)
    svi = SVI(model, model.guide, Adam({"lr": 0.02}), elbo())
    evaluate = elbo(num_particles=200)
    before = evaluate.loss(model, model.guide, X, labels=LABELS)
    classifier = model.classifier[0].weight.detach().clone()
    for _ in range(30):
        svi.step(X, labels=LABELS)
    after = evaluate.loss(model, model.guide, X, labels=LABELS)
    assert after < before - 1.0
    # the guide's networks are trained too (a guide method outside the PyroModule context
    # would leave them out of the param store)
    assert not torch.allclose(model.classifier[0].weight, classifier)


def test_m2_unlabelled_bound_is_the_q_weighted_sum_of_labelled_bounds():
    # Kingma et al. (2014) eq. 7: U(x) = sum_y q(y|x) L(x, y) + H(q(y|x)). The enumerated
    # loss must equal it; L(x, y) is the loss with every label set to y (alpha = 0).
    model = build(M2, alpha=0.0)
    x = X[:2]
    probe = elbo(num_particles=4000)
    pyro.set_rng_seed(3)
    unlabelled = -probe.loss(model, model.guide, x)
    q = model.classify(x)
    total = -(q * q.log()).sum()
    for y in range(3):
        labelled_y = torch.full((2,), y)
        per_datum = torch.stack([
            torch.tensor(-probe.loss(model, model.guide, x[i:i + 1], labels=labelled_y[i:i + 1]))
            for i in range(2)
        ])
        total = total + (q[:, y] * per_datum).sum()
    assert unlabelled == pytest.approx(float(total), abs=0.15)


def test_classification_term_rewards_the_right_label():
    model = build(M2, alpha=5.0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    no_alpha = build(M2, alpha=0.0)
    no_alpha.load_state_dict(model.state_dict())
    pyro.set_rng_seed(0)
    with_term = elbo().loss(model, model.guide, X, labels=labels)
    pyro.set_rng_seed(0)
    without = elbo().loss(no_alpha, no_alpha.guide, X, labels=labels)
    log_q = model.classify(X).log()[torch.arange(6), labels].sum()
    assert with_term - without == pytest.approx(-5.0 * float(log_q), rel=1e-4)


@pytest.mark.parametrize(
    "labels, error, match",
    [
        (torch.tensor([0, 1, 5, 0, 1, 2]), ValueError, "label 5 at index 2"),
        (torch.tensor([0, 1]), ValueError, r"labels of shape \(6,\)"),
        (torch.zeros(6), TypeError, "integer tensor"),
    ],
)
def test_bad_labels_raise_naming_site_y(labels, error, match):
    model = build(M2)
    with pytest.raises(error, match=match):
        model(X, labels=labels)
    with pytest.raises(error, match="site 'y'"):
        model.guide(X, labels=labels)


def test_bad_pixels_raise_naming_site_x():
    model = build(SDGM)
    with pytest.raises(ValueError, match="site 'x'"):
        model(torch.zeros(6, 11))
