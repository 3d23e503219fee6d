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
    the 1.x refactor that the user can do nothing about from here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ArviZ is undergoing a major refactor")
        import arviz as az
    return az


def is_legacy(az: ModuleType | None = None) -> bool:
    """``True`` for ArviZ 0.x (``InferenceData``), ``False`` for 1.x (``DataTree``)."""
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
    """The groups of an ``InferenceData`` or ``DataTree``."""
    if hasattr(data, "groups") and callable(data.groups):  # InferenceData
        return set(data.groups())
    return set(data.children)


def psislw(log_ratios: np.ndarray) -> tuple[np.ndarray, float]:
    """Pareto-smoothed, self-normalized log weights and k-hat of 1-D log importance ratios
    (Vehtari et al. 2024), through the installed ArviZ.

    ArviZ 0.x's ``psislw`` takes the log ratios; ``arviz_stats`` (ArviZ 1.x) takes them
    negated, as ``loo`` passes it the log-likelihood whose negation is the log ratio.
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
    on 1.x). The legacy line logs a warning for fewer than 2 chains; R-hat is NaN then."""
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
    at ``path``, through the installed ArviZ and matplotlib; closes its own figure only."""
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
