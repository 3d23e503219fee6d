import random

import numpy as np
import torch

from lvmkit._rng import RandomState


def _draw():
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def test_restore_repeats_every_generator():
    with RandomState():
        first = _draw()
    assert _draw() == first


def test_torch_only_leaves_python_and_numpy_alone():
    state = RandomState(torch_only=True)
    torch_first, python_first, numpy_first = _draw()
    state.restore()
    torch_again, python_again, numpy_again = _draw()
    assert torch_again == torch_first
    assert python_again != python_first and numpy_again != numpy_first
