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


def test_dict_form_survives_a_checkpoint_file(tmp_path):
    saved = RandomState().as_dict()
    first = _draw()
    torch.save(saved, tmp_path / "rng.pt")
    RandomState.from_dict(torch.load(tmp_path / "rng.pt", weights_only=False)).restore()
    assert _draw() == first


def test_cuda_state_is_only_taken_once_cuda_is_in_use():
    # Saving CUDA's generators would start CUDA on a machine that has it but does not
    # use it; a CPU run's state holds none, and restores anywhere.
    state = RandomState()
    assert (state.cuda is None) == (not torch.cuda.is_initialized())
    if state.cuda is None:
        RandomState.from_dict(state.as_dict()).restore()
        assert not torch.cuda.is_initialized()
