"""Seconds per REBAR training step, lvmkit against a hand-written plain-PyTorch REBAR.

    python benchmarks/step_time.py [--steps N] [--rounds R] [--out results/bench_step_time.json]

On the nonlinear and the linear one-layer SBN (200 binary units; MNIST-5k, static
binarization, batches of 24 scaled to the data set size as in training) it times, in one
process and interleaved step by step on the same batch so that load on a shared machine
falls on all of them alike:

- ``RebarELBO`` through ``pyro.infer.SVI`` with ``pyro.optim.Adam`` (the usual way);
- ``RebarELBO`` as an ``nn.Module`` (``elbo(model, guide)``) with one ``torch.optim.Adam``
  over its parameters, the form Lightning and DDP use;
- ``RelaxELBO`` through ``SVI`` (REBAR plus its control network, goal: within 1.1x REBAR);
- Pyro's ``Trace_ELBO`` through ``SVI`` (the score function, the other goal's yardstick);
- the hand-written REBAR of ``handwritten_rebar.py`` (one ``torch.optim.Adam``);
- the hand-written score-function estimator of the same file, which computes what
  ``Trace_ELBO`` computes (a test checks it): ``Trace_ELBO`` against it is Pyro's own
  per-step overhead, on the simplest estimator.

Besides the ratios of the goals, it reports ``(REBAR - Trace_ELBO) / (hand-written REBAR -
hand-written score function)``: what REBAR adds to a score-function step in lvmkit,
against what it adds in plain PyTorch.

Each round takes the median over ``--steps`` steps after ``--warmup`` steps; the ratios
are reported per round and as the median over rounds. The five share nothing but the
data, and only the time per step is measured here: ``estimators.py`` has the ELBOs and the
gradient variances. Goals from the estimator issue: REBAR at most 3x a ``Trace_ELBO``
step and at most 1.5x the hand-written REBAR.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _report import write_report  # noqa: E402
from handwritten_rebar import HandwrittenRebar, HandwrittenScoreFunction  # noqa: E402

MODELS = {"sbn-nonlinear": True, "sbn-linear": False}
LABELS = ("rebar-svi", "rebar-module", "relax-svi", "trace-elbo", "handwritten",
          "handwritten-score")


def _scaled(fn: Callable, scale: float) -> Callable:
    import pyro.poutine as poutine

    def wrapped(*args, **kwargs):
        with poutine.scale(scale=scale):
            return fn(*args, **kwargs)

    return wrapped


def _pyro_pair(name: str, x: torch.Tensor, scale: float, prefix: str):
    """A fresh model and guide with their own parameter names, scaled to the data size,
    on the data's device, and the two modules themselves (whose parameters an optimizer
    must be given)."""
    from lvmkit.models import SigmoidBeliefNet

    model = SigmoidBeliefNet(x.shape[1], nonlinear=MODELS[name], name=prefix, init_data=x)
    model = model.to(x.device)
    guide = model.default_guide().to(x.device)
    return _scaled(model, scale), _scaled(guide, scale), (model, guide)


Step = Callable[[torch.Tensor], object]


def step_functions(name: str, x: torch.Tensor, batch_size: int, lr: float, seed: int
                   ) -> dict[str, tuple[Step, list[torch.Tensor]]]:
    """Per implementation, a training-step callable and the model and guide parameters it
    trains (each implementation owns its own)."""
    import pyro
    from pyro.infer import SVI, Trace_ELBO

    from lvmkit.inference import RebarELBO, RelaxELBO

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    scale = x.shape[0] / batch_size
    steps = {}

    model, guide, modules = _pyro_pair(name, x, scale, "svi")
    elbo = RebarELBO(fuse_passes=True)  # the fast path: lvmkit's SBNs broadcast
    # the controls at the estimator's rate, as fit gives them
    svi = SVI(model, guide, pyro.optim.Adam(elbo.optim_args({"lr": lr})), elbo)
    steps["rebar-svi"] = svi.step, _parameters(modules)

    model, guide, modules = _pyro_pair(name, x, scale, "module")
    elbo = RebarELBO(fuse_passes=True)  # the fast path: lvmkit's SBNs broadcast
    elbo.initialize(model, guide, x[:batch_size])
    module = elbo(model, guide)
    # The scaled wrappers are plain functions, so ``module.parameters()`` holds only the
    # estimator's controls: the model's and guide's parameters are added explicitly.
    optim = torch.optim.Adam(_parameters(modules) + list(module.parameters()), lr=lr)

    def module_step(batch: torch.Tensor) -> float:
        optim.zero_grad()
        loss = module(batch)
        loss.backward()
        optim.step()
        return float(loss.detach())

    steps["rebar-module"] = module_step, _parameters(modules)

    model, guide, modules = _pyro_pair(name, x, scale, "relax")
    elbo = RelaxELBO(fuse_passes=True)
    svi = SVI(model, guide, pyro.optim.Adam(elbo.optim_args({"lr": lr})), elbo)
    steps["relax-svi"] = svi.step, _parameters(modules)

    model, guide, modules = _pyro_pair(name, x, scale, "score")
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    steps["trace-elbo"] = svi.step, _parameters(modules)

    hand = HandwrittenRebar(x.shape[1], nonlinear=MODELS[name], lr=lr, seed=seed,
                            device=x.device)
    steps["handwritten"] = (lambda batch: hand.step(batch, scale),
                            hand.guide_params + hand.model_params)

    score = HandwrittenScoreFunction(x.shape[1], nonlinear=MODELS[name], lr=lr, seed=seed,
                                     device=x.device)
    steps["handwritten-score"] = (lambda batch: score.step(batch, scale),
                                  score.guide_params + score.model_params)
    return steps


def _parameters(modules) -> list[torch.Tensor]:
    return [p for m in modules for p in m.parameters()]


def time_round(steps: dict, x: torch.Tensor, batch_size: int, count: int, warmup: int,
               seed: int) -> dict[str, float]:
    """Median seconds per step of each implementation, interleaved on shared batches."""
    generator = torch.Generator().manual_seed(seed)
    times: dict[str, list[float]] = {label: [] for label in steps}
    # On a GPU a step's kernels run after its Python returns: wait for them.
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    for i in range(warmup + count):
        batch = x[torch.randint(x.shape[0], (batch_size,), generator=generator)]
        for label, (step, _) in steps.items():
            sync()
            tic = time.perf_counter()
            step(batch)
            sync()
            if i >= warmup:
                times[label].append(time.perf_counter() - tic)
    return {label: statistics.median(t) for label, t in times.items()}


def ratios(seconds: dict[str, float]) -> dict[str, float]:
    return {
        "rebar-svi / handwritten": seconds["rebar-svi"] / seconds["handwritten"],
        "rebar-module / handwritten": seconds["rebar-module"] / seconds["handwritten"],
        "rebar-svi / trace-elbo": seconds["rebar-svi"] / seconds["trace-elbo"],
        "relax-svi / rebar-svi": seconds["relax-svi"] / seconds["rebar-svi"],
        "trace-elbo / handwritten-score": seconds["trace-elbo"] / seconds["handwritten-score"],
        "added by rebar: lvmkit / hand-written": (
            (seconds["rebar-svi"] - seconds["trace-elbo"])
            / (seconds["handwritten"] - seconds["handwritten-score"])
        ),
    }


def markdown(report: dict) -> str:
    lines = [
        "| model | REBAR (SVI) ms | REBAR (nn.Module) ms | RELAX (SVI) ms | Trace_ELBO ms |"
        " hand-written ms | hand-written score fn. ms | SVI / hand | module / hand |"
        " SVI / Trace_ELBO | RELAX / REBAR | Trace_ELBO / hand score fn. |"
        " REBAR's addition, lvmkit / hand |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in report["models"].items():
        ms = {k: 1e3 * v for k, v in entry["median_seconds"].items()}
        r = entry["median_ratios"]
        lines.append(
            f"| {name} | {ms['rebar-svi']:.1f} | {ms['rebar-module']:.1f} | "
            f"{ms['relax-svi']:.1f} | {ms['trace-elbo']:.1f} | {ms['handwritten']:.1f} | "
            f"{ms['handwritten-score']:.1f} | "
            f"{r['rebar-svi / handwritten']:.2f} | {r['rebar-module / handwritten']:.2f} | "
            f"{r['rebar-svi / trace-elbo']:.2f} | {r['relax-svi / rebar-svi']:.2f} | "
            f"{r['trace-elbo / handwritten-score']:.2f} | "
            f"{r['added by rebar: lvmkit / hand-written']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (a GPU)")
    parser.add_argument("--out", default="results/bench_step_time.json")
    args = parser.parse_args(argv)
    if min(args.steps, args.rounds, args.batch_size) < 1 or args.warmup < 0:
        parser.error("--steps, --rounds and --batch-size must be positive, --warmup >= 0")

    from lvmkit.data import load_dataset

    x = load_dataset("mnist5k", "train", binarize="static").x.to(args.device)
    device = (torch.cuda.get_device_name(x.device) if x.device.type == "cuda"
              else platform.processor() or platform.machine())
    report = {"config": {**vars(args), "threads": torch.get_num_threads(),
                         "torch": torch.__version__, "device_name": device}, "models": {}}
    for name in MODELS:
        steps = step_functions(name, x, args.batch_size, args.lr, args.seed)
        rounds = []
        for r in range(args.rounds):
            seconds = time_round(steps, x, args.batch_size, args.steps, args.warmup,
                                 args.seed + r)
            rounds.append({"seconds": seconds, "ratios": ratios(seconds)})
            shown = ", ".join(f"{k} {v:.2f}" for k, v in rounds[-1]["ratios"].items())
            print(f"{name} round {r + 1}: {shown}", flush=True)
        report["models"][name] = {
            "rounds": rounds,
            "median_seconds": {k: statistics.median(rd["seconds"][k] for rd in rounds)
                               for k in LABELS},
            "median_ratios": {k: statistics.median(rd["ratios"][k] for rd in rounds)
                              for k in rounds[0]["ratios"]},
        }
    write_report(report, args.out, markdown(report))
    return report


if __name__ == "__main__":
    main()
