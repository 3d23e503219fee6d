"""Whole runs: train a named model, evaluate it, save and reload it (what the CLI calls).

A run folder holds ``run.json`` (what was trained, so that :func:`load_run` can rebuild
it), ``weights.pt`` (module state and Pyro's param store), ``history.json``,
``metrics.json`` and PNG plots.

Example::

    >>> from lvmkit.data import load_dataset
    >>> from lvmkit.workflow import train_and_evaluate
    >>> train = load_dataset("digits", split="train")
    >>> test = load_dataset("digits", split="test")
    >>> result = train_and_evaluate("vae", train, test, steps=3, eval_samples=2,
    ...                             eval_points=10, progress=False)
    >>> sorted(result.metrics)[:3]
    ['elbo_estimator', 'model', 'num_samples']
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lvmkit._io import atomic_save

__all__ = [
    "RunResult",
    "check_run_dir",
    "evaluate_run",
    "fixed_batch",
    "format_evaluation",
    "format_table",
    "load_run",
    "load_run_data",
    "load_weights",
    "save_weights",
    "train_and_evaluate",
    "train_several",
]

PathLike = str | os.PathLike


@dataclass
class RunResult:
    """What :func:`train_and_evaluate` returns.

    :ivar model: the trained model.
    :ivar guide: the trained guide.
    :ivar history: the :class:`~lvmkit.inference.training.History` of the run.
    :ivar metrics: ``{"model", "elbo_estimator", "steps", "train_elbo", "test_elbo",
        "test_log_likelihood", "num_samples", "test_points", "seconds"}``: ``train_elbo`` is
        the mean training ELBO per datum over the last 5% of steps, ``test_elbo`` the
        single-sample ELBO and ``test_log_likelihood`` the IWAE bound with
        ``num_samples`` draws, both averaged over the ``test_points`` evaluated.
    :ivar files: ``{kind: path}`` of every file written (empty without ``out``).

    Example:

    >>> from lvmkit.data import load_dataset
    >>> train = load_dataset("digits", split="train")
    >>> test = load_dataset("digits", split="test")
    >>> from lvmkit.workflow import train_and_evaluate
    >>> result = train_and_evaluate("vae", train, test, steps=5, eval_samples=5,
    ...                             eval_points=10, progress=False,
    ...                             model_kwargs={"z_dim": 2, "hidden": (16,)})
    >>> type(result.model).__name__, len(result.history.loss), result.files
    ('VAE', 5, {})
    >>> result.metrics["test_points"], result.metrics["num_samples"]
    (10, 5)
    """

    model: Any
    guide: Any
    history: Any
    metrics: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def write_json(path: PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (numbers that JSON lacks become floats).

    Example:

    >>> import numpy as np
    >>> from lvmkit.workflow import write_json
    >>> print(write_json("metrics.json", {"elbo": np.float32(-1.5)}).read_text())
    {
      "elbo": -1.5
    }
    <BLANKLINE>
    """
    path = Path(path)
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    return path


def save_weights(path: PathLike, model: Any, guide: Any) -> None:
    """Save the module state dicts of ``model`` and ``guide`` and Pyro's param store,
    atomically (see :func:`lvmkit._io.atomic_save`).

    Example (:func:`load_weights` reads it back):

    >>> from pathlib import Path
    >>> from lvmkit.models import build
    >>> from lvmkit.workflow import save_weights
    >>> model, guide = build("vae", x_dim=4, z_dim=2, hidden=(8,))
    >>> save_weights("weights.pt", model, guide)
    >>> Path("weights.pt").exists()
    True
    """
    import pyro

    state = {
        "model": model.state_dict() if isinstance(model, torch.nn.Module) else None,
        "guide": guide.state_dict() if isinstance(guide, torch.nn.Module) else None,
        "param_store": pyro.get_param_store().get_state(),
    }
    atomic_save(state, path, prefix=".weights-")


def load_weights(path: PathLike, model: Any, guide: Any) -> None:
    """Load what :func:`save_weights` wrote into ``model``, ``guide`` and the param store.

    :raises RuntimeError: from ``load_state_dict`` when the shapes do not fit the modules.

    Example:

    >>> import torch
    >>> from lvmkit.models import build
    >>> from lvmkit.workflow import load_weights, save_weights
    >>> model, guide = build("vae", x_dim=4, z_dim=2, hidden=(8,))
    >>> save_weights("weights.pt", model, guide)
    >>> copy, copy_guide = build("vae", x_dim=4, z_dim=2, hidden=(8,))
    >>> load_weights("weights.pt", copy, copy_guide)
    >>> z = torch.zeros(1, 2)
    >>> torch.equal(copy.decoder(z), model.decoder(z))
    True
    """
    import pyro

    state = torch.load(path, map_location="cpu", weights_only=False)
    pyro.get_param_store().set_state(state["param_store"])
    if state["model"] is not None:
        model.load_state_dict(state["model"])
    if state["guide"] is not None:
        guide.load_state_dict(state["guide"])


def fixed_batch(dataset: Any, limit: int | None, seed: int) -> torch.Tensor:
    """The first ``limit`` points of ``dataset`` (all if ``None``), binarized once from
    ``seed`` if the dataset binarizes dynamically.

    Example:

    >>> import torch
    >>> from lvmkit.data import load_dataset
    >>> from lvmkit.workflow import fixed_batch
    >>> test = load_dataset("digits", split="test", binarize="dynamic")
    >>> x = fixed_batch(test, 3, seed=0)
    >>> x.shape, torch.equal(x, fixed_batch(test, 3, seed=0))
    (torch.Size([3, 64]), True)
    """
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return dataset.batch(torch.arange(n), torch.Generator().manual_seed(seed))


def train_and_evaluate(
    model: str,
    train_set: Any,
    test_set: Any,
    *,
    estimator: str = "trace",
    steps: int = 2000,
    batch_size: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    out: PathLike | None = None,
    num_particles: int = 1,
    eval_samples: int = 1000,
    eval_points: int | None = None,
    progress: bool = True,
    checkpoint_dir: PathLike | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> RunResult:
    """Train a named model with Adam, evaluate it on ``test_set``, and (with ``out``) write
    its run folder.

    Clears Pyro's param store and seeds every RNG from ``seed`` first, so a run is
    reproducible. The model and its default guide come from :func:`lvmkit.models.build`
    (with the training images for the output biases), the estimator from
    :func:`lvmkit.inference.registry.make_estimator`.

    :param model: a name in :data:`lvmkit.models.MODEL_NAMES`.
    :param train_set: a :class:`~lvmkit.data.Dataset` to train on.
    :param test_set: a :class:`~lvmkit.data.Dataset` to evaluate on; reconstructions and
        samples are plotted when it has an ``image_shape`` and the model can reconstruct.
    :param estimator: a name in :data:`lvmkit.inference.registry.ESTIMATOR_NAMES`.
    :param out: folder for ``run.json``, ``weights.pt``, ``history.json``, ``metrics.json``,
        ``loss.png`` and, where they apply, ``traces.png``, ``reconstructions.png`` and
        ``samples.png``; ``None`` writes nothing.
    :param eval_samples: importance samples K of the test log-likelihood.
    :param eval_points: evaluate the first this many test points (default: all).
    :param checkpoint_dir: passed to :func:`~lvmkit.inference.fit` (resumes from it).
    :param model_kwargs: constructor arguments of the model (recorded in ``run.json``).
    :returns: a :class:`RunResult`.
    :raises ValueError: for a ``batch_size`` larger than ``train_set``, before anything is
        written; as :func:`~lvmkit.inference.fit` for other bad arguments.

    Example: a small VAE trained for 5 steps with NVIL, into the run folder ``run``.

    >>> from lvmkit.data import load_dataset
    >>> train = load_dataset("digits", split="train")
    >>> test = load_dataset("digits", split="test")
    >>> from lvmkit.workflow import train_and_evaluate
    >>> result = train_and_evaluate("vae", train, test, estimator="nvil", steps=5,
    ...                             eval_samples=5, eval_points=10, out="run",
    ...                             progress=False, model_kwargs={"z_dim": 2, "hidden": (16,)})
    >>> sorted(result.files)
    ['history', 'loss', 'metrics', 'reconstructions', 'run', 'samples', 'weights']
    >>> result.metrics["elbo_estimator"], result.metrics["steps"]
    ('nvil', 5)
    """
    import pyro

    from lvmkit.inference import distributed, fit, log_likelihood
    from lvmkit.inference.registry import make_estimator
    from lvmkit.models import build

    # Under torchrun every rank trains (fit is data-parallel); rank 0 alone evaluates and
    # writes the run folder, and the other ranks return the training metrics only.
    if isinstance(batch_size, int) and batch_size > len(train_set):
        # fit refuses it too, but only after the run folder was begun
        raise ValueError(f"batch_size={batch_size} exceeds the {len(train_set)} images of "
                         f"train_set ({train_set.name})")
    context = distributed.setup()
    main_rank = context.is_main
    out = None if out is None or not main_rank else Path(out)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model_kwargs = dict(model_kwargs or {})
    # init_data: SBNs collapse to their prior without it (a resumed checkpoint overwrites it)
    model_fn, guide = build(model, train_set.x.shape[1], init_data=train_set.x, **model_kwargs)
    elbo = make_estimator(estimator, num_particles)
    if getattr(elbo, "fuse_passes", False) is None:
        # lvmkit's models broadcast over dimensions left of their plates (tests check it
        # for each), so REBAR-type estimators may take their fast path on them
        elbo.fuse_passes = True
    files: dict[str, Path] = {}
    run_record = {
        "model": model,
        "model_kwargs": model_kwargs,
        "dataset": train_set.name,
        "binarize": train_set.binarize,
        "elbo": estimator,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
    }
    history = fit(
        model_fn,
        guide,
        train_set,
        elbo=elbo,
        optim=pyro.optim.Adam({"lr": lr}),
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        checkpoint_dir=None if checkpoint_dir is None else os.fspath(checkpoint_dir),
        progress=progress,
    )
    if out is not None:
        # Only now, with the training done: a run that fails leaves the folder's previous
        # run whole (its run.json describing its weights), and the previous run's results
        # go with its weights rather than sit beside the new ones.
        for stale in [out / "metrics.json", *out.glob("evaluate_*.json")]:
            stale.unlink(missing_ok=True)
        files["run"] = write_json(out / "run.json", run_record)
        save_weights(out / "weights.pt", model_fn, guide)
        files["weights"] = out / "weights.pt"
        history.save(out / "history.json")
        files["history"] = out / "history.json"
        files.update(_plot_training(history, out, f"{model} ({estimator})"))

    last = history.loss[-max(1, len(history.loss) // 20) :]
    if not main_rank:
        # wait for rank 0's evaluation: leaving (or starting the next job's fit) while it
        # works alone would meet it in a collective with a timeout, or abort at exit
        distributed.wait_for_main(context)
        metrics = {"model": model, "elbo_estimator": estimator, "steps": steps,
                   "train_elbo": -float(sum(last) / len(last))}
        return RunResult(model=model_fn, guide=guide, history=history, metrics=metrics,
                         files=files)
    x_test = fixed_batch(test_set, eval_points, seed)
    with torch.no_grad():
        ll = log_likelihood(model_fn, guide, x_test, num_samples=eval_samples)
        elbo_test = log_likelihood(model_fn, guide, x_test, num_samples=1)
    if out is not None:
        files.update(_plot_images(model_fn, guide, test_set, out, model))
    metrics = {
        "model": model,
        "elbo_estimator": estimator,
        "steps": steps,
        "train_elbo": -float(sum(last) / len(last)),
        "test_elbo": float(elbo_test.mean()),
        "test_log_likelihood": float(ll.mean()),
        "num_samples": eval_samples,
        "test_points": int(x_test.shape[0]),
        "seconds": float(history.wall_time[-1]) if history.wall_time else 0.0,
    }
    if out is not None:
        files["metrics"] = write_json(out / "metrics.json", metrics)
    distributed.wait_for_main(context)
    return RunResult(model=model_fn, guide=guide, history=history, metrics=metrics, files=files)


def train_several(
    jobs: Sequence[tuple[str, str]],
    train_set: Any,
    test_set: Any,
    out: PathLike,
    *,
    log: Callable[[str], None] | None = print,
    **kwargs: Any,
) -> list[RunResult]:
    """:func:`train_and_evaluate` for each ``(model, estimator)`` of ``jobs`` on the same
    data, each into ``out/<model>`` (``out/<model>-<estimator>`` where a model repeats),
    then ``loss_curves.png``, ``results.md`` (:func:`format_table`) and ``results.json``
    in ``out``.

    :param jobs: ``[(model name, estimator name), ...]``, at least one.
    :param log: called with a line before each job (``None``: silent).
    :param kwargs: passed to every :func:`train_and_evaluate` (not ``out`` or ``estimator``).
    :returns: the :class:`RunResult` of each job, in order.

    Example:

    >>> import os
    >>> from lvmkit.data import load_dataset
    >>> train = load_dataset("digits", split="train")
    >>> test = load_dataset("digits", split="test")
    >>> from lvmkit.workflow import train_several
    >>> results = train_several([("vae", "trace"), ("vae", "nvil")], train, test, "runs",
    ...                         log=None, steps=2, eval_samples=2, eval_points=5,
    ...                         progress=False, model_kwargs={"z_dim": 2, "hidden": (16,)})
    >>> len(results), sorted(os.listdir("runs"))
    (2, ['loss_curves.png', 'results.json', 'results.md', 'vae-nvil', 'vae-trace'])
    """
    from lvmkit.inference import plots

    jobs = [tuple(job) for job in jobs]
    if not jobs or any(len(job) != 2 for job in jobs):
        raise ValueError(f"jobs must be a non-empty list of (model, estimator), got {jobs!r}")
    clash = {"out", "estimator"} & set(kwargs)
    if clash:
        raise TypeError(f"train_several sets {sorted(clash)} itself")
    models = [model for model, _ in jobs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, RunResult] = {}
    for model, estimator in jobs:
        name = model if models.count(model) == 1 else f"{model}-{estimator}"
        if log is not None:
            log(f"== training {model} with {estimator} for {kwargs.get('steps', 2000)} steps"
                f" on {train_set.name}")
        results[name] = train_and_evaluate(
            model, train_set, test_set, estimator=estimator, out=out / name, **kwargs
        )
    plots.plot_loss(
        {name: result.history for name, result in results.items()}, out / "loss_curves.png",
        title="training loss", ylabel="loss per datum (nats)",
    )
    rows = [result.metrics for result in results.values()]
    (out / "results.md").write_text(format_table(rows) + "\n")
    write_json(out / "results.json", rows)
    return list(results.values())


def _plot_training(history: Any, out: Path, title: str) -> dict[str, Path]:
    from lvmkit.inference import plots

    files = {
        "loss": plots.plot_loss(
            history, out / "loss.png", title=f"training loss, {title}",
            ylabel="loss per datum (nats)",
        )
    }
    if getattr(history, "extras", None):
        files["traces"] = plots.plot_traces(
            history, out / "traces.png", title=f"per-step traces, {title}", include_loss=True
        )
    return files


def _plot_images(model: Any, guide: Any, test_set: Any, out: Path, name: str) -> dict[str, Path]:
    from lvmkit.inference import plots

    image_shape = getattr(test_set, "image_shape", None)
    if not hasattr(model, "reconstruct") or image_shape is None:
        return {}
    x_show = test_set.x[:8]
    with torch.no_grad():
        recon = model.reconstruct(x_show, guide)
        samples = model.sample(16)
    return {
        "reconstructions": plots.plot_reconstructions(
            x_show, recon, image_shape, out / "reconstructions.png",
            title=f"{name}: test images (top), reconstructions (bottom, pixel probabilities)",
        ),
        "samples": plots.plot_image_grid(
            samples, image_shape, out / "samples.png",
            title=f"{name}: samples from the model (pixel probabilities)",
        ),
    }


def check_run_dir(run_dir: PathLike) -> Path:
    """``run_dir`` as a :class:`~pathlib.Path`, if it is a run folder (it holds ``run.json``
    and ``weights.pt``, as :func:`train_and_evaluate` writes them).

    :raises ValueError: naming the folder and the file it lacks.

    Example:

    >>> from lvmkit.workflow import check_run_dir
    >>> check_run_dir("nowhere")
    Traceback (most recent call last):
    ...
    ValueError: 'nowhere' is not a run folder written by `lvmkit train` (no run.json)
    """
    for name in ("run.json", "weights.pt"):
        if not (Path(run_dir) / name).is_file():
            raise ValueError(
                f"{str(run_dir)!r} is not a run folder written by `lvmkit train` (no {name})"
            )
    return Path(run_dir)


def load_run_data(
    run_dir: PathLike,
    split: str = "test",
    *,
    dataset: str | None = None,
    binarize: str | None = "run",
    seed: int = 0,
    images: PathLike | None = None,
    labels: PathLike | None = None,
) -> Any:
    """The data to evaluate a run folder on: by default the run's own dataset and
    binarization (from its ``run.json``), through :func:`lvmkit.data.load_dataset`.

    :param run_dir: a folder written by :func:`train_and_evaluate`.
    :param split: ``"train"``, ``"test"`` or ``"all"``.
    :param dataset: a dataset name (default: the run's).
    :param binarize: ``"static"``, ``"dynamic"``, ``None`` (grey values) or ``"run"``
        (default: as the run was trained).
    :param seed: seed of a static binarization.
    :param images: IDX image file, for dataset ``"idx"`` only (so is ``labels``).
    :raises ValueError: for a folder that is not a run folder, IDX paths with another
        dataset, dataset ``"idx"`` without both paths (a run folder does not keep them), or
        as :func:`~lvmkit.data.load_dataset`.

    Example:

    >>> from lvmkit.data import load_dataset
    >>> from lvmkit.workflow import load_run_data, train_and_evaluate
    >>> train = load_dataset("digits", split="train", binarize="dynamic")
    >>> _ = train_and_evaluate("vae", train, train, steps=1, eval_samples=1, eval_points=2,
    ...                        out="run", progress=False, model_kwargs={"z_dim": 2})
    >>> data = load_run_data("run")
    >>> data.name, data.binarize, len(data)
    ('digits', 'dynamic', 359)
    >>> load_run_data("run", "all", binarize=None).binarize is None
    True
    """
    from lvmkit.data import load_dataset

    run = json.loads((check_run_dir(run_dir) / "run.json").read_text())
    dataset = dataset or run["dataset"]
    if dataset != "idx" and (images is not None or labels is not None):
        raise ValueError(
            f"IDX image and label files (--idx-images, --idx-labels) are for dataset 'idx',"
            f" not {dataset!r}"
        )
    if dataset == "idx" and (images is None or labels is None):
        raise ValueError(
            f"dataset 'idx' needs the paths of its IDX image and label files (images= and"
            f" labels=, or --idx-images and --idx-labels); {str(run_dir)!r} does not keep them"
        )
    return load_dataset(
        dataset,
        split,
        run["binarize"] if binarize == "run" else binarize,
        seed,
        images=images,
        labels=labels,
    )


def load_run(
    run_dir: PathLike, x_dim: int, data_name: str | None = None
) -> tuple[dict[str, Any], Any, Any]:
    """Rebuild the model and guide of a run folder for data of ``x_dim`` pixels and load its
    weights into them (and into Pyro's param store, which is cleared first).

    :param data_name: the data's name, for the error message.
    :returns: ``(run, model, guide)`` where ``run`` is the folder's ``run.json``.
    :raises ValueError: if the weights do not fit ``x_dim`` (trained on other data).

    Example:

    >>> from lvmkit.data import load_dataset
    >>> train = load_dataset("digits", split="train")
    >>> test = load_dataset("digits", split="test")
    >>> from lvmkit.workflow import load_run, train_and_evaluate
    >>> result = train_and_evaluate("vae", train, test, steps=2, eval_samples=2,
    ...                             eval_points=5, out="run", progress=False,
    ...                             model_kwargs={"z_dim": 2, "hidden": (16,)})
    >>> run, model, guide = load_run("run", x_dim=64)
    >>> run["model"], run["model_kwargs"], type(guide).__name__
    ('vae', {'z_dim': 2, 'hidden': [16]}, 'GaussianEncoder')
    >>> load_run("run", x_dim=784)
    Traceback (most recent call last):
    ...
    ValueError: the weights in run do not fit data (784 pixels; the run used 'digits'): ...
    """
    import pyro

    from lvmkit.models import build

    run_dir = check_run_dir(run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    pyro.clear_param_store()
    model, guide = build(run["model"], x_dim, **run.get("model_kwargs", {}))
    try:
        load_weights(run_dir / "weights.pt", model, guide)
    except RuntimeError as err:  # load_state_dict's size mismatch
        what = "data" if data_name is None else f"dataset {data_name!r}"
        raise ValueError(
            f"the weights in {run_dir} do not fit {what} ({x_dim} pixels; the run used"
            f" {run['dataset']!r}): {str(err).splitlines()[0]}"
        ) from err
    return run, model, guide


def evaluate_run(
    run_dir: PathLike,
    data: Any,
    *,
    split: str = "test",
    num_samples: int = 5000,
    chunk_size: int = 100,
    limit: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """IWAE log-likelihood of a saved run on ``data``; writes ``evaluate_{split}.json`` there.

    :param run_dir: a folder written by :func:`train_and_evaluate`.
    :param data: a :class:`~lvmkit.data.Dataset` with the run's image size.
    :param split: the name recorded for ``data`` (and in the file name).
    :param limit: evaluate only the first this many points.
    :returns: ``{"run", "model", "dataset", "split", "num_samples", "points",
        "log_likelihood_mean", "log_likelihood_sem"}`` (``sem``: standard error of the mean
        over points; ``dataset``: the name of ``data``).
    :raises ValueError: as :func:`load_run`.

    Example:

    >>> from lvmkit.data import load_dataset
    >>> train = load_dataset("digits", split="train")
    >>> test = load_dataset("digits", split="test")
    >>> from lvmkit.workflow import evaluate_run, train_and_evaluate
    >>> result = train_and_evaluate("vae", train, test, steps=2, eval_samples=2,
    ...                             eval_points=5, out="run", progress=False,
    ...                             model_kwargs={"z_dim": 2, "hidden": (16,)})
    >>> scores = evaluate_run("run", test, num_samples=10, limit=20)
    >>> scores["points"], scores["num_samples"], scores["log_likelihood_mean"] < 0
    (20, 10, True)
    """
    import pyro

    from lvmkit.inference import log_likelihood

    run_dir = Path(run_dir)
    name = getattr(data, "name", None)
    run, model, guide = load_run(run_dir, data.x.shape[1], name)
    x = fixed_batch(data, limit, seed)
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        ll = log_likelihood(
            model, guide, x, num_samples=num_samples, chunk_size=chunk_size, progress=progress
        )
    result = {
        "run": str(run_dir),
        "model": run["model"],
        "dataset": name,
        "split": split,
        "num_samples": num_samples,
        "points": int(x.shape[0]),
        "log_likelihood_mean": float(ll.mean()),
        "log_likelihood_sem": float(ll.std() / max(1, ll.numel()) ** 0.5),
    }
    write_json(run_dir / f"evaluate_{split}.json", result)
    return result


def format_evaluation(result: dict[str, Any]) -> str:
    """One line that reports what :func:`evaluate_run` returned.

    Example:

    >>> from lvmkit.workflow import format_evaluation
    >>> print(format_evaluation({"model": "vae", "dataset": "digits", "split": "test",
    ...                          "num_samples": 5000, "points": 359,
    ...                          "log_likelihood_mean": -24.2081, "log_likelihood_sem": 0.31}))
    vae on digits/test: log p(x) >= -24.208 ± 0.310 (IWAE, K=5000, 359 points)
    """
    return (
        f"{result['model']} on {result['dataset']}/{result['split']}: log p(x) >= "
        f"{result['log_likelihood_mean']:.3f} ± {result['log_likelihood_sem']:.3f} "
        f"(IWAE, K={result['num_samples']}, {result['points']} points)"
    )


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of :attr:`RunResult.metrics` rows.

    Example:

    >>> from lvmkit.workflow import format_table
    >>> print(format_table([{"model": "vae", "elbo_estimator": "trace", "steps": 5,
    ...                      "train_elbo": -44.47, "test_elbo": -44.12,
    ...                      "test_log_likelihood": -44.17, "num_samples": 5, "seconds": 1}]))
    | model | estimator | steps | train ELBO | test ELBO | test log p(x) (IWAE) | s |
    |---|---|---:|---:|---:|---:|---:|
    | vae | trace | 5 | -44.47 | -44.12 | -44.17 (K=5) | 1 |
    """
    header = "| model | estimator | steps | train ELBO | test ELBO | test log p(x) (IWAE) | s |"
    lines = [header, "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['elbo_estimator']} | {r['steps']} | {r['train_elbo']:.2f} |"
            f" {r['test_elbo']:.2f} | {r['test_log_likelihood']:.2f} (K={r['num_samples']}) |"
            f" {r['seconds']:.0f} |"
        )
    return "\n".join(lines)
