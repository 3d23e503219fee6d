"""Train several gradient estimators side by side and compare ELBO, variance and speed."""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import ELBO

from lvmkit._rng import RandomState
from lvmkit.inference.registry import make_estimator

__all__ = ["compare_estimators", "default_estimators", "markdown_table"]

# label -> name in lvmkit.inference.registry, built with comparable=True (NVIL without the
# paper's variance normalisation, so that its gradient variance is on the others' scale).
_DEFAULTS: dict[str, str] = {
    "score": "trace",
    "nvil": "nvil",
    "concrete": "concrete",
    "rebar": "rebar",
    "relax": "relax",
    "arm": "arm",
    "disarm": "disarm",
}


def default_estimators() -> tuple[dict[str, ELBO], dict[str, str]]:
    """``({label: estimator}, {label: why it is missing})`` for the default line-up.

    Example:

    >>> from lvmkit.inference.compare import default_estimators
    >>> found, missing = default_estimators()
    >>> type(found["rebar"]).__name__, found["nvil"].normalize, missing
    ('RebarELBO', False, {})
    """
    found, missing = {}, {}
    for label, name in _DEFAULTS.items():
        try:
            found[label] = make_estimator(name, comparable=True)
        except (ImportError, AttributeError) as error:
            missing[label] = f"not available: {error}"
    return found, missing


def _as_pair(model_name_or_pair, x: torch.Tensor, seed: int) -> tuple[str, Callable, Callable]:
    if isinstance(model_name_or_pair, str):
        from lvmkit.models import build

        torch.manual_seed(seed)
        model, guide = build(model_name_or_pair, x.shape[1], init_data=x)
        return model_name_or_pair, model, guide
    model, guide = model_name_or_pair
    return getattr(model, "__name__", type(model).__name__), model, guide


def _create_params(model: Callable, guide: Callable, x: torch.Tensor) -> None:
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(x)
        poutine.replay(model, trace=guide_trace)(x)


class _InitialState:
    """The parameters at the start, restored in place before every estimator's run.

    In-place copies work whether a parameter lives in a ``PyroModule`` or only in Pyro's
    param store: the store hands out the tensor the module uses.
    """

    def __init__(self, model: Callable, guide: Callable, x: torch.Tensor) -> None:
        self.model, self.guide, self.x = model, guide, x
        _create_params(model, guide, x)
        self.values = {
            name: p.detach().clone() for name, p in pyro.get_param_store().named_parameters()
        }

    def restore(self) -> None:
        pyro.clear_param_store()
        store = pyro.get_param_store()
        _create_params(self.model, self.guide, self.x)
        with torch.no_grad():
            for name, p in store.named_parameters():
                if name in self.values:
                    p.copy_(self.values[name])


def _scaled(fn: Callable, scale: float) -> Callable:
    def wrapped(*args, **kwargs):
        with poutine.scale(scale=scale):
            return fn(*args, **kwargs)

    return wrapped


def _applicable(elbo: ELBO, model: Callable, guide: Callable, x: torch.Tensor) -> str | None:
    """``None`` if ``elbo`` handles this pair, else the reason it refuses."""
    try:
        with RandomState(), poutine.block():
            copy.deepcopy(elbo).loss(model, guide, x)
    except (ValueError, NotImplementedError, TypeError) as error:
        return str(error).splitlines()[0]
    return None


def compare_estimators(
    model_name_or_pair: str | tuple[Callable, Callable],
    data: Any,
    estimators: dict[str, ELBO] | None = None,
    *,
    steps: int = 1000,
    batch_size: int = 24,
    lr: float = 3e-4,
    variance_every: int = 100,
    variance_draws: int = 50,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train each estimator from the same initialisation on the same batches.

    For every estimator: ``fit`` runs ``steps`` Adam steps (learning rate ``lr``) on
    mini-batches of ``batch_size`` (the same batch order for all, from ``seed``), records
    the training ELBO per datum at every step and the median seconds per step (training
    only).
    Every ``variance_every`` steps (and at the first and the last step) the log gradient
    variance of the guide parameters is measured with
    :func:`~lvmkit.inference.check.gradient_variance` over
    ``variance_draws`` draws on a fixed batch (the first ``batch_size`` rows, scaled by
    ``N / batch_size`` as in training), on a copy of the estimator so that its own learned
    state (baselines, temperatures) is not changed by the measurement.

    :param model_name_or_pair: a name for :func:`lvmkit.models.build` or ``(model, guide)``.
    :param data: a :class:`~lvmkit.data.Dataset` or a float tensor (N, D).
    :param estimators: ``{label: ELBO}``; default: score function (``Trace_ELBO``), NVIL
        (``normalize=False``, so its variance is comparable), Concrete, REBAR, RELAX, ARM and
        DisARM, each kept where it is importable and
        accepts the model's sites (others are listed under ``"skipped"`` with the reason).
    :param out_dir: if given, write ``compare.json``, ``compare.md``, ``elbo.png`` and
        ``log_variance.png`` there.
    :returns: ``{"model", "steps", "batch_size", "lr", "seed", "estimators": {label:
        {"elbo": [...], "wall_time": [...], "seconds_per_step", "final_elbo",
        "variance_steps": [...], "log_variance": [...]}}, "skipped": {label: reason}}``;
        ``final_elbo`` is the mean training ELBO over the last 10% of steps.

    Example: two estimators, three steps each, on a small sigmoid belief net.

    >>> import torch
    >>> from pyro.infer import Trace_ELBO
    >>> from lvmkit.inference import DisARMELBO, compare_estimators
    >>> from lvmkit.models import build
    >>> x = torch.bernoulli(torch.full((8, 4), 0.5))
    >>> results = compare_estimators(
    ...     build("sbn-linear", x_dim=4, layers=(3,)), x,
    ...     {"score": Trace_ELBO(), "DisARM": DisARMELBO()},
    ...     steps=3, batch_size=4, variance_every=2, variance_draws=3, progress=False,
    ... )
    >>> sorted(results["estimators"]), results["skipped"]
    (['DisARM', 'score'], {})
    >>> run = results["estimators"]["DisARM"]
    >>> len(run["elbo"]), run["variance_steps"]
    (3, [1, 2, 3])
    """
    from lvmkit.inference.check import gradient_variance
    from lvmkit.inference.training import fit

    if steps < 1 or batch_size < 1 or variance_every < 1 or variance_draws < 2:
        raise ValueError(
            f"steps, batch_size and variance_every must be >= 1 and variance_draws >= 2, got "
            f"{steps}, {batch_size}, {variance_every}, {variance_draws}"
        )
    x_all = data.x if hasattr(data, "x") else data
    if not torch.is_tensor(x_all) or x_all.dim() != 2:
        raise ValueError(f"data: expected a Dataset or a float tensor (N, D), got {type(data)}")
    n = x_all.shape[0]
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds the {n} rows of data")
    pyro.clear_param_store()
    name, model, guide = _as_pair(model_name_or_pair, x_all, seed)
    x_fixed = x_all[:batch_size]
    scale = n / batch_size
    model_s, guide_s = _scaled(model, scale), _scaled(guide, scale)
    pyro.set_rng_seed(seed)
    initial = _InitialState(model, guide, x_fixed)

    skipped: dict[str, str] = {}
    if estimators is None:
        estimators, skipped = default_estimators()
    runs: dict[str, dict[str, Any]] = {}
    for label, elbo in estimators.items():
        initial.restore()
        reason = _applicable(elbo, model_s, guide_s, x_fixed)
        if reason is not None:
            skipped[label] = reason
            continue
        initial.restore()
        variance_steps, log_variance, notes = [], [], []

        def measure(step: int, elbo=elbo, label=label, variance_steps=variance_steps,
                    log_variance=log_variance, notes=notes) -> None:
            with RandomState():
                try:
                    value = gradient_variance(
                        model_s, guide_s, {label: copy.deepcopy(elbo)}, x_fixed,
                        num_draws=variance_draws, seed=seed + 1,
                    )[label]
                except Exception as error:  # an estimator whose state does not deep-copy
                    if not notes:
                        notes.append(
                            "variance measured on the live estimator (its learned state moves"
                            f" during the measurement): copy failed with {error!r}"[:300]
                        )
                    value = gradient_variance(
                        model_s, guide_s, {label: elbo}, x_fixed, num_draws=variance_draws,
                        seed=seed + 1,
                    )[label]
            variance_steps.append(step)
            log_variance.append(value)

        def callback(history, measure=measure) -> None:
            step = history.step[-1]
            if step == 1 or step % variance_every == 0 or step == steps:
                measure(step)

        history = fit(
            model, guide, data, elbo=elbo, optim=pyro.optim.Adam({"lr": lr}), steps=steps,
            batch_size=batch_size, seed=seed, progress=progress, callback=callback,
        )
        elbo_curve = [-loss for loss in history.loss]
        tail = max(1, len(elbo_curve) // 10)
        step_times = np.diff([0.0, *history.wall_time])
        runs[label] = {
            "elbo": elbo_curve,
            "wall_time": list(history.wall_time),
            # The median ignores the first steps' warm-up and load spikes of a shared machine.
            "seconds_per_step": float(np.median(step_times)),
            "final_elbo": float(np.mean(elbo_curve[-tail:])),
            "variance_steps": variance_steps,
            "log_variance": log_variance,
            "notes": notes,
        }
    results = {
        "model": name, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
        "num_data": n, "variance_draws": variance_draws, "estimators": runs, "skipped": skipped,
    }
    if out_dir is not None:
        write_outputs(results, out_dir)
    return results


def markdown_table(results: dict[str, Any]) -> str:
    """One row per trained estimator: final ELBO, last log-variance, seconds per step.

    Example:

    >>> from lvmkit.inference.compare import markdown_table
    >>> results = {"model": "sbn-linear", "steps": 3, "batch_size": 4, "lr": 3e-4,
    ...            "estimators": {"score": {"final_elbo": -2.5, "log_variance": [1.0, 0.5],
    ...                                     "seconds_per_step": 0.01}},
    ...            "skipped": {"arm": "categorical site"}}
    >>> print(markdown_table(results))
    Model `sbn-linear`, 3 steps, batch 4, lr 0.0003.
    <BLANKLINE>
    | estimator | train ELBO (last 10%) | log grad variance (last) | s / step |
    |---|---|---|---|
    | score | -2.500 | 0.500 | 0.0100 |
    | arm | skipped: categorical site | | |
    <BLANKLINE>
    """
    lines = [
        f"Model `{results['model']}`, {results['steps']} steps, batch {results['batch_size']},"
        f" lr {results['lr']}.",
        "",
        "| estimator | train ELBO (last 10%) | log grad variance (last) | s / step |",
        "|---|---|---|---|",
    ]
    for label, run in results["estimators"].items():
        last = run["log_variance"][-1] if run["log_variance"] else math.nan
        lines.append(
            f"| {label} | {run['final_elbo']:.3f} | {last:.3f} | {run['seconds_per_step']:.4f} |"
        )
    for label, reason in results.get("skipped", {}).items():
        lines.append(f"| {label} | skipped: {reason} | | |")
    return "\n".join(lines) + "\n"


def write_outputs(results: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``compare.json``, ``compare.md``, ``elbo.png`` and ``log_variance.png``.

    Example: the results of :func:`compare_estimators` (which calls this when given
    ``out_dir``).

    >>> import torch
    >>> from lvmkit.inference import compare_estimators
    >>> from lvmkit.inference.compare import write_outputs
    >>> from lvmkit.inference.registry import make_estimator
    >>> from lvmkit.models import build
    >>> results = compare_estimators(
    ...     build("sbn-linear", x_dim=4, layers=(3,)), torch.bernoulli(torch.full((8, 4), 0.5)),
    ...     {"arm": make_estimator("arm")}, steps=2, batch_size=4, variance_draws=3,
    ...     progress=False,
    ... )
    >>> paths = write_outputs(results, "compare-run")
    >>> sorted(paths), all(path.exists() for path in paths.values())
    (['elbo', 'json', 'log_variance', 'markdown'], True)
    """
    from lvmkit.inference.plots import plot_grad_variance, plot_loss

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "compare.json", "markdown": out / "compare.md"}
    paths["json"].write_text(json.dumps(results, indent=1))
    paths["markdown"].write_text(markdown_table(results))
    runs = results["estimators"]
    if runs:
        paths["elbo"] = plot_loss(
            {label: run["elbo"] for label, run in runs.items()}, out / "elbo.png",
            smoothing=0.9, title=f"training ELBO, {results['model']}", ylabel="ELBO per datum",
        )
        paths["log_variance"] = plot_grad_variance(
            {
                label: list(zip(run["variance_steps"], run["log_variance"], strict=True))
                for label, run in runs.items()
            },
            out / "log_variance.png",
            title=f"gradient variance, {results['model']}",
        )
    return paths
