"""Saving and restoring random generator states around work that must not disturb them."""

from __future__ import annotations

import random

import numpy as np
import torch


class RandomState:
    """The generator states as they are now, to put back with :meth:`restore` (or on
    leaving a ``with`` block): torch's CPU generator and, once CUDA is in use, its
    generators; also Python's and NumPy's (every generator ``pyro.set_rng_seed`` seeds)
    unless ``torch_only``."""

    def __init__(self, torch_only: bool = False) -> None:
        self.torch = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.python = None if torch_only else random.getstate()
        self.numpy = None if torch_only else np.random.get_state()

    def as_dict(self) -> dict:
        """The states as a picklable dict (the form :func:`lvmkit.inference.fit`'s
        checkpoints hold)."""
        return {"torch": self.torch, "python": self.python, "numpy": self.numpy,
                "cuda": self.cuda}

    @classmethod
    def from_dict(cls, saved: dict) -> RandomState:
        """The states of :meth:`as_dict`, to :meth:`restore`."""
        state = cls.__new__(cls)
        state.torch = saved["torch"]
        state.python = saved.get("python")
        state.numpy = saved.get("numpy")
        state.cuda = saved.get("cuda")
        return state

    def restore(self) -> None:
        torch.set_rng_state(self.torch)
        # CUDA's states are skipped where there is no CUDA (a GPU run resumed on a CPU).
        if self.cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.cuda)
        if self.python is not None:
            random.setstate(self.python)
        if self.numpy is not None:
            np.random.set_state(self.numpy)

    def __enter__(self) -> RandomState:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()
