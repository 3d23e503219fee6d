"""Tests of lvmkit.inference.arviz_compat against whichever ArviZ line is installed.

This file imports only numpy, pytest, ArviZ (and matplotlib where present) and the pure
module, never torch or Pyro, so that it also runs on Python >= 3.12 against ArviZ 1.x:

    python3.12 -m venv /tmp/az12
    /tmp/az12/bin/pip install 'arviz>=1' matplotlib pytest
    /tmp/az12/bin/python -m pytest --noconftest -p no:cacheprovider tests/test_arviz_convert.py

(``--noconftest``: tests/conftest.py imports torch.)
"""

import warnings

import numpy as np
import pytest

from lvmkit.inference import arviz_compat

S, N, D = 400, 6, 2


@pytest.fixture
def az():
    return arviz_compat.arviz()


@pytest.fixture
def layout():
    rng = np.random.default_rng(0)
    mu = rng.normal(1.0, 0.3, size=(1, S))
    z = rng.normal(size=(1, S, N, D))
    y = rng.normal(1.0, 1.0, size=N)
    # Gaussian log-likelihood of each datum given mu: a well-behaved LOO problem.
    log_lik = -0.5 * (y - mu[..., None]) ** 2 - 0.5 * np.log(2 * np.pi)
    groups = {
        "posterior": {"mu": mu, "z": z},
        "log_likelihood": {"obs": log_lik},
        "observed_data": {"obs": y},
        "sample_stats": {"lp": log_lik.sum(-1)},
        "prior": {},
    }
    dims = {"z": ["data", "z_dim_0"], "obs": ["data"]}
    coords = {"data": np.arange(N), "z_dim_0": np.arange(D)}
    return groups, dims, coords


def test_from_groups_builds_the_installed_lines_object(az, layout):
    groups, dims, coords = layout
    data = arviz_compat.from_groups(groups, dims=dims, coords=coords, attrs={"source": "test"})
    if arviz_compat.is_legacy(az):
        assert int(az.__version__.split(".")[0]) == 0
        assert isinstance(data, az.InferenceData)
    else:
        import xarray

        assert isinstance(data, xarray.DataTree)
    # empty groups are dropped
    assert arviz_compat.group_names(data) == {
        "posterior",
        "log_likelihood",
        "observed_data",
        "sample_stats",
    }
    assert data.attrs["source"] == "test"
    assert data["posterior"]["z"].dims == ("chain", "draw", "data", "z_dim_0")
    np.testing.assert_array_equal(data["posterior"]["z"].values, groups["posterior"]["z"])
    np.testing.assert_array_equal(data["posterior"]["mu"].values, groups["posterior"]["mu"])
    assert data["log_likelihood"]["obs"].dims == ("chain", "draw", "data")
    assert data["observed_data"]["obs"].dims == ("data",)
    assert data["sample_stats"]["lp"].dims == ("chain", "draw")
    np.testing.assert_array_equal(data["posterior"]["data"].values, np.arange(N))


def test_log_likelihood_takes_the_leading_dims_of_its_observed_twin(az):
    rng = np.random.default_rng(1)
    data = arviz_compat.from_groups(
        {
            "posterior": {"mu": rng.normal(size=(1, 10))},
            "log_likelihood": {"x": rng.normal(size=(1, 10, N))},
            "observed_data": {"x": rng.normal(size=(N, 3))},
        },
        dims={"x": ["data", "x_dim_0"]},
        coords={"data": np.arange(N)},
    )
    assert data["log_likelihood"]["x"].dims == ("chain", "draw", "data")
    assert data["observed_data"]["x"].dims == ("data", "x_dim_0")


def test_summary_and_loo_read_the_result(az, layout):
    groups, dims, coords = layout
    data = arviz_compat.from_groups(groups, dims=dims, coords=coords)
    summary = arviz_compat.summary(data, ["mu"])
    mu = groups["posterior"]["mu"]
    assert summary.loc["mu", "mean"] == pytest.approx(mu.mean(), rel=1e-9)
    assert summary.loc["mu", "sd"] == pytest.approx(mu.std(ddof=1), rel=1e-6)
    assert {"mcse_mean", "mcse_sd", "ess_bulk", "ess_tail", "r_hat"} <= set(summary.columns)
    assert az.summary(data, var_names=["z"]).shape[0] == N * D
    loo = az.loo(data)
    assert int(loo["n_data_points"]) == N and int(loo["n_samples"]) == S
    log_lik = groups["log_likelihood"]["obs"][0]
    lppd = np.sum(np.logaddexp.reduce(log_lik, axis=0) - np.log(S))
    # LOO costs about one effective parameter here (mu) below the in-sample lppd
    assert lppd - 3.0 < elpd_loo(az, loo) < lppd


def elpd_loo(az, loo) -> float:
    """The ELPD estimate of ``az.loo``'s result (a Series on 0.x, an ELPDData on 1.x)."""
    return float(loo["elpd_loo"] if arviz_compat.is_legacy(az) else loo["elpd"])


def test_a_variable_named_like_a_dim_is_refused(layout):
    """xarray would make variable "obs" the coordinate of a dim "obs" and empty the group."""
    groups, dims, coords = layout
    dims = {**dims, "z": ["obs", "z_dim_0"]}
    obs = np.zeros((1, S, N))
    with pytest.raises(ValueError, match=r"posterior variable\(s\) \['obs'\] share their name"):
        arviz_compat.from_groups(
            {**groups, "posterior": {**groups["posterior"], "obs": obs}},
            dims=dims,
            coords={**coords, "obs": np.arange(N)},
        )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"dims": {"z": ["data", "data"]}}, "repeats a dim"),
        ({"dims": {"z": ["data", "z_dim_0", "extra"]}}, "has shape"),
        ({"coords": {"data": np.arange(N + 1)}}, "coordinates"),
        ({"z": np.zeros((1, S, N + 1, D))}, "dim 'data' of posterior variable 'z' has size 7"),
        (
            {"w": np.zeros((1, S, N + 1)), "dims": {"w": ["data"]}, "coords": {"data": None}},
            "dim 'data' has size 7 in posterior variable 'w' but size 6 in 'z'",
        ),
    ],
)
def test_inconsistent_layouts_are_refused_with_the_variable_named(layout, change, message):
    groups, dims, coords = layout
    posterior = {**groups["posterior"], **{k: v for k, v in change.items() if k in "zw"}}
    coords = {**coords, **change.get("coords", {})}
    with pytest.raises(ValueError, match=message):
        arviz_compat.from_groups(
            {**groups, "posterior": posterior},
            dims={**dims, **change.get("dims", {})},
            coords={dim: values for dim, values in coords.items() if values is not None},
        )


def gaussian_log_ratios(q_scale: float, num: int = 4000, seed: int = 0) -> np.ndarray:
    """log p(z) - log q(z) for z ~ q = N(0, q_scale^2), p = N(0, 1)."""
    z = np.random.default_rng(seed).normal(0.0, q_scale, size=num)
    return -0.5 * z**2 + 0.5 * (z / q_scale) ** 2 + np.log(q_scale)


def test_psislw_convention_narrow_q_is_heavy_tailed_wide_q_is_not():
    """A q narrower than p gives heavy right-tailed ratios (true k = 1 - q_scale^2 = 0.91
    here); a wider q bounded ratios. Negating the input the wrong way swaps the two."""
    narrow_weights, narrow_k = arviz_compat.psislw(gaussian_log_ratios(0.3))
    wide_weights, wide_k = arviz_compat.psislw(gaussian_log_ratios(2.0))
    assert narrow_k > 0.7
    assert wide_k < 0.5
    for weights in (narrow_weights, wide_weights):
        assert weights.shape == (4000,)
        assert np.exp(weights).sum() == pytest.approx(1.0, abs=1e-9)
    # smoothing keeps the order of the ratios
    ratios = gaussian_log_ratios(0.3)
    order = np.argsort(ratios)
    assert np.all(np.diff(narrow_weights[order]) >= -1e-12)


def test_plot_forest_writes_a_figure_and_closes_it(layout, tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.image
    import matplotlib.pyplot as plt

    groups, dims, coords = layout
    first = arviz_compat.from_groups({"posterior": groups["posterior"]}, dims=dims, coords=coords)
    shifted = {name: value + 0.5 for name, value in groups["posterior"].items()}
    second = arviz_compat.from_groups({"posterior": shifted}, dims=dims, coords=coords)
    before = set(plt.get_fignums())
    path = tmp_path / "forest.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        arviz_compat.plot_forest({"guide": first, "nuts": second}, ["mu"], str(path))
    assert set(plt.get_fignums()) == before
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50


def test_trace_and_posterior_plots_of_the_installed_line(az, layout, tmp_path):
    """The plots users reach for first: plot_trace / plot_posterior on ArviZ 0.x,
    plot_trace_dist / plot_dist on 1.x (arviz-plots 0.8 crashed in plot_trace_dist against
    the current xarray)."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, dims, coords = layout
    data = arviz_compat.from_groups(groups, dims=dims, coords=coords)
    before = set(plt.get_fignums())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if arviz_compat.is_legacy(az):
            axes = az.plot_trace(data, var_names=["mu", "z"])
            assert np.shape(axes) == (2, 2)  # (variable, density | trace)
            az.plot_posterior(data, var_names=["z"], coords={"data": [0, 1]})
        else:
            az.plot_trace_dist(data, var_names=["mu", "z"], backend="matplotlib")
            az.plot_dist(data, var_names=["z"], coords={"data": [0, 1]}, backend="matplotlib")
    figures = [plt.figure(number) for number in sorted(set(plt.get_fignums()) - before)]
    assert len(figures) == 2
    for index, figure in enumerate(figures):
        assert len(figure.axes) >= 2
        figure.savefig(tmp_path / f"plot{index}.png")
        plt.close(figure)
