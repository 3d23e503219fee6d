"""Data-parallel fit: two gloo processes launched by torchrun on the CPU."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from lvmkit.inference.distributed import (
    DistributedContext,
    launched_by_torchrun,
    setup,
    shard,
)

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", LVMKIT_DIST_TIMEOUT="60",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def torchrun(scenario: str, out, nproc: int = 2, batch: int = 8, timeout: float = 120):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", WORKER, scenario,
           str(out), f"--batch={batch}"]
    return subprocess.run(cmd, env=worker_env(), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def single(scenario: str, out, batch: int):
    cmd = [sys.executable, WORKER, scenario, str(out), f"--batch={batch}"]
    return subprocess.run(cmd, env=worker_env(), capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def load(out, scenario, rank):
    return torch.load(os.path.join(out, f"{scenario}-rank{rank}.pt"), weights_only=False)


def assert_params_close(a, b, atol):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), (
            name, (a[name] - b[name]).abs().max().item())


def test_shards_partition_the_global_batch_in_order():
    for n in (0, 1, 5, 16, 17):
        idx = torch.randperm(max(n, 1))[:n]
        for world in (1, 2, 3):
            parts = [shard(idx, r, world) for r in range(world)]
            assert torch.equal(torch.cat(parts), idx)
            assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard(torch.arange(4), 2, 2)


def test_outside_torchrun_one_rank(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert not launched_by_torchrun()
    context = setup("cpu")
    assert context == DistributedContext(rank=0, world_size=1, device=torch.device("cpu"))
    assert not context.enabled and context.is_main
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "x",
           "MASTER_PORT": "1"}
    assert not launched_by_torchrun(env)
    assert launched_by_torchrun(dict(env, WORLD_SIZE="2"))


def test_map_fit_on_two_ranks_equals_one_process_with_the_doubled_batch(tmp_path):
    ran = torchrun("map", tmp_path, batch=8)
    assert ran.returncode == 0, ran.stderr[-3000:]
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = single("map", ref_dir, batch=16)
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = load(ref_dir, "map", 0)
    ranks = [load(tmp_path, "map", r) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and reference["world_size"] == 1
    for result in ranks:
        # identical on every rank (bit for bit: the same summed gradient, the same step)
        assert_params_close(result["full"]["params"], ranks[0]["full"]["params"], atol=0)
        assert_params_close(result["full"]["params"], reference["full"]["params"], atol=1e-5)
        # the reported loss is the global batch's, on every rank
        assert result["full"]["loss"] == pytest.approx(reference["full"]["loss"], rel=1e-5)
        # interrupted after 10 steps and resumed on 2 ranks: the uninterrupted run
        assert_params_close(result["resumed"]["params"], result["full"]["params"], atol=1e-6)
        assert result["resumed"]["loss"] == pytest.approx(result["full"]["loss"], rel=1e-6)


def test_rebar_on_two_ranks_stays_in_sync_and_trains(tmp_path):
    ran = torchrun("rebar", tmp_path, batch=8)
    assert ran.returncode == 0, ran.stderr[-3000:]
    r0, r1 = (load(tmp_path, "rebar", r) for r in range(2))
    assert_params_close(r0["params"], r1["params"], atol=0)
    assert_params_close(r0["controls"], r1["controls"], atol=0)
    assert r0["loss"] == r1["loss"]
    # the controls trained (temperature and eta left their initial values) ...
    assert not torch.allclose(r0["controls"]["log_temperature"], torch.tensor(0.5).log())
    # ... and so did the model: the loss fell
    first, last = sum(r0["loss"][:5]) / 5, sum(r0["loss"][-5:]) / 5
    assert last < first


def test_a_failing_rank_brings_the_job_down_with_its_error(tmp_path):
    tic = time.monotonic()
    ran = torchrun("fail", tmp_path, batch=8, timeout=120)
    assert ran.returncode != 0
    assert "rank 1 failed on purpose at its third step" in ran.stderr + ran.stdout
    assert time.monotonic() - tic < 90


def test_estimator_buffers_and_controls_are_found():
    """NVIL's moments are averaged over the ranks as buffers; REBAR's controls are
    parameters read through the param store, so RankSync sums and steps them with the
    model's (by name, the same on every rank)."""
    import pyro
    from pyro import poutine

    from lvmkit.inference import NVILELBO, RebarELBO
    from lvmkit.inference.distributed import _estimator_buffers
    from lvmkit.models import build

    nvil = NVILELBO()
    buffers = _estimator_buffers(nvil)
    assert {id(b) for b in buffers} == {id(nvil.moments.mean), id(nvil.moments.var)}
    rebar = RebarELBO()
    assert _estimator_buffers(rebar) == []
    model, guide = build("sbn-linear", x_dim=4, layers=(3,))
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    with poutine.trace(param_only=True) as capture:
        rebar.differentiable_loss(model, guide, x)
    store = pyro.get_param_store()
    captured = {id(store._params[n]) for n in capture.trace.nodes}
    assert {id(p) for p in rebar.controls.parameters()} <= captured


def test_lvmkit_train_under_torchrun(tmp_path):
    """The CLI trains data-parallel too: rank 0 alone writes the run folder and prints."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "lvmkit.cli",
           "train", "--model", "vae", "--dataset", "digits", "--steps", "6",
           "--batch-size", "20", "--eval-samples", "5", "--no-progress", "--out", str(out)]
    ran = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert (out / "metrics.json").exists() and (out / "weights.pt").exists()
    assert ran.stdout.count(f"wrote {out}") == 1
