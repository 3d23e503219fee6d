"""The one module that knows which ArviZ line is installed.

ArviZ has two lines with different data structures:

- ``arviz`` 0.x (0.23 is the newest release on Python 3.11): ``az.from_dict(posterior=...,
  log_likelihood=..., ...)`` returns an ``arviz.InferenceData``; ``az.psislw`` takes log
  importance ratios; plots return matplotlib axes.
- ``arviz`` >= 1 (Python >= 3.12): ``az.from_dict({"posterior": {...}, ...})`` returns an
  ``xarray.DataTree``; PSIS lives in ``arviz_stats`` and follows the LOO convention (its input
  is negated); plots return a ``PlotCollection``.

Everything here works on plain numpy dicts or on what ArviZ itself returned, and imports
neither torch nor the rest of lvmkit, so it can be tested against ArviZ 1.x on a Python
without torch (``tests/test_arviz_convert.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np

# Groups whose variables carry no (chain, draw) dims.
_UNSAMPLED_GROUPS = ("observed_data", "constant_data")


def arviz() -> ModuleType:
    """``import arviz``, without the legacy line's import-time FutureWarning (a notice about
    the 1.x refactor that the user can do nothing about from here).

    Example:

    >>> from lvmkit.inference.arviz_compat import arviz
    >>> az = arviz()
    >>> callable(az.from_dict) and callable(az.summary)
    True
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ArviZ is undergoing a major refactor")
        import arviz as az
    return az


def is_legacy(az: ModuleType | None = None) -> bool:
    """``True`` for ArviZ 0.x (``InferenceData``), ``False`` for 1.x (``DataTree``).

    :param az: the ``arviz`` module (default: the installed one).

    Example: decided by the major version alone.

    >>> from types import SimpleNamespace
    >>> from lvmkit.inference.arviz_compat import is_legacy
    >>> [is_legacy(SimpleNamespace(__version__=v)) for v in ("0.23.4", "1.0.0")]
    [True, False]
    """
    az = arviz() if az is None else az
    return int(az.__version__.split(".")[0]) < 1


def _dim_names(
    group: str, name: str, shape: tuple, sample_dims: tuple, given: Sequence[str]
) -> list[str]:
    """Dims of one variable as ArviZ's ``from_dict`` names them: the given ones, then
    ``{name}_dim_k``; a log-likelihood variable takes the leading dims of its observed twin
    (``skip_event_dims``)."""
    extra = len(shape) - len(sample_dims)
    if extra < 0:
        raise ValueError(f"{group} variable {name!r} of shape {shape} lacks dims {sample_dims}")
    given = list(given)
    if len(given) > extra:
        if "log_likelihood" not in group:
            raise ValueError(f"{group} variable {name!r} has shape {shape} but dims {given}")
        given = given[:extra]
    return list(sample_dims) + given + [f"{name}_dim_{k}" for k in range(len(given), extra)]


def check_layout(
    groups: Mapping[str, Mapping[str, np.ndarray]],
    dims: Mapping[str, Sequence[str]],
    coords: Mapping[str, np.ndarray],
) -> None:
    """Refuse a layout that xarray would silently mangle or reject with an obscure message.

    Within a group, a variable named like a dimension becomes that dimension's coordinate
    and leaves the data variables (a site ``"obs"`` beside a dim ``"obs"`` empties the
    group); a dimension must have one size; a variable must not repeat a dimension.

    :param groups: ``{group: {variable: array}}``; arrays of sampled groups lead with
        ``(chain, draw)``.
    :param dims: names of each variable's dims after the sample dims.
    :param coords: coordinate values by dim name.
    :raises ValueError: naming the group, the variable and the dim at fault.

    Example: a site named like its own dim, and a dim of two sizes.

    >>> import numpy as np
    >>> from lvmkit.inference.arviz_compat import check_layout
    >>> check_layout({"posterior": {"z": np.zeros((1, 4, 3))}}, {"z": ["obs"]}, {})
    >>> check_layout({"log_likelihood": {"obs": np.zeros((1, 4, 3))}}, {"obs": ["obs"]}, {})
    Traceback (most recent call last):
    ...
    ValueError: log_likelihood variable(s) ['obs'] share their name with a dimension ...
    >>> check_layout({"posterior": {"a": np.zeros((1, 4, 3)), "b": np.zeros((1, 4, 2))}},
    ...              {"a": ["obs"], "b": ["obs"]}, {})
    Traceback (most recent call last):
    ...
    ValueError: dim 'obs' has size 2 in posterior variable 'b' but size 3 in 'a'
    """
    for group, variables in groups.items():
        sample_dims = () if group in _UNSAMPLED_GROUPS else ("chain", "draw")
        sizes: dict[str, tuple[int, str]] = {}
        used: dict[str, list[str]] = {}
        for name, array in variables.items():
            shape = np.shape(array)
            names = _dim_names(group, name, shape, sample_dims, dims.get(name, ()))
            used[name] = names
            if len(set(names)) != len(names):
                raise ValueError(f"{group} variable {name!r} repeats a dim: {names}")
            for dim, size in zip(names, shape, strict=True):
                if dim in sizes and sizes[dim][0] != size:
                    other_size, other = sizes[dim]
                    raise ValueError(
                        f"dim {dim!r} has size {size} in {group} variable {name!r} but size"
                        f" {other_size} in {other!r}"
                    )
                sizes.setdefault(dim, (size, name))
        for dim, (size, name) in sizes.items():
            if dim in coords and len(coords[dim]) != size:
                raise ValueError(
                    f"dim {dim!r} of {group} variable {name!r} has size {size} but"
                    f" {len(coords[dim])} coordinates"
                )
        clashes = sorted(set(variables) & set(sizes))
        if clashes:
            users = {clash: sorted(n for n in variables if clash in used[n]) for clash in clashes}
            raise ValueError(
                f"{group} variable(s) {clashes} share their name with a dimension (used by"
                f" {users}); xarray would turn them into coordinates: rename the dimension"
            )


def from_groups(
    groups: Mapping[str, Mapping[str, np.ndarray]],
    *,
    dims: Mapping[str, Sequence[str]] | None = None,
    coords: Mapping[str, np.ndarray] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> Any:
    """Build the installed ArviZ's own object through its ``from_dict``.

    :param groups: ``{group: {variable: array}}`` (ArviZ group names: ``posterior``,
        ``log_likelihood``, ``observed_data``, ``sample_stats``, ...); empty groups are
        dropped.
    :param dims: ``{variable: [dim, ...]}`` for the dims after ``(chain, draw)``.
    :param coords: ``{dim: values}``.
    :param attrs: attributes of the whole object (``InferenceData.attrs`` on ArviZ 0.x, the
        root node's attrs of the ``DataTree`` on 1.x).
    :returns: an ``arviz.InferenceData`` (0.x) or an ``xarray.DataTree`` (1.x).
    :raises ValueError: as :func:`check_layout`.

    Example: two chains of 50 draws of a 3-vector, with named coordinates.

    >>> import numpy as np
    >>> from lvmkit.inference.arviz_compat import from_groups, group_names
    >>> rng = np.random.default_rng(0)
    >>> data = from_groups({"posterior": {"z": rng.normal(size=(2, 50, 3))}, "sample_stats": {}},
    ...                    dims={"z": ["latent"]}, coords={"latent": ["a", "b", "c"]})
    >>> sorted(group_names(data))  # the empty group is dropped
    ['posterior']
    >>> dict(data["posterior"]["z"].sizes)
    {'chain': 2, 'draw': 50, 'latent': 3}
    """
    groups = {group: dict(values) for group, values in groups.items() if values}
    dims = {name: list(names) for name, names in (dims or {}).items()}
    coords = {dim: np.asarray(values) for dim, values in (coords or {}).items()}
    check_layout(groups, dims, coords)
    az = arviz()
    if is_legacy(az):
        return az.from_dict(**groups, dims=dims, coords=coords, attrs=dict(attrs or {}))
    return az.from_dict(groups, dims=dims, coords=coords, attrs={"/": dict(attrs or {})})


def group_names(data: Any) -> set[str]:
    """The groups of an ``InferenceData`` or ``DataTree``.

    Example:

    >>> import numpy as np
    >>> from lvmkit.inference.arviz_compat import from_groups, group_names
    >>> data = from_groups({"posterior": {"mu": np.zeros((1, 5))},
    ...                     "observed_data": {"x": np.ones(3)}})
    >>> sorted(group_names(data))
    ['observed_data', 'posterior']
    """
    if hasattr(data, "groups") and callable(data.groups):  # InferenceData
        return set(data.groups())
    return set(data.children)


def psislw(log_ratios: np.ndarray) -> tuple[np.ndarray, float]:
    """Pareto-smoothed, self-normalized log weights and k-hat of 1-D log importance ratios
    (Vehtari et al. 2024), through the installed ArviZ.

    ArviZ 0.x's ``psislw`` takes the log ratios; ``arviz_stats`` (ArviZ 1.x) takes them
    negated, as ``loo`` passes it the log-likelihood whose negation is the log ratio.

    :param log_ratios: log importance ratios, shape ``(S,)``.
    :returns: ``(log_weights, khat)``: the smoothed log weights (``logsumexp`` 0) and the
        Pareto shape estimate (reliable below 0.7).

    Example: ratios of a proposal close to the target, so a small k-hat.

    >>> import numpy as np
    >>> from lvmkit.inference.arviz_compat import psislw
    >>> log_ratios = np.random.default_rng(0).normal(scale=0.3, size=1000)
    >>> log_weights, khat = psislw(log_ratios)
    >>> log_weights.shape, round(float(np.exp(log_weights).sum()), 6), khat < 0.7
    ((1000,), 1.0, True)
    """
    log_ratios = np.asarray(log_ratios, dtype=np.float64)
    az = arviz()
    if is_legacy(az):
        log_weights, khat = az.psislw(log_ratios)
    else:
        from arviz_stats.base import array_stats

        log_weights, khat = array_stats.psislw(-log_ratios)
    return np.asarray(log_weights), float(khat)


def summary(data: Any, var_names: Sequence[str]) -> Any:
    """``az.summary`` unrounded; both lines give ``mean``, ``sd``, ``mcse_mean``, ``mcse_sd``,
    ``ess_bulk``, ``ess_tail``, ``r_hat`` (interval columns differ: HDI 94% on 0.x, ETI 89%
    on 1.x). The legacy line logs a warning for fewer than 2 chains; R-hat is NaN then.

    :param data: what :func:`from_groups` returned (or ArviZ's own object).
    :param var_names: the posterior variables to summarise.
    :returns: a ``pandas.DataFrame``, one row per variable (per element for vectors).

    Example:

    >>> import numpy as np
    >>> from lvmkit.inference.arviz_compat import from_groups, summary
    >>> rng = np.random.default_rng(0)
    >>> data = from_groups({"posterior": {"mu": 3 + rng.normal(size=(2, 200))}})
    >>> table = summary(data, ["mu"])
    >>> list(table.index), {"mean", "sd", "ess_bulk", "r_hat"} <= set(table.columns)
    (['mu'], True)
    >>> bool(abs(table.loc["mu", "mean"] - 3) < 0.2), bool(table.loc["mu", "r_hat"] < 1.05)
    (True, True)
    """
    return arviz().summary(data, var_names=list(var_names), round_to="none")


def _single_chain(tree: Any, num_draws: int) -> Any:
    import xarray

    posterior = tree["posterior"].to_dataset()
    stacked = posterior.stack(sample=("chain", "draw")).isel(sample=slice(0, num_draws))
    stacked = stacked.drop_vars(["sample", "chain", "draw"]).rename(sample="draw")
    stacked = stacked.expand_dims(chain=1).transpose("chain", "draw", ...)
    stacked = stacked.assign_coords(chain=[0], draw=np.arange(num_draws))
    return xarray.DataTree.from_dict({"posterior": stacked})


def plot_forest(posteriors: Mapping[str, Any], var_names: Sequence[str], path: str) -> None:
    """Forest plot of several posteriors (one row per variable, one colour per entry) saved
    at ``path``, through the installed ArviZ and matplotlib; closes its own figure only.

    :param posteriors: ``{label: InferenceData or DataTree}`` with a ``posterior`` group.
    :param var_names: the variables to plot.
    :param path: the image file to write.

    Example:

    >>> import os
    >>> import numpy as np
    >>> from lvmkit.inference.arviz_compat import from_groups, plot_forest
    >>> rng = np.random.default_rng(0)
    >>> fits = {name: from_groups({"posterior": {"mu": shift + rng.normal(size=(2, 100))}})
    ...         for name, shift in [("NUTS", 0.0), ("guide", 0.5)]}
    >>> plot_forest(fits, ["mu"], "forest.png")
    >>> os.path.getsize("forest.png") > 0
    True
    """
    import matplotlib.pyplot as plt

    az = arviz()
    names = list(posteriors)
    if is_legacy(az):
        axes = az.plot_forest(
            [posteriors[name] for name in names],
            model_names=names,
            var_names=list(var_names),
            combined=True,
            backend="matplotlib",
            show=False,
        )
        figure = np.ravel(axes)[0].figure
        figure.savefig(path)
        plt.close(figure)
        return
    # plot_forest of ArviZ 1.x aligns the trees on chain and draw coords (outer join: NaN
    # holes), so each gets one chain of the same length first.
    num_draws = min(
        tree["posterior"].sizes["chain"] * tree["posterior"].sizes["draw"]
        for tree in posteriors.values()
    )
    collection = az.plot_forest(
        {name: _single_chain(posteriors[name], num_draws) for name in names},
        var_names=list(var_names),
        backend="matplotlib",
        combined=True,
    )
    collection.add_legend("model")
    collection.savefig(path)
    plt.close(collection.viz["figure"].item())
