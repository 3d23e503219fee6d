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
