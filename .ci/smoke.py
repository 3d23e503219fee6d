"""Smoke test of an installed lvmkit wheel, run from outside the source tree."""

import os
import subprocess
import sys

import pyro
import pyro.distributions as dist
import torch

import lvmkit
from lvmkit import fit

here = os.path.dirname(os.path.abspath(lvmkit.__file__))
assert "site-packages" in here, f"lvmkit imported from the source tree: {here}"


def model(x):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x)


guide = pyro.infer.autoguide.AutoNormal(model)
history = fit(model, guide, torch.randn(50) + 3.0, steps=20, batch_size=10, progress=False)
assert len(history) == 20 and all(map(torch.isfinite, map(torch.tensor, history.loss)))
version = subprocess.run([os.path.join(os.path.dirname(sys.executable), "lvmkit"), "--version"],
                         capture_output=True, text=True, check=True).stdout.strip()
assert version == f"lvmkit {lvmkit.__version__}", version
print(f"wheel smoke test passed: {version}, 20 fit steps, imported from {here}")
