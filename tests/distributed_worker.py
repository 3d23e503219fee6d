"""One rank of the data-parallel tests (tests/test_distributed.py).

Run as ``torchrun --nproc_per_node W tests/distributed_worker.py SCENARIO OUT`` or, for the
single-process reference, ``python tests/distributed_worker.py SCENARIO OUT --batch B``.
Each rank writes what it ended with to ``OUT/<scenario>-rank<r>.pt``.
"""

from __future__ import annotations

import argparse
import os
import sys

import pyro
import pyro.distributions as dist
import pyro.optim
import torch
from pyro.infer.autoguide import AutoDelta

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)

from lvmkit.inference import RebarELBO, fit  # noqa: E402
from lvmkit.inference.distributed import setup  # noqa: E402


def regression_data(n: int = 63, dim: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 * torch.randn(n, generator=g)
    return torch.cat([x, y[:, None]], -1), y


def regression_model(data: torch.Tensor) -> None:
    """Bayesian linear regression: global weights and noise, one observation per row."""
    x, y = data[:, :-1], data[:, -1]
    w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[-1]), 1.0).to_event(1))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(x @ w, sigma), obs=y)


def params() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


def run_map(batch: int, steps: int, checkpoint_dir: str | None = None) -> dict:
    pyro.clear_param_store()
    data, _ = regression_data()
    guide = AutoDelta(regression_model)
    history = fit(regression_model, guide, data, steps=steps, batch_size=batch,
                  optim=pyro.optim.Adam({"lr": 0.05}), progress=False,
                  checkpoint_dir=checkpoint_dir, checkpoint_every=5)
    return {"params": params(), "loss": history.loss}


def scenario_map(batch: int, out: str) -> dict:
    """20 steps; then the same run interrupted after 10 steps and resumed to 20. N = 63 with
    a global batch of 16: every fourth batch holds 15, shards of 8 and 7."""
    full = run_map(batch, 20)
    ckpt = os.path.join(out, "map-ckpt")
    run_map(batch, 10, ckpt)
    resumed = run_map(batch, 20, ckpt)
    return {"full": full, "resumed": resumed}


def scenario_rebar(batch: int, out: str) -> dict:
    from lvmkit.guides import BernoulliEncoder

    pyro.clear_param_store()
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((48, 12), 0.3), generator=torch.Generator().manual_seed(1))
    decoder = torch.nn.Linear(6, 12)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            b = pyro.sample("b1", dist.Bernoulli(logits=torch.zeros(6)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(b)).to_event(1), obs=x)

    guide = BernoulliEncoder(12, layers=(6,))
    elbo = RebarELBO()
    history = fit(model, guide, x, elbo=elbo, steps=40, batch_size=batch,
                  optim=pyro.optim.Adam({"lr": 0.03}), progress=False)
    return {"params": params(), "loss": history.loss,
            "controls": {k: v.detach().clone() for k, v in elbo.controls.state_dict().items()}}


def scenario_fail(batch: int, out: str) -> dict:
    """Rank 1 raises in its third step; the job must end with that error."""
    rank = int(os.environ.get("RANK", 0))
    data, _ = regression_data()
    calls = {"n": 0}

    def model(data):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 4:  # the first call is fit's probe trace
            raise RuntimeError("rank 1 failed on purpose at its third step")
        regression_model(data)

    fit(model, AutoDelta(regression_model), data, steps=50, batch_size=batch, progress=False)
    return {}


SCENARIOS = {"map": scenario_map, "rebar": scenario_rebar, "fail": scenario_fail}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    pyro.set_rng_seed(0)
    context = setup()
    result = SCENARIOS[args.scenario](args.batch, args.out)
    result["world_size"] = context.world_size
    torch.save(result, os.path.join(args.out, f"{args.scenario}-rank{context.rank}.pt"))


if __name__ == "__main__":
    main()
