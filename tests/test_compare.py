"""compare_estimators on a tiny pair: same start, same batches, files and table."""

import json

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from lvmkit.inference.check import gradient_variance
from lvmkit.inference.compare import compare_estimators, markdown_table
from lvmkit.inference.estimators.arm import DisARMELBO
from lvmkit.inference.estimators.nvil import NVILELBO
from lvmkit.inference.estimators.rebar import RebarELBO

D, H = 6, 3


def model(x):
    w = pyro.param("w", torch.randn(H, D, generator=torch.Generator().manual_seed(1)))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Bernoulli(logits=torch.zeros(x.shape[0], H)).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=z @ w).to_event(1), obs=x)


def guide(x):
    v = pyro.param("v", torch.randn(D, H, generator=torch.Generator().manual_seed(2)))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Bernoulli(logits=x @ v).to_event(1))


def categorical_guide(x):
    u = pyro.param("u", torch.zeros(D, H))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.OneHotCategorical(logits=x @ u))


DATA = (torch.rand(40, D, generator=torch.Generator().manual_seed(3)) < 0.4).float()


@pytest.fixture
def results(tmp_path):
    estimators = {"score": Trace_ELBO(), "nvil": NVILELBO(), "disarm": DisARMELBO()}
    return compare_estimators(
        (model, guide), DATA, estimators, steps=6, batch_size=8, lr=0.01, variance_every=3,
        variance_draws=5, out_dir=tmp_path, progress=False,
    ), tmp_path


def test_runs_every_estimator_from_the_same_start(results):
    result, _ = results
    assert list(result["estimators"]) == ["score", "nvil", "disarm"]
    first_elbos = set()
    for run in result["estimators"].values():
        assert len(run["elbo"]) == 6 and all(torch.isfinite(torch.tensor(run["elbo"])))
        assert run["variance_steps"] == [1, 3, 6]
        assert len(run["log_variance"]) == 3 and run["seconds_per_step"] > 0
        first_elbos.add(round(run["elbo"][0], 3))
    # the score function and NVIL give the same first loss: same params, batch and seed
    assert result["estimators"]["score"]["elbo"][0] == result["estimators"]["nvil"]["elbo"][0]
    # a variance-reduced estimator measured on the same snapshot beats the score function
    runs = result["estimators"]
    assert runs["disarm"]["log_variance"][0] < runs["score"]["log_variance"][0]


def test_writes_json_markdown_and_plots(results):
    result, out = results
    assert json.loads((out / "compare.json").read_text())["estimators"].keys() == {
        "score", "nvil", "disarm"
    }
    table = (out / "compare.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["score", "nvil", "disarm"]
    assert table == markdown_table(result)
    for name in ("elbo.png", "log_variance.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("make", [Trace_ELBO, NVILELBO, RebarELBO])
def test_measuring_variance_does_not_change_training(make):
    """Regression: the variance draws left their gradients on the model's parameters, so
    the next training step added them (and an SBN trained markedly worse when measured
    often). Training with and without measurements must now be identical."""

    def run(variance_every):
        result = compare_estimators(
            (model, guide), DATA, {"e": make()}, steps=8, batch_size=8, lr=0.01,
            variance_every=variance_every, variance_draws=4, progress=False,
        )
        return result["estimators"]["e"]["elbo"]

    assert run(2) == run(1000)


def test_gradient_variance_leaves_gradients_as_it_found_them():
    pyro.clear_param_store()
    guide(DATA)
    model(DATA)
    store = pyro.get_param_store()
    store["w"].grad = torch.full_like(store["w"], 7.0)  # e.g. mid-way through a step
    gradient_variance(model, guide, {"sf": Trace_ELBO()}, DATA, num_draws=3)
    assert torch.equal(store["w"].grad, torch.full_like(store["w"], 7.0))
    assert store["v"].grad is None


def test_skips_estimators_that_refuse_the_model():
    result = compare_estimators(
        (model, categorical_guide), DATA, {"score": Trace_ELBO(), "disarm": DisARMELBO()},
        steps=2, batch_size=8, variance_every=2, variance_draws=2, progress=False,
    )
    assert list(result["estimators"]) == ["score"]
    assert "Bernoulli" in result["skipped"]["disarm"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size 50 exceeds the 40 rows"):
        compare_estimators((model, guide), DATA, {"score": Trace_ELBO()}, batch_size=50)
    with pytest.raises(ValueError, match="variance_draws"):
        compare_estimators((model, guide), DATA, {"score": Trace_ELBO()}, variance_draws=1)
