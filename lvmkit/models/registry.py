"""Build a model and its default guide by name (what the CLI's ``--model`` selects)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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


def build(name: str, x_dim: int, **kwargs: Any) -> tuple[BernoulliImageModel, PyroModule]:
    """Return ``(model, guide)`` for a model name in :data:`MODEL_NAMES`.

    ``kwargs`` override the model's constructor arguments (e.g. ``z_dim=10`` or
    ``layers=(50,)``); the guide is the model's ``default_guide()``, so it follows them.
    """
    try:
        factory, defaults = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}") from None
    model = factory(x_dim, **{**defaults, **kwargs})
    return model, model.default_guide()
