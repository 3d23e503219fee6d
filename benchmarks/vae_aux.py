"""Auxiliary (hierarchical) VAE encoders against the mean-field encoder on MNIST-5k.

    python benchmarks/vae_aux.py run --jobs mf:0,k0:0,... [--steps 6000] [--out DIR]
    python benchmarks/vae_aux.py report [--out DIR]

Protocol (fixed before any run, from the papers, the same for every encoder):

- data: ``load_dataset("mnist5k")``, the library's stratified split (4,000 train / 1,000
  test); training images dynamically binarised (a fresh Bernoulli draw of the grey levels
  for every batch), the test images binarised once (seed 0), the same for every run;
- model: :class:`lvmkit.models.VAE`, z_dim 50 (Edward paper, Table 1: 50 latents), decoder
  MLP 50-200-200-784 tanh (the IWAE paper's one-stochastic-layer architecture), N(0, I)
  prior, Bernoulli pixels;
- encoders, every MLP 2 x 200 tanh:
  ``mf``: :class:`GaussianEncoder`, q(z | x);
  ``k0``: :class:`AuxiliaryEncoder` with a_dim = z_dim = 50 (Maaløe et al. 2016 use equal
  a and z sizes), q(a | x) q(z | a, x), reverse r(a | x, z), trained on the HVM /
  auxiliary bound (``num_aux_samples=0``);
  ``k5``, ``k25``: the same encoder trained on the IWHVI bound with K = 5, 25 reverse draws
  plus the ancestral a_0, DReG gradients for r (Sobolev & Vetrov 2019);
- training: ``Trace_ELBO()`` (one particle), Adam lr 1e-3, batch 100, the same number of
  steps for all (default 6,000 = 150 epochs; chosen for the time budget of the shared
  2-core machine, not near the papers' thousands of epochs);
- evaluation: test IWAE with M = 5,000 samples per image (``log_likelihood``). For the
  auxiliary encoders the proposal is the joint q(a, z | x) and the target
  p(x, z) r(a | x, z), whatever K the encoder was trained with (``num_aux_samples`` is set
  to 0 for the evaluation): a valid bound on log p(x) for every r, with the same 5,000
  decoder evaluations per image as the mean-field encoder's, so every encoder is scored by
  the same estimator at the same cost;
- diagnostics (200 test images, 1,000 training images): ELBO, how much of Var q(z | x) the
  auxiliary a explains, the reverse model's gap (the auxiliary bound with K = 0 against
  K = 256 reverse draws), the train-test gap.

Each ``run`` job writes ``DIR/<encoder>_s<seed>.json`` with the per-test-image
log-likelihoods, so that ``report`` can form the paired difference per test image.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO

from lvmkit.data import load_dataset
from lvmkit.guides import AuxiliaryEncoder, GaussianEncoder
from lvmkit.inference import elbo_per_datum, fit, log_likelihood
from lvmkit.models import VAE

X_DIM, Z_DIM, A_DIM, HIDDEN = 784, 50, 50, (200, 200)
ENCODERS = {"mf": None, "k0": 0, "k5": 5, "k25": 25}
LABELS = {"mf": "mean-field", "k0": "auxiliary (K=0, HVM bound)", "k5": "IWHVI K=5",
          "k25": "IWHVI K=25"}
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "results" / "vae_aux_runs"


def build(encoder: str, seed: int, clear: bool = True):
    """Model and guide, the decoder initialised from the same seed for every encoder.
    ``clear=False`` keeps the param store and gives the modules names of their own."""
    if clear:
        pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    suffix = "" if clear else f"_{encoder}"
    model = VAE(X_DIM, z_dim=Z_DIM, hidden=HIDDEN, name="vae" + suffix)
    if ENCODERS[encoder] is None:
        guide = GaussianEncoder(X_DIM, Z_DIM, HIDDEN, name="encoder" + suffix)
    else:
        guide = AuxiliaryEncoder(X_DIM, Z_DIM, A_DIM, HIDDEN, num_aux_samples=ENCODERS[encoder],
                                 name="aux_encoder" + suffix)
    return model, guide


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def aux_usage(guide: AuxiliaryEncoder, x: torch.Tensor, draws: int = 64,
              x_dim: int = X_DIM) -> float:
    """Mean over images of ``Σ_d Var_a E[z_d | a, x] / Σ_d Var(z_d | x)``: the share of
    q(z | x)'s variance that comes from the auxiliary a (0: q(z | a, x) ignores a, and the
    encoder is a Gaussian mean-field one)."""
    from lvmkit.nn import gaussian_params

    a_loc, a_scale = gaussian_params(guide.aux_net(x))
    a = a_loc + a_scale * torch.randn((draws,) + a_loc.shape)
    context = torch.nn.functional.linear(x, guide.z_net[0].weight[:, :x_dim])
    q_z = guide._q_z(context, a)
    mean, var = q_z.base_dist.loc, q_z.base_dist.scale ** 2
    between = mean.var(0).sum(-1)
    within = var.mean(0).sum(-1)
    return float((between / (between + within)).mean())


def elbo_with_k(model, guide, x, k: int, samples: int = 16) -> float:
    """Mean per-image auxiliary bound with k reverse draws at evaluation."""
    saved = guide.num_aux_samples
    guide.num_aux_samples = k
    pyro.set_rng_seed(30_000)  # the same (a_0, z) draws for every k: paired differences
    try:
        return float(elbo_per_datum(model, guide, x, num_samples=samples, chunk_size=16).mean())
    finally:
        guide.num_aux_samples = saved


def run_job(encoder: str, seed: int, steps: int, num_samples: int, out: Path,
            test_images: int = 1000) -> dict:
    train = load_dataset("mnist5k", "train", binarize="dynamic")
    train_static = load_dataset("mnist5k", "train", binarize="static", seed=0)
    test = load_dataset("mnist5k", "test", binarize="static", seed=0)
    model, guide = build(encoder, seed)
    start = time.perf_counter()
    history = fit(model, guide, train, elbo=Trace_ELBO(), optim=pyro.optim.Adam({"lr": 1e-3}),
                  steps=steps, batch_size=100, seed=seed, progress=False)
    train_seconds = time.perf_counter() - start
    k_train = ENCODERS[encoder]
    if k_train is not None:
        guide.num_aux_samples = 0  # the joint-proposal IWAE: same estimator for every K
    pyro.set_rng_seed(10_000 + seed)
    start = time.perf_counter()
    ll = log_likelihood(model, guide, test.x[:test_images], num_samples=num_samples,
                        chunk_size=500,
                        batch_size=100)
    eval_seconds = time.perf_counter() - start
    pyro.set_rng_seed(20_000 + seed)
    diag_test, diag_train = test.x[:200], train_static.x[:1000]
    diagnostics = {
        "test_elbo": float(elbo_per_datum(model, guide, diag_test, num_samples=16).mean()),
        "train_elbo": float(elbo_per_datum(model, guide, diag_train, num_samples=16).mean()),
        "test_iwae_200": float(ll[:200].mean()),
    }
    if k_train is not None:
        diagnostics["aux_usage"] = aux_usage(guide, diag_test)
        for k in (0, 5, 25, 256):
            diagnostics[f"test_elbo_k{k}"] = elbo_with_k(model, guide, diag_test, k)
        guide.num_aux_samples = k_train
    row = {
        "encoder": encoder, "seed": seed, "steps": steps, "num_samples": num_samples,
        "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        "final_train_loss_last_epoch": statistics.mean(history.loss[-40:]),
        "encoder_parameters": count(guide), "decoder_parameters": count(model),
        "test_images": len(ll), "test_ll_mean": float(ll.mean()), "diagnostics": diagnostics,
        "test_ll": [round(float(v), 5) for v in ll],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{encoder}_s{seed}.json").write_text(json.dumps(row))
    print(f"{encoder} seed {seed}: test IWAE-{num_samples} {row['test_ll_mean']:.3f} "
          f"train {train_seconds:.0f}s eval {eval_seconds:.0f}s {diagnostics}", flush=True)
    return row


def probe_digits(seeds: int = 2, epochs: int = 150) -> list[dict]:
    """Is the collapse of ``a`` an optimisation problem? On digits (8x8, fast): the auxiliary
    encoder from its default init, and from an init whose ``q(z | a, x)`` depends on ``a``
    strongly (the first layer's ``a`` columns scaled by 5), against mean-field. Test IWAE-500
    and the share of Var q(z | x) that ``a`` explains, at the end of training."""
    train = load_dataset("digits", "train", binarize="dynamic")
    test = load_dataset("digits", "test", binarize="static", seed=0)
    rows = []
    for seed in range(seeds):
        for label, k, scale in (("mf", None, 1.0), ("k0", 0, 1.0), ("k0-a-init5", 0, 5.0),
                                ("k25", 25, 1.0), ("k25-a-init5", 25, 5.0)):
            pyro.clear_param_store()
            pyro.set_rng_seed(seed)
            model = VAE(64, z_dim=8, hidden=(100,))
            if k is None:
                guide = GaussianEncoder(64, 8, (100,))
            else:
                guide = AuxiliaryEncoder(64, 8, 8, (100,), num_aux_samples=k)
                with torch.no_grad():
                    guide.z_net[0].weight[:, 64:] *= scale
            start_usage = aux_usage(guide, test.x[:200], x_dim=64) if k is not None else None
            fit(model, guide, train, elbo=Trace_ELBO(), optim=pyro.optim.Adam({"lr": 1e-3}),
                epochs=epochs, batch_size=100, seed=seed, progress=False)
            if k is not None:
                guide.num_aux_samples = 0
            pyro.set_rng_seed(10_000 + seed)
            ll = log_likelihood(model, guide, test.x, num_samples=500, chunk_size=500)
            row = {"encoder": label, "seed": seed, "test_ll": [float(v) for v in ll],
                   "test_ll_mean": float(ll.mean())}
            if k is not None:
                row["aux_usage_start"] = start_usage
                row["aux_usage"] = aux_usage(guide, test.x[:200], x_dim=64)
                row["test_elbo_k0"] = elbo_with_k(model, guide, test.x[:200], 0)
                row["test_elbo_k256"] = elbo_with_k(model, guide, test.x[:200], 256)
            print({k_: v for k_, v in row.items() if k_ != "test_ll"}, flush=True)
            rows.append(row)
    return rows


def time_steps(rounds: int = 5, per_round: int = 10) -> dict:
    """Seconds per training step of every encoder, measured interleaved (A, B, C, D, A, ...)
    on one batch, so that load from other processes hits all alike."""
    data = load_dataset("mnist5k", "train", binarize="static", seed=0)
    x = data.x[:100]
    svis, seconds = {}, {}
    pyro.clear_param_store()
    for encoder in ENCODERS:
        model, guide = build(encoder, 0, clear=False)
        svis[encoder] = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
        svis[encoder].step(x)
        seconds[encoder] = 0.0
    for _ in range(rounds):
        for encoder, svi in svis.items():
            start = time.perf_counter()
            for _ in range(per_round):
                svi.step(x)
            seconds[encoder] += time.perf_counter() - start
    per_step = {k: v / (rounds * per_round) for k, v in seconds.items()}
    return {"seconds_per_step": per_step,
            "ratio_to_mf": {k: v / per_step["mf"] for k, v in per_step.items()}}


def paired(rows: dict, a: str, b: str, seeds: list[int]) -> dict:
    """Difference ``a - b`` of test log-likelihoods, paired per test image and seed.

    ``se_points``: the seed-averaged per-image differences' standard error over the test
    images (the criterion: the same test images, the test set's sampling error);
    ``se_seeds``: the standard error of the per-seed mean differences over seeds (the
    training randomness, from 3 values)."""
    per_seed = [torch.tensor(rows[(a, s)]["test_ll"]) - torch.tensor(rows[(b, s)]["test_ll"])
                for s in seeds]
    stacked = torch.stack(per_seed)
    per_image = stacked.mean(0)
    seed_means = stacked.mean(1)
    diff = float(per_image.mean())
    se_points = float(per_image.std() / math.sqrt(per_image.numel()))
    se_seeds = float(seed_means.std() / math.sqrt(len(seeds))) if len(seeds) > 1 else math.nan
    return {"diff": diff, "se_points": se_points, "se_seeds": se_seeds,
            "z_points": diff / se_points, "z_seeds": diff / se_seeds if se_seeds else math.nan,
            "per_seed": [float(v) for v in seed_means]}


def report(out: Path, timing: dict | None, command: str) -> dict:
    rows = {}
    for path in sorted(out.glob("*_s*.json")):
        row = json.loads(path.read_text())
        rows[(row["encoder"], row["seed"])] = row
    encoders = [e for e in ENCODERS if any(k[0] == e for k in rows)]
    seeds = sorted({s for (_, s) in rows})
    complete = [e for e in encoders if all((e, s) in rows for s in seeds)]
    summary = {}
    for e in encoders:
        runs = [rows[(e, s)] for s in seeds if (e, s) in rows]
        means = [r["test_ll_mean"] for r in runs]
        points = torch.stack([torch.tensor(r["test_ll"]) for r in runs]).mean(0)
        summary[e] = {
            "seeds": [r["seed"] for r in runs], "test_ll": statistics.mean(means),
            "se_seeds": statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1
            else math.nan,
            "se_points": float(points.std() / math.sqrt(points.numel())),
            "runs": means,
            "encoder_parameters": runs[0]["encoder_parameters"],
            "train_seconds": statistics.mean(r["train_seconds"] for r in runs),
            "diagnostics": {k: statistics.mean(r["diagnostics"][k] for r in runs)
                            for k in runs[0]["diagnostics"]},
        }
    comparisons = {}
    for a in complete:
        for b in complete:
            if a != b and (a, b) in {("k0", "mf"), ("k5", "mf"), ("k25", "mf"), ("k5", "k0"),
                                     ("k25", "k0"), ("k25", "k5")}:
                comparisons[f"{a}-{b}"] = paired(rows, a, b, seeds)
    result = {"command": command, "seeds": seeds, "summary": summary,
              "comparisons": comparisons, "timing": timing,
              "protocol": {"z_dim": Z_DIM, "a_dim": A_DIM, "hidden": list(HIDDEN),
                           "steps": next(iter(rows.values()))["steps"] if rows else None,
                           "num_samples": next(iter(rows.values()))["num_samples"]
                           if rows else None,
                           "batch_size": 100, "lr": 1e-3, "data": "mnist5k 4000/1000"}}
    return result


def markdown(result: dict) -> str:
    p = result["protocol"]
    lines = ["# Auxiliary VAE encoders on MNIST-5k", "",
             f"Test IWAE-{p['num_samples']} (nats per image, higher is better) after "
             f"{p['steps']} steps of batch {p['batch_size']} (Adam {p['lr']}), z_dim "
             f"{p['z_dim']}, a_dim {p['a_dim']}, every MLP {p['hidden']} tanh, seeds "
             f"{result['seeds']}. Reproduce: `{result['command']}`.", "",
             "| encoder | test log p(x) >= | s.e. (seeds) | s.e. (test images) | encoder params "
             "| train s/step ratio to mf |", "|---|---|---|---|---|---|"]
    timing = (result.get("timing") or {}).get("ratio_to_mf", {})
    for e, s in result["summary"].items():
        ratio = f"{timing[e]:.2f}" if e in timing else "-"
        lines.append(f"| {LABELS[e]} | {s['test_ll']:.3f} | {s['se_seeds']:.3f} | "
                     f"{s['se_points']:.3f} | {s['encoder_parameters']:,} | {ratio} |")
    lines += ["", "Paired differences (per test image, same seed; mean over seeds and images):",
              "", "| difference | nats | s.e. (images) | z | s.e. (seeds) | z | per seed |",
              "|---|---|---|---|---|---|---|"]
    for k, c in result["comparisons"].items():
        lines.append(f"| {k} | {c['diff']:+.3f} | {c['se_points']:.3f} | {c['z_points']:+.1f} "
                     f"| {c['se_seeds']:.3f} | {c['z_seeds']:+.1f} | "
                     + ", ".join(f"{v:+.2f}" for v in c["per_seed"]) + " |")
    lines += ["", "Diagnostics (means over seeds; ELBOs with 16 samples on 200 test / 1,000 "
              "training images; aux bound with K reverse draws at evaluation):", ""]
    keys = sorted({k for s in result["summary"].values() for k in s["diagnostics"]})
    lines.append("| encoder | " + " | ".join(keys) + " |")
    lines.append("|---|" + "---|" * len(keys))
    for e, s in result["summary"].items():
        lines.append(f"| {e} | " + " | ".join(
            f"{s['diagnostics'][k]:.3f}" if k in s["diagnostics"] else "-" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["run", "report", "timing", "probe"])
    parser.add_argument("--jobs", default=",".join(f"{e}:{s}" for s in range(3)
                                                   for e in ENCODERS))
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--test-images", type=int, default=1000,
                        help="the first n test images (the split is in stratified order)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--results", type=Path,
                        default=Path(__file__).resolve().parent.parent / "results")
    parser.add_argument("--command", default="")
    parser.add_argument("--notes", type=Path, default=None,
                        help="a markdown file appended to the report (the analysis)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.mode == "run":
        for job in args.jobs.split(","):
            encoder, seed = job.split(":")
            run_job(encoder, int(seed), args.steps, args.num_samples, args.out,
                    args.test_images)
    elif args.mode == "probe":
        rows = probe_digits()
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "probe_digits.json").write_text(json.dumps(rows))
    elif args.mode == "timing":
        timing = time_steps()
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "timing.json").write_text(json.dumps(timing))
        print(timing)
    else:
        timing_path = args.out / "timing.json"
        timing = json.loads(timing_path.read_text()) if timing_path.exists() else None
        result = report(args.out, timing, args.command)
        (args.results / "bench_vae_aux.json").write_text(json.dumps(result, indent=1))
        text = markdown(result)
        if args.notes is not None:
            text += "\n" + args.notes.read_text()
        (args.results / "bench_vae_aux.md").write_text(text)
        print(markdown(result))


if __name__ == "__main__":
    main()
