"""Benchmark of the SVI runner and the chunked IWAE evaluation.

Run as ``python benchmarks/runner.py``; prints a markdown table and writes
``results/bench_runner.json``. Takes one to two minutes on one core.

(a) Runner overhead. Steps per second of ``fit(..., progress=False)`` against a bare
    ``pyro.infer.SVI`` loop on the same VAE (digits, batch 100), the same pre-drawn batches and
    the same N/B scaling. The two are timed alternately (fit, bare, fit, bare, ...) after one
    warm-up each, so drifts in machine load hit both alike; the table reports medians and the
    ratio of the median step times (fit / bare; the goal is <= 1.1) and the median ratio of
    paired runs. ``fit`` adds one inspection trace per call and a few list appends per step.

(b) Peak memory of ``log_likelihood`` at K = 5000 on a VAE, unchunked (all 5000 samples at
    once) against chunks of 100. Each configuration runs in its own fresh subprocess, which
    reads its peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) once
    after building the model and data and once after the evaluation. The difference is the
    memory the evaluation itself added at its peak. ``tracemalloc`` would miss torch's
    allocations, which do not go through Python's allocator. RSS deltas measured inside one
    process would be blurred by memory the allocator keeps after earlier work; a fresh process
    avoids that. A delta of 0 means the evaluation never rose above the peak the process had
    already reached while importing and loading data (tens of MiB): chunks of 100 samples x
    100 points need only a few MiB per tensor.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from pyro import poutine  # noqa: E402
from pyro.infer import SVI, Trace_ELBO  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lvmkit.data import load_dataset  # noqa: E402
from lvmkit.inference.evaluate import log_likelihood  # noqa: E402
from lvmkit.inference.training import fit  # noqa: E402

BATCH, STEPS, REPEATS = 100, 100, 9
NUM_SAMPLES, EVAL_POINTS = 5000, 100


class VAE(pyro.nn.PyroModule):
    """A one-layer Bernoulli VAE: 64 pixels, 16 Gaussian latents, 128 hidden units."""

    def __init__(self, dim: int = 64, latent: int = 16, hidden: int = 128):
        super().__init__()
        self.latent = latent
        self.decoder = torch.nn.Sequential(
            torch.nn.Linear(latent, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, dim))
        self.encoder = torch.nn.Sequential(
            torch.nn.Linear(dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2 * latent))

    def model(self, x, labels=None):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x, labels=None):
        pyro.module("encoder", self.encoder)
        loc, log_scale = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def time_fit(x: torch.Tensor) -> float:
    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = VAE()
    tic = time.perf_counter()
    fit(vae.model, vae.guide, x, steps=STEPS, batch_size=BATCH, progress=False, seed=0)
    return (time.perf_counter() - tic) / STEPS


def time_bare(x: torch.Tensor) -> float:
    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = VAE()
    pyro.set_rng_seed(0)
    generator = torch.Generator().manual_seed(0)
    n = x.shape[0]
    batches = []
    while len(batches) < STEPS:
        order = torch.randperm(n, generator=generator)
        batches.extend(order[i : i + BATCH] for i in range(0, n, BATCH))
    batches = batches[:STEPS]

    def scaled(fn):
        def wrapped(xb):
            with poutine.scale(scale=n / xb.shape[0]):
                return fn(xb)

        return wrapped

    svi = SVI(scaled(vae.model), scaled(vae.guide), pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    tic = time.perf_counter()
    for idx in batches:
        svi.step(x[idx])
    return (time.perf_counter() - tic) / STEPS


def runner_overhead() -> dict:
    x = load_dataset("digits", "train", binarize="static").x
    time_fit(x), time_bare(x)  # warm-up: lazy imports, allocator
    fit_times, bare_times = [], []
    for _ in range(REPEATS):
        fit_times.append(time_fit(x))
        bare_times.append(time_bare(x))
    fit_med, bare_med = statistics.median(fit_times), statistics.median(bare_times)
    # Each fit run is paired with the bare run right after it; the median of the pair ratios
    # is robust to load drifting on a shared machine.
    pair_ratio = statistics.median(f / b for f, b in zip(fit_times, bare_times, strict=True))
    return {
        "median_pair_ratio": pair_ratio,
        "steps": STEPS, "repeats": REPEATS, "batch_size": BATCH, "n_train": x.shape[0],
        "fit_steps_per_s": 1 / fit_med, "bare_steps_per_s": 1 / bare_med,
        "ratio_fit_over_bare": fit_med / bare_med,
        "fit_step_ms_all": [1e3 * t for t in fit_times],
        "bare_step_ms_all": [1e3 * t for t in bare_times],
    }


def memory_child(chunk_size: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vae = VAE()
    x = load_dataset("digits", "test", binarize="static").x[:EVAL_POINTS]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tic = time.perf_counter()
    result = log_likelihood(vae.model, vae.guide, x, num_samples=NUM_SAMPLES,
                            chunk_size=chunk_size, batch_size=EVAL_POINTS)
    seconds = time.perf_counter() - tic
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"chunk_size": chunk_size, "peak_delta_mib": (after - before) / 1024,
                      "baseline_mib": before / 1024, "seconds": seconds,
                      "mean_log_likelihood": result.mean().item()}))


def peak_memory(chunk_size: int) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child",
                          str(chunk_size)], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    torch.set_num_threads(1)
    overhead = runner_overhead()
    memory = [peak_memory(NUM_SAMPLES), peak_memory(100)]
    results = {"runner": overhead, "log_likelihood_memory": memory,
               "torch": torch.__version__, "pyro": pyro.__version__}
    os.makedirs(os.path.join(ROOT, "results"), exist_ok=True)
    with open(os.path.join(ROOT, "results", "bench_runner.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    print("| measurement | value |")
    print("|---|---|")
    print(f"| fit steps/s (median of {REPEATS} x {STEPS} steps) | "
          f"{overhead['fit_steps_per_s']:.1f} |")
    print(f"| bare SVI steps/s | {overhead['bare_steps_per_s']:.1f} |")
    print(f"| step time ratio fit / bare, of medians (goal <= 1.1) | "
          f"{overhead['ratio_fit_over_bare']:.3f} |")
    print(f"| step time ratio fit / bare, median of paired runs | "
          f"{overhead['median_pair_ratio']:.3f} |")
    for row in memory:
        label = "unchunked" if row["chunk_size"] == NUM_SAMPLES else f"chunk {row['chunk_size']}"
        print(f"| log_likelihood K={NUM_SAMPLES}, {EVAL_POINTS} points, {label}: peak RSS "
              f"added / time | {row['peak_delta_mib']:.0f} MiB / {row['seconds']:.1f} s |")
    same = abs(memory[0]["mean_log_likelihood"] - memory[1]["mean_log_likelihood"])
    print(f"| mean log-likelihood, unchunked vs chunked: abs difference | {same:.3f} nats |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-child":
        memory_child(int(sys.argv[2]))
    else:
        main()
