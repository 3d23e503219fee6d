import os

import pyro
import pytest
import torch

# Two cores are shared between pytest-xdist workers: one intra-op thread each.
torch.set_num_threads(1)
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Every test starts with an empty param store, a fixed seed and validation on."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(True):
        yield
    pyro.clear_param_store()
