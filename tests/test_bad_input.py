"""Bad input, systematically (issue 10): property-based tests of the public entry points.

Each test draws bad values for one argument of ``fit``, ``log_likelihood``, ``to_arviz``,
``psis_khat``, ``check_unbiased`` or ``load_dataset``: wrong dtype, shape or sign, NaN or
infinity, empty data, the wrong device (the ``meta`` device: this machine may have no GPU),
the wrong kind of object, and guides that lack a model site. Every draw must end either in
a correct result, checked against the exact answer, or in an exception whose message names
the argument or site at fault. An internal ``AttributeError``, ``IndexError``, ``KeyError``
or similar from deep inside never passes, whatever its message.

The models are tiny, with closed-form answers: ``x_i ~ N(z_i 1, I)`` with ``z_i ~ N(0, 1)``
has ``p(x_i) = N(0, I + 1 1^T)``, and its guide is the exact posterior, so every importance
weight equals ``p(x_i)`` and an accepted input must reproduce ``log p(x_i)`` itself.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lvmkit.data import Dataset, load_dataset
from lvmkit.inference.check import check_unbiased
from lvmkit.inference.diagnostics import psis_khat, to_arviz
from lvmkit.inference.evaluate import log_likelihood
from lvmkit.inference.training import fit

# Few examples, no deadline (the first call of a test pays for lazy imports), derandomized
# so that the suite is the same on every run; a failure prints its reproducing example.
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

# one bad argument at a time, each argument its own test: fewer examples each
OPTION_SETTINGS = settings(SETTINGS, max_examples=10)

N, D = 5, 2

# Raised from deep inside, these are bugs in the entry point's validation, not messages.
INTERNAL = (AttributeError, IndexError, KeyError, ZeroDivisionError, AssertionError,
            UnboundLocalError, OverflowError, struct.error)


class Refused(Exception):
    """Marks a draw that the entry point refused with a message naming the culprit."""


def outcome(call, names):
    """``call()``'s result, or ``Refused`` if it raised an exception naming one of ``names``.

    Fails the test for an internal exception type, or a message that names none of
    ``names`` (the argument or site at fault).
    """
    try:
        return call()
    except INTERNAL as err:  # pragma: no cover - the failure being tested for
        pytest.fail(f"internal {type(err).__name__} for a bad input: {err}")
    except Exception as err:
        message = str(err)
        if not any(name in message for name in names):
            pytest.fail(f"{type(err).__name__} names none of {names}: {message[:500]}")
        return Refused(message)


def must_refuse(call, names):
    result = outcome(call, names)
    assert isinstance(result, Refused), f"accepted a bad input, returned {result!r}"
    return str(result)


# --------------------------------------------------------------------------- the model

def model(x, labels=None):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        loc = z.unsqueeze(-1).expand(z.shape + (D,))
        pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)


def guide(x, labels=None):
    """The exact posterior: z_i | x_i ~ N(sum(x_i) / (1 + D), (1 + D)^-1/2)."""
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x.sum(-1) / (1 + D), (1 + D) ** -0.5))


def exact_log_p(x: torch.Tensor) -> torch.Tensor:
    cov = torch.eye(D, dtype=torch.float64) + 1.0
    return dist.MultivariateNormal(torch.zeros(D, dtype=torch.float64), cov).log_prob(
        x.double())


def clean_data() -> torch.Tensor:
    return torch.randn(N, D, generator=torch.Generator().manual_seed(3))


HALF = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- bad data

REFUSED_DTYPES = (torch.bool, torch.complex64)
ACCEPTED_DTYPES = (torch.float64, torch.int64, torch.int32, torch.uint8) + HALF


@st.composite
def bad_data(draw, precise=True):
    """``(value, refused)``: a bad version of the data; ``refused`` is ``False`` where a
    correct result is acceptable (another real or integer dtype of the same values, any
    scale). ``precise``: half precision is refused (the evaluation entry points), as its
    log-densities are off by nats (bfloat16) or overflow (float16)."""
    x = clean_data() * draw(st.sampled_from([1.0, 30.0, 1e3]))
    kind = draw(st.sampled_from(["dtype", "shape", "non-finite", "empty", "meta", "type",
                                 "scale"]))
    if kind == "dtype":
        dtype = draw(st.sampled_from(REFUSED_DTYPES + ACCEPTED_DTYPES))
        if not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool:
            x = x.round().abs() if dtype == torch.uint8 else x.round()
            x = x.clamp(0, 255) if dtype == torch.uint8 else x
        return x.to(dtype), dtype in REFUSED_DTYPES or (precise and dtype in HALF)
    if kind == "shape":
        shaped = draw(st.sampled_from([
            x[0],                 # one datum without its batch dim: (D,) broadcasts
            x[0, 0],              # a scalar
            x.reshape(-1),        # flattened
            x.unsqueeze(-1),      # an extra trailing dim
            x.unsqueeze(0),       # an extra leading dim
            x.T.contiguous(),     # transposed
            x[:, :1],             # too few features
            torch.cat([x, x], -1),  # too many features
        ]))
        return shaped, True
    if kind == "non-finite":
        row, col = draw(st.integers(0, N - 1)), draw(st.integers(0, D - 1))
        x[row, col] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        return x, True
    if kind == "empty":
        return draw(st.sampled_from([x[:0], torch.empty(0), torch.empty(0, D, 3)])), True
    if kind == "meta":
        return x.to("meta"), True
    if kind == "type":
        return draw(st.sampled_from([x.numpy(), x.tolist(), None, "x", 3.0])), True
    # huge or tiny values are data too: they must be scored correctly (or refused)
    factor = draw(st.sampled_from([-1.0, 1e-30, 1e3]))
    return x * factor, False


def check_log_p(value, got: torch.Tensor) -> None:
    expected = exact_log_p(value)
    assert got.shape == expected.shape
    assert torch.allclose(got.double(), expected, atol=1e-3, rtol=1e-5), (got, expected)


# --------------------------------------------------------------------------- guides that
# lack a model site: a model with a global and two local latents


def model3(x, labels=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        loc = (mu + z + w).unsqueeze(-1).expand(z.shape + (D,))
        pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)


LOCAL_SITES = ("z", "w")
ALL_SITES = ("mu",) + LOCAL_SITES


def partial_guide(sites):
    """A guide with its own parameters that samples only ``sites`` of :func:`model3`."""

    def guide(x, labels=None):
        scale = pyro.param("scale", torch.tensor(0.5), constraint=dist.constraints.positive)
        if "mu" in sites:
            pyro.sample("mu", dist.Normal(pyro.param("mu_loc", torch.tensor(0.0)), scale))
        with pyro.plate("data", x.shape[0]):
            for name in LOCAL_SITES:
                if name in sites:
                    loc = pyro.param(f"{name}_loc", torch.zeros(x.shape[0]))
                    pyro.sample(name, dist.Normal(loc, scale))

    return guide


def lacking(sites_of_model):
    """Strict subsets of a model's latent sites, as the sites a guide samples."""
    return st.sets(st.sampled_from(sites_of_model)).filter(
        lambda s: len(s) < len(sites_of_model))


def assert_names_a_missing_site(message: str, sampled, sites_of_model) -> None:
    missing = [s for s in sites_of_model if s not in sampled]
    assert any(f"'{s}'" in message for s in missing), (missing, message)


def bad_count(minimum=1):
    """Values that are no count >= ``minimum``; NumPy ints >= minimum are counts."""
    return st.one_of(
        st.integers(max_value=minimum - 1), st.booleans(), st.none(),
        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3),
        st.just(torch.tensor(3)), st.just([3]),
    )


def _ids(draws) -> list[str]:
    """Test ids: the argument each strategy of keyword arguments draws bad values for."""
    return [repr(draw).split("{", 1)[1].split(":", 1)[0].strip("'\" ") if "{" in repr(draw)
            else str(i) for i, draw in enumerate(draws)]


# ============================================================================ log_likelihood


@SETTINGS
@given(bad=bad_data())
def test_log_likelihood_bad_data(bad):
    pyro.clear_param_store()
    value, refused = bad
    result = outcome(lambda: log_likelihood(model, guide, value, num_samples=3), ["data", "'x'"])
    if refused:
        assert isinstance(result, Refused), f"accepted {value!r}: {result}"
    elif not isinstance(result, Refused):
        check_log_p(value, result)


@SETTINGS
@given(name=st.sampled_from(["num_samples", "chunk_size", "batch_size"]), value=bad_count())
def test_log_likelihood_bad_counts(name, value):
    pyro.clear_param_store()
    must_refuse(lambda: log_likelihood(model, guide, clean_data(), **{name: value}), [name])


@SETTINGS
@given(labels=st.sampled_from([torch.arange(N - 1), torch.arange(N).to("meta"),
                               torch.full((N,), math.nan), [0] * N, torch.tensor(1), True]))
def test_log_likelihood_bad_labels(labels):
    pyro.clear_param_store()
    must_refuse(lambda: log_likelihood(model, guide, clean_data(), num_samples=2,
                                       labels=labels), ["labels"])


@SETTINGS
@given(sampled=lacking(LOCAL_SITES))
def test_log_likelihood_guide_lacking_a_model_site(sampled):
    pyro.clear_param_store()

    def local_model(x):  # model3 without its global site, which log_likelihood refuses
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            w = pyro.sample("w", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal((z + w).unsqueeze(-1).expand(z.shape + (D,)), 1.0)
                        .to_event(1), obs=x)

    message = must_refuse(
        lambda: log_likelihood(local_model, partial_guide(sampled), clean_data(),
                               num_samples=2), LOCAL_SITES)
    assert_names_a_missing_site(message, sampled, LOCAL_SITES)


def test_log_likelihood_of_the_clean_data_is_exact():
    """The reference of the properties above: the exact guide gives log p(x) exactly."""
    x = clean_data()
    check_log_p(x, log_likelihood(model, guide, x, num_samples=4, chunk_size=3))


# ============================================================================ to_arviz


@SETTINGS
@given(bad=bad_data())
def test_to_arviz_bad_data(bad):
    pyro.clear_param_store()
    value, refused = bad
    result = outcome(lambda: to_arviz(model, guide, value, num_samples=3), ["args[0]", "'x'"])
    if refused:
        assert isinstance(result, Refused), f"accepted {value!r}"
    elif not isinstance(result, Refused):
        log_weight = torch.as_tensor(result["sample_stats"]["log_weight"].values[0])
        assert torch.allclose(log_weight.double(), exact_log_p(value).sum().expand(3),
                              atol=1e-3 * N, rtol=1e-5)
        np.testing.assert_array_equal(result["observed_data"]["x"].values,
                                      value.double().numpy())


TO_ARVIZ_OPTIONS = [
    st.builds(lambda v: {"num_samples": v}, bad_count()),
    st.builds(lambda v: {"vectorize": v}, st.sampled_from(["yes", 1, 0, "False", [True]])),
    st.builds(lambda v: {"data_dim": v}, st.sampled_from(["", 3, None, "x", "z"])),
]


@OPTION_SETTINGS
@pytest.mark.parametrize("draws", TO_ARVIZ_OPTIONS, ids=_ids(TO_ARVIZ_OPTIONS))
@given(data=st.data())
def test_to_arviz_bad_options(draws, data):
    kwargs = data.draw(draws)
    pyro.clear_param_store()
    (name,) = kwargs
    must_refuse(lambda: to_arviz(model, guide, clean_data(), **kwargs), [name])


@SETTINGS
@given(sampled=lacking(ALL_SITES))
def test_to_arviz_guide_lacking_a_model_site(sampled):
    pyro.clear_param_store()
    message = must_refuse(lambda: to_arviz(model3, partial_guide(sampled), clean_data(),
                                           num_samples=3), ALL_SITES)
    assert_names_a_missing_site(message, sampled, ALL_SITES)


@SETTINGS
@given(which=st.sampled_from(["model", "guide"]), value=st.sampled_from([None, 3, "model"]))
def test_to_arviz_and_psis_khat_refuse_programs_that_are_not_callable(which, value):
    programs = {"model": model, "guide": guide, which: value}
    for fn in (to_arviz, psis_khat):
        must_refuse(lambda fn=fn: fn(programs["model"], programs["guide"], clean_data()),
                    [which])


# ============================================================================ psis_khat


@SETTINGS
@given(bad=bad_data())
def test_psis_khat_bad_data(bad):
    pyro.clear_param_store()
    value, refused = bad
    result = outcome(lambda: psis_khat(model, guide, value, num_samples=30),
                     ["args[0]", "'x'"])
    if refused:
        assert isinstance(result, Refused), f"accepted {value!r}"
    elif not isinstance(result, Refused):
        expected = float(exact_log_p(value).sum())
        assert abs(result.log_evidence - expected) < 1e-3 * N + 1e-5 * abs(expected)
        assert result.constant_weights and result.khat == 0.0  # the exact guide


@SETTINGS
@given(value=st.one_of(bad_count(), st.integers(1, 24)))
def test_psis_khat_bad_num_samples(value):
    pyro.clear_param_store()
    must_refuse(lambda: psis_khat(model, guide, clean_data(), num_samples=value),
                ["num_samples"])


@SETTINGS
@given(sampled=lacking(ALL_SITES))
def test_psis_khat_guide_lacking_a_model_site(sampled):
    pyro.clear_param_store()
    message = must_refuse(lambda: psis_khat(model3, partial_guide(sampled), clean_data(),
                                            num_samples=30), ALL_SITES)
    assert_names_a_missing_site(message, sampled, ALL_SITES)


# ============================================================================ fit

FIT = {"steps": 2, "batch_size": 3, "progress": False}


def trainable_guide(x, labels=None):
    """The exact posterior's form, with a learnable mean factor (exact at 1 / (1 + D))."""
    factor = pyro.param("factor", torch.tensor(0.2))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(factor * x.sum(-1), (1 + D) ** -0.5))


def fit_losses(data, **kwargs):
    pyro.clear_param_store()
    return fit(model, trainable_guide, data, **{**FIT, **kwargs}).loss


@SETTINGS
@given(bad=bad_data(precise=False))
def test_fit_bad_data(bad):
    value, refused = bad
    # data of one datum has N = 1 or D: batch_size 3 is then refused as larger than N
    result = outcome(lambda: fit_losses(value), ["data", "'x'", "batch_size"])
    if getattr(value, "dtype", None) in HALF and isinstance(result, Refused):
        assert "non-finite loss" in str(result)  # an overflow, with data's dtype named
    if refused:
        assert isinstance(result, Refused), f"accepted {value!r}"
    elif not isinstance(result, Refused):
        # the same steps as on the same values in float32
        expected = fit_losses(value.float())
        tol = 0.02 if value.dtype in HALF else 1e-4
        np.testing.assert_allclose(result, expected, rtol=tol, atol=tol)


FIT_OPTIONS = [
    st.builds(lambda v: {"steps": v}, bad_count(minimum=0)),
    st.builds(lambda v: {"steps": None, "epochs": v}, bad_count(minimum=0)),
    st.builds(lambda v: {"batch_size": v}, st.one_of(bad_count(), st.integers(N + 1, 10**9))),
    st.builds(lambda v: {"checkpoint_every": v}, bad_count()),
    st.builds(lambda v: {"keep_last": v}, bad_count()),
    st.builds(lambda v: {"seed": v}, st.one_of(
        st.integers(max_value=-1), st.integers(min_value=2**32), st.floats(), st.none(),
        st.text(max_size=2), st.booleans())),
    st.builds(lambda v: {"labels": v}, st.sampled_from([
        torch.arange(N - 1), torch.arange(N).to("meta"), torch.full((N,), math.inf),
        [0] * N, True])),
    st.builds(lambda v: {"elbo": v}, st.sampled_from(
        ["trace", 3, pyro.infer.Trace_ELBO, object()])),
    st.builds(lambda v: {"optim": v}, st.sampled_from(
        ["adam", torch.optim.Adam, 3, {"lr": 1e-3}])),
    st.builds(lambda v: {"optim": pyro.optim.Adam({"lr": v})}, st.one_of(
        st.floats(max_value=0.0), st.just(math.inf), st.just(math.nan))),
    st.builds(lambda v: {"callback": v}, st.sampled_from([3, "print", [print]])),
    st.builds(lambda v: {"data_plate": v}, st.sampled_from(["", 3, "nope", "z"])),
    st.builds(lambda v: {"checkpoint_dir": v}, st.sampled_from([3, ["dir"]])),
    st.builds(lambda v: {"resume": v}, st.sampled_from(["no", 1, None])),
    st.builds(lambda v: {"progress": v}, st.sampled_from(["no", 0, None])),
    st.builds(lambda v: {"use_differentiable_loss": v}, st.sampled_from(["yes", 1])),
]


@OPTION_SETTINGS
@pytest.mark.parametrize("draws", FIT_OPTIONS, ids=_ids(FIT_OPTIONS))
@given(data=st.data())
def test_fit_bad_options(draws, data):
    kwargs = data.draw(draws)
    name = next(k for k in kwargs if k != "steps") if len(kwargs) > 1 else next(iter(kwargs))
    must_refuse(lambda: fit_losses(clean_data(), **kwargs), [name, "lr="][: 1 + (name == "optim")])


def _unavailable_devices() -> list:
    devices = ["meta", torch.device("meta"), "foo", "cuda:99", 3.5]
    if not torch.cuda.is_available():
        devices += ["cuda", torch.device("cuda", 0)]
    return devices


@SETTINGS
@given(device=st.sampled_from(_unavailable_devices()))
def test_fit_bad_device(device):
    must_refuse(lambda: fit_losses(clean_data(), device=device), ["device"])


@SETTINGS
@given(sampled=lacking(ALL_SITES), batch_size=st.sampled_from([N, 3]))
def test_fit_guide_lacking_a_model_site(sampled, batch_size):
    """One clear error before the first step, never Pyro's warning at every step."""
    pyro.clear_param_store()
    steps = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        message = must_refuse(
            lambda: fit(model3, partial_guide(sampled), clean_data(), steps=3,
                        batch_size=batch_size, progress=False,
                        callback=lambda history: steps.append(history.step[-1])), ALL_SITES)
    assert_names_a_missing_site(message, sampled, ALL_SITES)
    assert not [w for w in caught if "Found vars in model but not guide" in str(w.message)]
    assert steps == []  # refused before the first step


@SETTINGS
@given(fill=st.sampled_from([1.5, -0.1, math.nan, math.inf, 0.3]),
       binarize=st.sampled_from(["dynamic", None]), empty=st.booleans(),
       entry=st.sampled_from(["fit", "log_likelihood"]))
def test_bad_datasets(fill, binarize, empty, entry):
    """A Dataset's x: non-finite or empty is refused; outside [0, 1] only where it is
    binarized dynamically (its values are probabilities); otherwise scored correctly."""
    x = torch.full((0 if empty else N, D), fill)
    data = Dataset(x=x, y=torch.zeros(len(x), dtype=torch.long), name="toy",
                   image_shape=(D,), binarize=binarize)
    refused = empty or not math.isfinite(fill) or (binarize == "dynamic" and not 0 <= fill <= 1)
    if entry == "fit":
        result = outcome(lambda: fit_losses(data, batch_size=min(3, len(x)) or 1), ["data.x"])
    else:
        result = outcome(lambda: log_likelihood(model, guide, data, num_samples=2), ["data.x"])
    if refused:
        assert isinstance(result, Refused), f"accepted {x!r} ({binarize})"
    elif entry == "log_likelihood" and binarize is None:
        check_log_p(x, result)


# ============================================================================ check_unbiased

H = 2


def sbn_model(x):
    w = pyro.param("w", torch.tensor([[0.5, -0.3], [0.2, 0.8]]))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Bernoulli(torch.full((x.shape[0], H), 0.4)).to_event(1))
        c = pyro.sample("c", dist.Bernoulli(torch.full((x.shape[0],), 0.6)))
        logits = z @ w + c.unsqueeze(-1)
        pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


SBN_SITES = ("z", "c")


def sbn_guide_of(sites):
    def sbn_guide(x):
        v = pyro.param("v", torch.tensor([[0.3, -0.2], [0.1, 0.4]]))
        u = pyro.param("u", torch.tensor(0.1))
        with pyro.plate("data", x.shape[0]):
            if "z" in sites:
                pyro.sample("z", dist.Bernoulli(logits=x @ v).to_event(1))
            if "c" in sites:
                pyro.sample("c", dist.Bernoulli(logits=u + x.sum(-1)))

    return sbn_guide


SBN_X = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
sbn_guide = sbn_guide_of(SBN_SITES)


def run_check(*args, guide=sbn_guide, elbo=None, **kwargs):
    pyro.clear_param_store()
    elbo = pyro.infer.TraceGraph_ELBO() if elbo is None else elbo
    return check_unbiased(sbn_model, guide, elbo, *args, **{"num_draws": 3, **kwargs})


@SETTINGS
@given(kind=st.sampled_from(["shape", "non-finite", "empty", "meta", "type", "dtype",
                             "sign"]),
       data=st.data())
def test_check_unbiased_bad_data(kind, data):
    """Bernoulli pixels: a negative or fractional pixel is outside the support too."""
    x = SBN_X.clone()
    if kind == "sign":
        x = x * data.draw(st.sampled_from([-1.0, 0.5]))
    elif kind == "shape":
        x = data.draw(st.sampled_from([x[0], x[0, 0], x.reshape(-1), x.unsqueeze(-1),
                                       torch.cat([x, x], -1)]))
    elif kind == "non-finite":
        x[0, 1] = data.draw(st.sampled_from([math.nan, math.inf]))
    elif kind == "empty":
        x = x[:0]
    elif kind == "meta":
        x = x.to("meta")
    elif kind == "type":
        x = data.draw(st.sampled_from([x.numpy(), x.tolist(), None]))
    else:
        x = x.to(data.draw(st.sampled_from([torch.bool, torch.complex64, torch.int64])))
    must_refuse(lambda: run_check(x), ["args[0]", "'x'"])


CHECK_OPTIONS = [
    st.builds(lambda v: {"num_draws": v}, st.one_of(bad_count(minimum=2))),
    st.builds(lambda v: {"alpha": v}, st.one_of(
        st.floats(max_value=0.0), st.floats(min_value=1.0), st.just(math.nan), st.none(),
        st.text(max_size=2))),
    st.builds(lambda v: {"seed": v}, st.one_of(
        st.integers(max_value=-1), st.floats(), st.none(), st.text(max_size=2))),
    st.builds(lambda v: {"num_continuous_draws": v}, bad_count()),
    st.builds(lambda v: {"params": v}, st.sampled_from([["nope"], "w", [1], 3])),
]


@SETTINGS
@pytest.mark.parametrize("draws", CHECK_OPTIONS, ids=_ids(CHECK_OPTIONS))
@given(data=st.data())
def test_check_unbiased_bad_options(draws, data):
    kwargs = data.draw(draws)
    (name,) = kwargs
    must_refuse(lambda: run_check(SBN_X, **kwargs), [name])


@SETTINGS
@given(elbo=st.sampled_from([None, "rebar", pyro.infer.TraceGraph_ELBO, 3]))
def test_check_unbiased_bad_elbo(elbo):
    pyro.clear_param_store()
    must_refuse(lambda: check_unbiased(sbn_model, sbn_guide, elbo, SBN_X, num_draws=5),
                ["elbo"])


@SETTINGS
@given(sampled=lacking(SBN_SITES))
def test_check_unbiased_guide_lacking_a_model_site(sampled):
    message = must_refuse(lambda: run_check(SBN_X, guide=sbn_guide_of(sampled)), SBN_SITES)
    assert_names_a_missing_site(message, sampled, SBN_SITES)


def test_check_unbiased_of_the_clean_problem_passes():
    assert run_check(SBN_X, num_draws=50).passed


# ============================================================================ load_dataset


LOAD_OPTIONS = [
    st.builds(lambda v: {"name": v}, st.one_of(st.text(max_size=8), st.none(), st.integers(),
                                               st.just(["digits"])).filter(
        lambda v: v not in ("digits", "mnist5k", "idx"))),
    st.builds(lambda v: {"split": v}, st.one_of(st.text(max_size=6), st.none(),
                                                st.just(["train"])).filter(
        lambda v: v not in ("train", "test", "all"))),
    st.builds(lambda v: {"binarize": v}, st.one_of(st.text(max_size=6), st.booleans(),
                                                   st.integers()).filter(
        lambda v: v not in ("static", "threshold", "dynamic"))),
    st.builds(lambda v: {"seed": v}, st.one_of(
        st.integers(max_value=-1), st.integers(min_value=2**64), st.floats(), st.none(),
        st.booleans(), st.text(max_size=2))),
    st.builds(lambda v: {"test_fraction": v}, st.one_of(
        st.floats(max_value=0.0), st.floats(min_value=1.0), st.just(math.nan), st.none(),
        st.booleans(), st.text(max_size=2), st.just(torch.tensor(0.2)))),
    st.builds(lambda v: {"images": v}, st.sampled_from(["/nonexistent", 3, b"x"])),
]


@OPTION_SETTINGS
@pytest.mark.parametrize("draws", LOAD_OPTIONS, ids=_ids(LOAD_OPTIONS))
@given(data=st.data())
def test_load_dataset_bad_arguments(draws, data):
    kwargs = data.draw(draws)
    (name,) = kwargs
    must_refuse(lambda: load_dataset("digits", **kwargs),
                [name, "images=/labels="] if name == "images" else [name])


@SETTINGS
@given(fraction=st.floats(min_value=1e-12, max_value=1 - 1e-12),
       split=st.sampled_from(["train", "test"]))
def test_load_dataset_any_test_fraction_gives_a_nonempty_split_or_an_error(fraction, split):
    result = outcome(lambda: load_dataset("digits", split=split, binarize=None,
                                          test_fraction=fraction), ["test_fraction"])
    if not isinstance(result, Refused):
        assert len(result) > 0
        assert result.x.shape == (len(result), 64) and bool(torch.isfinite(result.x).all())


def _idx_bytes(dtype_code: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    header = bytes([0, 0, dtype_code, len(shape)]) + b"".join(struct.pack(">i", d)
                                                             for d in shape)
    return header + payload


@st.composite
def idx_files(draw):
    """Bytes of an IDX images file and a labels file: valid, corrupted or mismatched."""
    n = draw(st.integers(0, 4))
    code = draw(st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x07]))
    itemsize = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}.get(code, 1)
    shape = (n, draw(st.integers(1, 3)), 2)
    size = int(np.prod(shape)) * itemsize
    payload = draw(st.binary(min_size=size, max_size=size))
    images = _idx_bytes(code, shape, payload)
    labels = _idx_bytes(0x08, (draw(st.integers(0, 4)),), b"")
    labels = labels + bytes(struct.unpack(">i", labels[4:8])[0])
    corruption = draw(st.sampled_from(["none", "truncate", "magic", "random"]))
    if corruption == "truncate":
        images = images[: draw(st.integers(0, len(images) - 1))]
    elif corruption == "magic":
        images = b"\x01" + images[1:]
    elif corruption == "random":
        images = draw(st.binary(max_size=40))
    return images, labels


@SETTINGS
@given(files=idx_files(), split=st.sampled_from(["all", "train", "test"]),
       binarize=st.sampled_from([None, "static", "threshold"]))
def test_load_dataset_idx_files_give_a_dataset_or_an_error_naming_the_file(files, split,
                                                                         binarize):
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, name) for name in ("images.idx", "labels.idx")]
        for path, content in zip(paths, files, strict=True):
            with open(path, "wb") as handle:
                handle.write(content)
        result = outcome(lambda: load_dataset("idx", split=split, binarize=binarize,
                                              images=paths[0], labels=paths[1]),
                         paths + ["test_fraction", "split"])
    if not isinstance(result, Refused):
        assert len(result) > 0 and result.x.dim() == 2
        assert bool(((result.x >= 0) & (result.x <= 1)).all())
