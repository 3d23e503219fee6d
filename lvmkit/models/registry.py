"""Build a model and its default guide by name (what the CLI's ``--model`` selects)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pyro.nn import PyroModule

from lvmkit.models.categorical import CategoricalVAE
from lvmkit.models.sbn import SigmoidBeliefNet
from lvmkit.models.two_layer import TwoLayerVAE
from lvmkit.models.vae import VAE, BernoulliImageModel

# name -> (model class, default keyword arguments); the REBAR paper's three SBNs.
_FACTORIES: dict[str, tuple[Callable[..., BernoulliImageModel], dict[str, Any]]] = {
    "vae": (VAE, {}),
    "sbn-linear": (SigmoidBeliefNet, {"layers": (200,)}),
    "sbn-linear2": (SigmoidBeliefNet, {"layers": (200, 200)}),
    "sbn-nonlinear": (SigmoidBeliefNet, {"layers": (200,), "nonlinear": True}),
    "categorical-vae": (CategoricalVAE, {}),
    "two-layer-vae": (TwoLayerVAE, {}),
}

#: The names :func:`build` accepts.
MODEL_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def build(
    name: str, x_dim: int, *, init_data: torch.Tensor | None = None, **kwargs: Any
) -> tuple[BernoulliImageModel, PyroModule]:
    """Return ``(model, guide)`` for a model name in :data:`MODEL_NAMES`.

    ``kwargs`` override the model's constructor arguments (e.g. ``z_dim=10`` or
    ``layers=(50,)``); the guide is the model's ``default_guide()``, so it follows them.
    ``init_data`` (training images) goes to the model's ``init_output_bias`` where it has
    one: SBNs collapse to their prior without it (see
    :meth:`~lvmkit.models.SigmoidBeliefNet.init_output_bias`).
    """
    try:
        factory, defaults = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}") from None
    model = factory(x_dim, **{**defaults, **kwargs})
    if init_data is not None and hasattr(model, "init_output_bias"):
        model.init_output_bias(init_data)
    return model, model.default_guide()
