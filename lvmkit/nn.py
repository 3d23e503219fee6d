"""Network layers and argument checks shared by the models and the guides.

The generative side (:mod:`lvmkit.models`) and the inference side (:mod:`lvmkit.guides`)
both build on these; neither imports the other for them.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MIN_SCALE", "check_size", "check_unsupervised", "gaussian_params", "mlp"]

#: Smallest scale :func:`gaussian_params` returns, so that the log density stays finite.
MIN_SCALE = 1e-4


def check_size(value: int, what: str) -> int:
    """Return ``value`` if it is a positive int, else raise a ``ValueError`` naming ``what``.

    Example:

    >>> from lvmkit.nn import check_size
    >>> check_size(3, "z_dim")
    3
    >>> check_size(0, "z_dim")
    Traceback (most recent call last):
    ...
    ValueError: z_dim must be a positive integer, got 0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def check_unsupervised(owner: object, labels: object) -> None:
    """Refuse labels handed to an unsupervised model or guide (``labels=None`` is accepted
    so that a training loop may pass the keyword uniformly).

    Example:

    >>> from lvmkit.nn import check_unsupervised
    >>> check_unsupervised(object(), None)
    >>> check_unsupervised(object(), [1, 2])
    Traceback (most recent call last):
    ...
    ValueError: object is unsupervised: got labels, expected labels=None
    """
    if labels is not None:
        raise ValueError(
            f"{type(owner).__name__} is unsupervised: got labels, expected labels=None"
        )


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int) -> nn.Sequential:
    """A tanh multilayer perceptron ``in_dim -> hidden... -> out_dim`` with a linear output.

    tanh follows the deterministic layers of Burda et al. (2016) and Tucker et al. (2017).
    ``hidden=()`` gives a single affine map.

    Example:

    >>> from lvmkit.nn import mlp
    >>> mlp(4, (8,), 2)
    Sequential(
      (0): Linear(in_features=4, out_features=8, bias=True)
      (1): Tanh()
      (2): Linear(in_features=8, out_features=2, bias=True)
    )
    """
    sizes = [check_size(in_dim, "in_dim")]
    sizes += [check_size(h, "hidden layer size") for h in hidden]
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
    layers.append(nn.Linear(sizes[-1], check_size(out_dim, "out_dim")))
    return nn.Sequential(*layers)


def gaussian_params(net_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a net output ``(..., 2 d)`` into a location and a positive scale ``(..., d)``.

    Example:

    >>> import torch
    >>> from lvmkit.nn import MIN_SCALE, gaussian_params
    >>> loc, scale = gaussian_params(torch.tensor([[1.0, -2.0, 0.0, -50.0]]))
    >>> loc
    tensor([[ 1., -2.]])
    >>> bool((scale >= MIN_SCALE).all())
    True
    """
    loc, raw_scale = net_out.chunk(2, dim=-1)
    return loc, F.softplus(raw_scale) + MIN_SCALE
