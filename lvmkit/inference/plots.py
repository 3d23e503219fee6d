"""PNG pictures of training runs and models.

Every function draws on its own :class:`matplotlib.figure.Figure` (no pyplot state, no
``plt.show``; PNGs are rendered by Agg whatever the session's backend is), writes ``path``
(creating its folder) and returns it as a :class:`pathlib.Path`. Bad input raises
``ValueError`` naming what was wrong before anything is written.

Use as ``from lvmkit.inference import plots``.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

PathLike = str | os.PathLike
Bounds = tuple[tuple[float, float], tuple[float, float]]

__all__ = [
    "MIN_GRID_PIXELS",
    "TRACE_LABELS",
    "plot_density_2d",
    "plot_forest",
    "plot_grad_variance",
    "plot_image_grid",
    "plot_loss",
    "plot_reconstructions",
    "plot_traces",
    "trace_labels",
]


# --------------------------------------------------------------------------- helpers


def _save(figure: Figure, path: PathLike, format: str | None = "png") -> Path:
    """Write ``figure``; ``format=None`` takes the format from the file's extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format=format)
    return path


def _legend_outside(figure: Figure) -> None:
    """One legend right of the axes, so that it covers no curve (needs a figure with
    ``layout="constrained"``, which then shrinks the axes to make room)."""
    figure.legend(loc="outside right upper", fontsize="small")


def _series(values: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of a sequence of numbers (steps 1..n) or of ``(step, value)``."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        raise ValueError(f"{what} is empty: nothing to plot")
    if array.ndim == 1:
        return np.arange(1, array.size + 1, dtype=float), array
    if array.ndim == 2 and array.shape[1] == 2:
        return array[:, 0], array[:, 1]
    raise ValueError(
        f"{what}: expected a sequence of numbers or of (step, value) pairs, got an array of"
        f" shape {array.shape}"
    )


def _pairs(values: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        raise ValueError(f"{what} is empty: nothing to plot")
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(
            f"{what}: expected (step, value) pairs, got an array of shape {array.shape}"
        )
    return array[:, 0], array[:, 1]


def _history_series(history: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Accept :class:`lvmkit.inference.training.History`, its ``to_dict()``, or a plain series."""
    if isinstance(history, Mapping) and "loss" in history:
        loss, steps = history["loss"], history.get("step")
    elif hasattr(history, "loss"):
        loss, steps = history.loss, getattr(history, "step", None)
    else:
        return _series(history, what)
    loss_steps, loss_values = _series(loss, what)
    if steps is not None and len(steps) == len(loss_values):
        loss_steps = np.asarray(steps, dtype=float)
    return loss_steps, loss_values


def _is_single_history(history: Any) -> bool:
    return not isinstance(history, Mapping) or "loss" in history


def ema(values: np.ndarray, smoothing: float) -> np.ndarray:
    """Debiased exponential moving average (weight ``smoothing`` on the past); NaNs are
    skipped, keeping the previous average.

    Example:

    >>> import numpy as np
    >>> from lvmkit.inference.plots import ema
    >>> ema(np.array([1.0, np.nan, 3.0]), smoothing=0.5)
    array([1.        , 1.        , 2.33333333])
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    out = np.empty_like(values, dtype=float)
    average, weight = 0.0, 0.0
    for i, value in enumerate(values):
        if math.isfinite(value):
            average = smoothing * average + (1.0 - smoothing) * value
            weight = smoothing * weight + (1.0 - smoothing)
        out[i] = average / weight if weight > 0 else math.nan
    return out


def _as_tensor(values: Any, what: str) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{what}: cannot convert {type(values).__name__} to a tensor") from error
    return tensor.detach().cpu().to(torch.float64)


# --------------------------------------------------------------------------- training curves


def plot_loss(
    history: Any,
    path: PathLike,
    *,
    smoothing: float = 0.0,
    num_data: int | None = None,
    logy: bool = False,
    title: str = "training loss",
    ylabel: str = "loss per datum",
    figsize: tuple[float, float] = (6.0, 4.0),
    dpi: int = 100,
) -> Path:
    """Loss against step for one run or several.

    :param history: a run (a :class:`~lvmkit.inference.training.History`, whose ``loss`` is per
        datum already, its ``to_dict()``, a sequence of losses, or of ``(step, loss)``
        pairs) or a dict ``{run name: run}``.
    :param smoothing: EMA weight in [0, 1); > 0 draws the raw curve faintly under the
        smoothed one.
    :param num_data: divide the losses by this (for totals over a dataset).

    Several runs (or a named one) get a legend right of the axes.

    Example:

    >>> from lvmkit.inference.plots import plot_loss
    >>> runs = {"REBAR": [3.0, 2.5, 2.2, 2.1], "NVIL": [3.0, 2.8, 2.6, 2.5]}
    >>> plot_loss(runs, "loss.png", smoothing=0.5).name
    'loss.png'
    """
    runs = {"": history} if _is_single_history(history) else dict(history)
    if not runs:
        raise ValueError("history is empty: no runs to plot")
    if num_data is not None and num_data <= 0:
        raise ValueError(f"num_data must be positive, got {num_data}")
    figure = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    axes = figure.add_subplot()
    for index, (name, run) in enumerate(runs.items()):
        what = f"history {name!r}" if name else "history"
        steps, losses = _history_series(run, what)
        if num_data is not None:
            losses = losses / num_data
        color = f"C{index % 10}"
        label = name or None
        if smoothing > 0:
            axes.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
            axes.plot(steps, ema(losses, smoothing), color=color, label=label)
        else:
            axes.plot(steps, losses, color=color, label=label)
    if logy:
        axes.set_yscale("symlog")
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    if len(runs) > 1 or next(iter(runs)):
        _legend_outside(figure)
    return _save(figure, path)


def plot_grad_variance(
    records: Mapping[str, Sequence[tuple[float, float]]],
    path: PathLike,
    *,
    title: str = "gradient variance",
    ylabel: str = "log gradient variance\n(log of mean per-coordinate variance)",
    figsize: tuple[float, float] = (6.0, 4.0),
    dpi: int = 100,
) -> Path:
    """Gradient log-variance against step, one line per estimator; the legend sits right
    of the axes.

    :param records: ``{estimator name: [(step, log variance), ...]}``, e.g. from
        :func:`~lvmkit.inference.check.gradient_variance` (the log of the per-coordinate
        variance of the guide's gradient, averaged over coordinates).

    Example:

    >>> from lvmkit.inference.plots import plot_grad_variance
    >>> records = {"score": [(1, 2.0), (100, 1.5)], "REBAR": [(1, 0.5), (100, -0.5)]}
    >>> plot_grad_variance(records, "variance.png").exists()
    True
    """
    if not isinstance(records, Mapping) or not records:
        raise ValueError("records is empty: expected {estimator: [(step, log variance), ...]}")
    figure = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    axes = figure.add_subplot()
    for name, record in records.items():
        steps, values = _pairs(record, f"records[{name!r}]")
        axes.plot(steps, values, marker="o", markersize=3, label=name)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    _legend_outside(figure)
    return _save(figure, path)


# What the estimators' diagnostics() keys mean: key (or prefix ending in "/") ->
# (panel title, y-axis label).
TRACE_LABELS: dict[str, tuple[str, str]] = {
    "loss": ("training loss (negative ELBO estimate)", "loss per datum (nats)"),
    "temperature": ("temperature of the continuous relaxation", "temperature λ"),
    "eta/": ("control-variate weight η, {rest}", "η"),
    "variance_objective": (
        "variance objective: sum of squared guide-gradient estimates",
        "sum of squares (log scale)",
    ),
    "log_grad_variance": (
        "gradient variance of the guide (EMA over steps)",
        "log gradient variance\n(log of mean\nper-coordinate variance)",
    ),
}
# Positive quantities spanning orders of magnitude: drawn on a log axis.
_LOG_SCALE_TRACES = ("variance_objective",)


def trace_labels(key: str) -> tuple[str, str]:
    """``(panel title, y-axis label)`` of a trace key (see :data:`TRACE_LABELS`); an unknown
    key is its own title, with the label ``"value"``.

    Example:

    >>> from lvmkit.inference.plots import trace_labels
    >>> trace_labels("eta/b1")
    ('control-variate weight η, b1', 'η')
    >>> trace_labels("my_metric")
    ('my_metric', 'value')
    """
    if key in TRACE_LABELS:
        return TRACE_LABELS[key]
    for prefix, (title, ylabel) in TRACE_LABELS.items():
        if prefix.endswith("/") and key.startswith(prefix):
            return title.format(rest=key[len(prefix):]), ylabel
    return key, "value"


def plot_traces(
    extras: Any,
    path: PathLike,
    keys: Sequence[str] | None = None,
    *,
    title: str | None = "per-step traces of the estimator",
    include_loss: bool = False,
    width: float = 6.0,
    height_per_key: float = 2.0,
    dpi: int = 100,
) -> Path:
    """Per-step scalar traces (e.g. REBAR's eta and temperature), one panel per key.

    Each panel has a title saying what the trace is and a y-axis label with its unit, for
    the keys in :data:`TRACE_LABELS` (the estimators' ``diagnostics()``); other keys are
    shown under their own names. ``variance_objective`` is drawn on a log axis.

    :param extras: ``{name: [value per step]}`` (NaN marks steps without a value) or a
        :class:`~lvmkit.inference.training.History`, whose ``extras`` and ``step`` are used.
    :param keys: which traces, in order (default: all).
    :param title: the figure's title.
    :param include_loss: with a History, add its per-datum loss as the first panel.

    Example:

    >>> from lvmkit.inference.plots import plot_traces
    >>> extras = {"temperature": [0.5, 0.48, 0.47], "eta/b1": [1.0, 0.9, 0.85]}
    >>> plot_traces(extras, "traces.png").exists()
    True
    """
    steps = None
    loss = None
    if hasattr(extras, "extras"):
        steps = np.asarray(getattr(extras, "step", []), dtype=float)
        loss = getattr(extras, "loss", None)
        extras = extras.extras
    if not isinstance(extras, Mapping) or not extras:
        raise ValueError("extras is empty: expected {name: [value per step]}")
    keys = list(extras) if keys is None else list(keys)
    missing = [key for key in keys if key not in extras]
    if missing or not keys:
        raise ValueError(f"keys {missing or keys} not in extras (available: {sorted(extras)})")
    series = {key: extras[key] for key in keys}
    if include_loss:
        if loss is None:
            raise ValueError("include_loss=True needs a History (with its loss)")
        series = {"loss": loss, **series}
    height = height_per_key * len(series)
    figure = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    all_axes = figure.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    for axes, (key, values) in zip(all_axes, series.items(), strict=True):
        key_steps, values = _series(values, f"extras[{key!r}]")
        if steps is not None and steps.size == values.size:
            key_steps = steps
        axes.plot(key_steps, values)
        panel_title, ylabel = trace_labels(key)
        axes.set_title(panel_title, fontsize="medium")
        axes.set_ylabel(ylabel, fontsize="small")
        if key in _LOG_SCALE_TRACES and np.nanmin(values) > 0:
            axes.set_yscale("log")
    all_axes[-1].set_xlabel("step")
    if title:
        figure.suptitle(title)
    return _save(figure, path)


# --------------------------------------------------------------------------- images

_TITLE_PIXELS = 30
#: Width in pixels that the image grids reach at least when ``scale`` is not given.
MIN_GRID_PIXELS = 600


def _auto_scale(grid_width: int, scale: int | None) -> int:
    """``scale``, or the smallest whole zoom that makes the grid ``MIN_GRID_PIXELS`` wide:
    whole zooms keep every image pixel a crisp square (drawn nearest-neighbour)."""
    if scale is not None:
        return scale
    return max(1, math.ceil(MIN_GRID_PIXELS / grid_width))


def _check_images(images: Any, image_shape: Sequence[int], what: str) -> torch.Tensor:
    images = _as_tensor(images, what)
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"image_shape must be (height, width), got {tuple(image_shape)}")
    if images.dim() == 1:
        images = images.unsqueeze(0)
    if images.dim() != 2 or images.shape[0] == 0 or images.shape[1] != math.prod(shape):
        raise ValueError(
            f"{what}: expected shape (n, {math.prod(shape)}) for images of shape {shape},"
            f" got {tuple(images.shape)}"
        )
    finite = torch.isfinite(images)
    outside = ~finite | (images < 0) | (images > 1)
    if bool(outside.any()):
        bad = outside.nonzero()[0].tolist()
        raise ValueError(
            f"{what}: value {images[tuple(bad)].item()} at index {bad} is outside [0, 1]"
        )
    return images.reshape(-1, *shape)


def _tile(images: torch.Tensor, nrow: int, pad: int) -> np.ndarray:
    """Tile ``(n, h, w)`` images ``nrow`` to a row on a white background."""
    n, height, width = images.shape
    rows = math.ceil(n / nrow)
    grid = np.ones((rows * (height + pad) + pad, nrow * (width + pad) + pad))
    for index, image in enumerate(images.numpy()):
        top = pad + (index // nrow) * (height + pad)
        left = pad + (index % nrow) * (width + pad)
        grid[top : top + height, left : left + width] = image
    return grid


def grid_pixels(
    num_images: int,
    image_shape: Sequence[int],
    nrow: int,
    *,
    pad: int = 1,
    scale: int | None = None,
    title: bool = False,
) -> tuple[int, int]:
    """``(height, width)`` in pixels of the PNG that :func:`plot_image_grid` writes.

    Example: 8 x 8 digits, eight per row, are drawn large enough to read.

    >>> from lvmkit.inference.plots import MIN_GRID_PIXELS, grid_pixels
    >>> height, width = grid_pixels(16, (8, 8), nrow=8)
    >>> width >= MIN_GRID_PIXELS
    True
    """
    height, width = image_shape
    columns = min(nrow, num_images)
    rows = math.ceil(num_images / columns)
    grid_width = columns * (width + pad) + pad
    scale = _auto_scale(grid_width, scale)
    return (
        scale * (rows * (height + pad) + pad) + (_TITLE_PIXELS if title else 0),
        scale * grid_width,
    )


def _draw_grid(grid: np.ndarray, path: PathLike, scale: int | None, title: str | None) -> Path:
    # One grid pixel -> scale x scale PNG pixels: dpi 1 makes figsize count pixels exactly.
    scale = _auto_scale(grid.shape[1], scale)
    title_pixels = _TITLE_PIXELS if title else 0
    height = grid.shape[0] * scale + title_pixels
    width = grid.shape[1] * scale
    figure = Figure(figsize=(width, height), dpi=1)
    axes = figure.add_axes((0.0, 0.0, 1.0, grid.shape[0] * scale / height))
    axes.imshow(grid, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
    axes.set_axis_off()
    if title:
        # A character is about 0.6 font sizes wide: shrink long titles to the grid's width.
        font_pixels = min(0.55 * title_pixels, width / (0.6 * len(title) + 1))
        # Font sizes are in points, which scale with dpi: 72 points per inch.
        figure.text(
            0.5,
            1.0 - 0.5 * title_pixels / height,
            title,
            ha="center",
            va="center",
            fontsize=font_pixels * 72,
        )
    return _save(figure, path)


def plot_image_grid(
    images: Any,
    image_shape: Sequence[int],
    path: PathLike,
    nrow: int = 8,
    title: str | None = None,
    *,
    pad: int = 1,
    scale: int | None = None,
) -> Path:
    """A grid of grey-scale images (samples, reconstructions, decoder means).

    :param images: ``(n, height * width)`` values in [0, 1].
    :param image_shape: ``(height, width)``.
    :param nrow: images per row.
    :param scale: PNG pixels per image pixel (nearest-neighbour); by default the smallest
        whole number that makes the PNG at least :data:`MIN_GRID_PIXELS` wide. The PNG is
        exactly :func:`grid_pixels` ``(n, image_shape, nrow, pad=pad, scale=scale,
        title=...)``.

    Example: sixteen random 8 x 8 images, eight per row.

    >>> import torch
    >>> from matplotlib.image import imread
    >>> from lvmkit.inference.plots import grid_pixels, plot_image_grid
    >>> path = plot_image_grid(torch.rand(16, 64), (8, 8), "grid.png", nrow=8)
    >>> imread(path).shape[:2] == grid_pixels(16, (8, 8), 8)
    True
    """
    if nrow < 1 or pad < 0 or (scale is not None and scale < 1):
        raise ValueError(f"need nrow >= 1, pad >= 0, scale >= 1; got {nrow}, {pad}, {scale}")
    images = _check_images(images, image_shape, "images")
    grid = _tile(images, min(nrow, images.shape[0]), pad)
    return _draw_grid(grid, path, scale, title)


def plot_reconstructions(
    x: Any,
    recon: Any,
    image_shape: Sequence[int],
    path: PathLike,
    *,
    num_images: int = 8,
    title: str | None = "originals (top), reconstructions (bottom)",
    pad: int = 1,
    scale: int | None = None,
) -> Path:
    """The first ``num_images`` originals in the top row, their reconstructions below.

    :param scale: as for :func:`plot_image_grid` (by default at least
        :data:`MIN_GRID_PIXELS` wide).

    Example:

    >>> import torch
    >>> from lvmkit.models import build
    >>> from lvmkit.inference.plots import plot_reconstructions
    >>> model, guide = build("vae", x_dim=64, z_dim=2, hidden=(16,))
    >>> x = torch.bernoulli(torch.full((4, 64), 0.5))
    >>> plot_reconstructions(x, model.reconstruct(x, guide), (8, 8), "recon.png").exists()
    True
    """
    if pad < 0 or (scale is not None and scale < 1):
        raise ValueError(f"need pad >= 0, scale >= 1; got {pad}, {scale}")
    x = _check_images(x, image_shape, "x")
    recon = _check_images(recon, image_shape, "recon")
    if x.shape != recon.shape:
        raise ValueError(f"x and recon differ in shape: {tuple(x.shape)} and {tuple(recon.shape)}")
    count = min(num_images, x.shape[0])
    if count < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    grid = _tile(torch.cat([x[:count], recon[:count]]), count, pad)
    return _draw_grid(grid, path, scale, title)


# --------------------------------------------------------------------------- 2-D densities


def _check_points(points: Any, what: str) -> np.ndarray:
    array = _as_tensor(points, what).numpy()
    if array.ndim != 2 or array.shape[1] != 2 or array.shape[0] == 0:
        raise ValueError(f"{what}: expected shape (n, 2) with n > 0, got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what}: contains non-finite values")
    return array


def _bounds_from(points: list[np.ndarray], margin: float = 0.1) -> Bounds:
    stacked = np.concatenate(points)
    low, high = stacked.min(0), stacked.max(0)
    span = np.maximum(high - low, 1e-3)
    low, high = low - margin * span, high + margin * span
    return (float(low[0]), float(high[0])), (float(low[1]), float(high[1]))


def plot_density_2d(
    target: Callable[[torch.Tensor], torch.Tensor] | Any,
    path: PathLike,
    *,
    samples: Any = None,
    bounds: Bounds | None = None,
    grid_size: int = 100,
    title: str | None = None,
    labels: tuple[str, str] = ("target", "guide samples"),
    figsize: tuple[float, float] = (5.0, 5.0),
    dpi: int = 100,
) -> Path:
    """A 2-D target density, with a guide's samples on top.

    :param target: a log density (``(m, 2)`` tensor -> ``(m,)``, unnormalized is fine),
        drawn as filled contours of its density on a grid, or ``(n, 2)`` samples of the
        target, drawn as a 2-D histogram.
    :param samples: optional ``(n, 2)`` guide samples, drawn as dots.
    :param bounds: ``((x_min, x_max), (y_min, y_max))``; by default the range of the
        samples plus 10%. Needed when ``target`` is a function and there are no samples.

    Example: a standard normal target and a narrower guide's samples.

    >>> import torch
    >>> from lvmkit.inference.plots import plot_density_2d
    >>> def log_density(z):
    ...     return -0.5 * (z ** 2).sum(-1)
    >>> samples = 0.5 * torch.randn(200, 2)
    >>> plot_density_2d(log_density, "density.png", samples=samples,
    ...                 bounds=((-3, 3), (-3, 3)), grid_size=30).exists()
    True
    """
    if grid_size < 2:
        raise ValueError(f"grid_size must be at least 2, got {grid_size}")
    guide_points = None if samples is None else _check_points(samples, "samples")
    target_points = None if callable(target) else _check_points(target, "target")
    if bounds is None:
        known = [p for p in (target_points, guide_points) if p is not None]
        if not known:
            raise ValueError("bounds are needed to plot a log density without samples")
        bounds = _bounds_from(known)
    (x_min, x_max), (y_min, y_max) = bounds
    if not (x_min < x_max and y_min < y_max):
        raise ValueError(f"bounds must be ((x_min, x_max), (y_min, y_max)), got {bounds}")
    figure = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    axes = figure.add_subplot()
    if target_points is None:
        xs, ys = np.linspace(x_min, x_max, grid_size), np.linspace(y_min, y_max, grid_size)
        mesh_x, mesh_y = np.meshgrid(xs, ys)
        grid = torch.as_tensor(np.stack([mesh_x.ravel(), mesh_y.ravel()], -1), dtype=torch.float32)
        with torch.no_grad():
            log_density = _as_tensor(target(grid), "target(points)").numpy()
        if log_density.shape != (grid_size * grid_size,):
            raise ValueError(
                f"target(points) must return shape ({grid.shape[0]},) for points of shape"
                f" {tuple(grid.shape)}, got {log_density.shape}"
            )
        finite = np.isfinite(log_density)
        if not finite.any():
            raise ValueError("target(points) is not finite anywhere inside the bounds")
        density = np.where(finite, np.exp(log_density - log_density[finite].max()), 0.0)
        axes.contourf(
            mesh_x, mesh_y, density.reshape(grid_size, grid_size), levels=12, cmap="Blues"
        )
    else:
        axes.hist2d(
            target_points[:, 0],
            target_points[:, 1],
            bins=grid_size // 2,
            range=[[x_min, x_max], [y_min, y_max]],
            cmap="Blues",
        )
    handles = [axes.plot([], [], "s", color="tab:blue", label=labels[0])[0]]
    if guide_points is not None:
        handles.append(
            axes.scatter(
                guide_points[:, 0],
                guide_points[:, 1],
                s=4,
                color="tab:orange",
                alpha=0.5,
                label=labels[1],
            )
        )
    axes.set_xlim(x_min, x_max)
    axes.set_ylim(y_min, y_max)
    # below the axes: inside, it would cover the density wherever it put itself
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles))
    if title:
        axes.set_title(title)
    return _save(figure, path)


# --------------------------------------------------------------------------- forest plots


def _forest_matplotlib(
    table: Any, path: PathLike, groups: Sequence[str], title: str, dpi: int
) -> Path:
    rows = list(table.index)
    figure = Figure(figsize=(6.0, 1.5 + 0.5 * len(rows)), dpi=dpi, layout="constrained")
    axes = figure.add_subplot()
    offsets = np.linspace(-0.15, 0.15, len(groups)) if len(groups) > 1 else [0.0]
    for index, (offset, who) in enumerate(zip(offsets, groups, strict=True)):
        means = table[(who, "mean")].to_numpy(dtype=float)
        sds = table[(who, "sd")].to_numpy(dtype=float)
        y = np.arange(len(rows)) + offset
        axes.errorbar(
            means, y, xerr=2 * sds, fmt="o", color=f"C{index % 10}", label=f"{who} (mean ± 2 sd)"
        )
    axes.set_yticks(np.arange(len(rows)), [str(r) for r in rows])
    axes.invert_yaxis()
    axes.set_xlabel("value")
    figure.legend(loc="outside lower center", ncols=len(groups))
    axes.set_title(title)
    return _save(figure, path, format=None)  # as before the move: .svg, .pdf, ... work too


def plot_forest(
    table: Any,
    path: PathLike,
    *,
    groups: Sequence[str] = ("guide", "nuts"),
    posteriors: Mapping[str, Any] | None = None,
    var_names: Sequence[str] | None = None,
    backend: str = "matplotlib",
    title: str = "guide vs NUTS",
    dpi: int = 100,
) -> Path:
    """Forest plot of several posteriors of the same variables: mean ± 2 sd per component.

    :param table: a ``pandas.DataFrame`` with one row per scalar component and columns
        ``(group, "mean")`` and ``(group, "sd")`` for every group, as
        :attr:`~lvmkit.inference.nuts.NutsComparison.table`.
    :param groups: the groups to draw, in order.
    :param posteriors: ``{group: ArviZ data}``, for ``backend="arviz"``.
    :param var_names: the variables ``backend="arviz"`` draws.
    :param backend: ``"matplotlib"`` (from ``table``) or ``"arviz"`` (the installed ArviZ's
        ``plot_forest`` of ``posteriors``; falls back to matplotlib with a warning if it
        fails).

    Example: a table shaped as :attr:`~lvmkit.inference.nuts.NutsComparison.table`.

    >>> import pandas as pd
    >>> from lvmkit.inference.plots import plot_forest
    >>> columns = pd.MultiIndex.from_tuples(
    ...     [("guide", "mean"), ("guide", "sd"), ("nuts", "mean"), ("nuts", "sd")])
    >>> table = pd.DataFrame([[0.7, 0.5, 0.75, 0.5], [-1.0, 0.2, -1.1, 0.3]],
    ...                      index=["mu", "tau"], columns=columns)
    >>> plot_forest(table, "forest.png").exists()
    True
    """
    if backend not in ("arviz", "matplotlib"):
        raise ValueError(f"backend must be 'arviz' or 'matplotlib', got {backend!r}")
    groups = list(groups)
    missing = [
        (who, stat) for who in groups for stat in ("mean", "sd")
        if (who, stat) not in getattr(table, "columns", ())
    ]
    if not groups or missing:
        raise ValueError(
            f"table: expected columns (group, 'mean') and (group, 'sd') for groups {groups};"
            f" missing {missing}"
        )
    if len(table.index) == 0:
        raise ValueError("table has no rows: nothing to plot")
    if backend == "arviz":
        if posteriors is None or not var_names:
            raise ValueError("backend='arviz' needs posteriors and var_names")
        from lvmkit.inference import arviz_compat

        try:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            arviz_compat.plot_forest(dict(posteriors), list(var_names), str(path))
            return path
        except Exception as error:  # noqa: BLE001 - any plotting failure has a fallback
            warnings.warn(f"ArviZ forest plot failed ({error}); using matplotlib", stacklevel=2)
    return _forest_matplotlib(table, path, groups, title, dpi)
