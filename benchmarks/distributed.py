"""Benchmark of data-parallel ``fit``: 1 against W processes under torchrun.

Run as ``python benchmarks/distributed.py [--device cpu|cuda] [--nproc 2]``; prints a markdown
table and writes ``results/bench_distributed.json``. About a minute on the CPU.

Every configuration trains the same VAE (``lvmkit.models`` Gaussian VAE on the 8x8 digits)
with the same per-process batch, so W processes take W times the samples per step. Each
configuration runs in a fresh ``torchrun`` job (one process counts as a job of one rank,
launched the same way); each rank times its steps after a warm-up, and rank 0 reports the
median over rounds. On a 2-core CPU two processes share the cores a single one could use
(one intra-op thread each), so no speed-up is expected there: the table's point is the cost
of the gradient all-reduce, as the ratio of step times.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BATCH, WARMUP, STEPS, ROUNDS = 100, 20, 100, 3


def worker(out: str, device: str) -> None:
    import pyro
    import torch

    from lvmkit.data import load_dataset
    from lvmkit.inference import fit
    from lvmkit.inference.distributed import setup
    from lvmkit.models.registry import build

    torch.set_num_threads(1)
    context = setup(device)
    x = load_dataset("digits", split="train").x
    times = []
    for _ in range(ROUNDS):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model, guide = build("vae", x.shape[1], init_data=x)
        model.to(context.device)
        guide.to(context.device)
        fit(model, guide, x, steps=WARMUP, batch_size=BATCH, progress=False,
            device=context.device)
        if context.device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        fit(model, guide, x, steps=STEPS, batch_size=BATCH, progress=False,
            device=context.device)
        if context.device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - tic) / STEPS)
    if context.is_main:
        with open(out, "w") as handle:
            json.dump({"world_size": context.world_size, "step_s": statistics.median(times)},
                      handle)


def launch(nproc: int, device: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={port}", __file__, "--worker", out,
               "--device", device]
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run(cmd, env=env, check=True, cwd=ROOT)
        with open(out) as handle:
            return json.load(handle)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(ROOT, "results", "bench_distributed.json"))
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.device)
        return {}
    from benchmarks._report import write_report

    rows = []
    for nproc in sorted({1, args.nproc}):
        result = launch(nproc, args.device)
        step = result["step_s"]
        rows.append({"processes": nproc, "ms_per_step": 1e3 * step,
                     "steps_per_s": 1 / step, "samples_per_s": nproc * BATCH / step})
    base = rows[0]["ms_per_step"]
    lines = [f"Data-parallel fit, VAE on digits, batch {BATCH} per process, device "
             f"{args.device}", "",
             "| processes | ms per step | steps/s | samples/s | step time / 1 process |",
             "|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['processes']} | {row['ms_per_step']:.2f} | "
                     f"{row['steps_per_s']:.1f} | {row['samples_per_s']:.0f} | "
                     f"{row['ms_per_step'] / base:.2f} |")
    report = {"device": args.device, "batch_per_process": BATCH, "rows": rows}
    suffix = "" if args.device == "cpu" else f"_{args.device}"
    write_report(report, args.out.replace(".json", f"{suffix}.json"), "\n".join(lines) + "\n")
    return report


if __name__ == "__main__":
    main()
