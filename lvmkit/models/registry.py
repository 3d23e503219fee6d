"""Build a model and its default guide by name (what the CLI's ``--model`` selects).

This is where the generative side meets the inference side: the models know nothing of
their guides, and :func:`default_guide` pairs each with the mean-field encoder of
:mod:`lvmkit.guides.encoders` that mirrors it.
"""

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
    ``layers=(50,)``); the guide is :func:`default_guide` of the model, so it follows them.
    ``init_data`` (training images) goes to the model's ``init_output_bias`` where it has
    one: SBNs collapse to their prior without it (see
    :meth:`~lvmkit.models.SigmoidBeliefNet.init_output_bias`).

    Example:

    >>> from lvmkit.models import MODEL_NAMES, build
    >>> MODEL_NAMES
    ('vae', 'sbn-linear', 'sbn-linear2', 'sbn-nonlinear', 'categorical-vae', 'two-layer-vae')
    >>> model, guide = build("sbn-linear", x_dim=64, layers=(10,))
    >>> type(model).__name__, type(guide).__name__, model.layers
    ('SigmoidBeliefNet', 'BernoulliEncoder', (10,))
    """
    try:
        factory, defaults = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}") from None
    model = factory(x_dim, **{**defaults, **kwargs})
    if init_data is not None and hasattr(model, "init_output_bias"):
        model.init_output_bias(init_data)
    return model, default_guide(model)


def _gaussian(model: VAE, name: str) -> PyroModule:
    from lvmkit.guides.encoders import GaussianEncoder

    # the decoder's hidden sizes reversed
    return GaussianEncoder(model.x_dim, model.z_dim, model.hidden[::-1], name=name)


def _bernoulli(model: SigmoidBeliefNet, name: str) -> PyroModule:
    from lvmkit.guides.encoders import BernoulliEncoder

    # bottom-up, with the same layers and nonlinearity
    return BernoulliEncoder(model.x_dim, model.layers, model.nonlinear, model.hidden, name=name)


def _one_hot(model: CategoricalVAE, name: str) -> PyroModule:
    from lvmkit.guides.encoders import OneHotEncoder

    return OneHotEncoder(
        model.x_dim, model.num_latents, model.num_categories, model.hidden[::-1], name=name
    )


def _two_layer(model: TwoLayerVAE, name: str) -> PyroModule:
    from lvmkit.guides.encoders import TwoLayerEncoder

    # bottom-up, with the same layer sizes
    return TwoLayerEncoder(model.x_dim, model.z_dims, model.hidden, name=name)


# model class -> its guide's factory; looked up along the model's MRO, so a subclass of a
# model gets that model's guide.
_GUIDES: dict[type, Callable[[Any, str], PyroModule]] = {
    VAE: _gaussian,
    SigmoidBeliefNet: _bernoulli,
    CategoricalVAE: _one_hot,
    TwoLayerVAE: _two_layer,
}


def default_guide(model: BernoulliImageModel) -> PyroModule:
    """The mean-field guide of one of this package's image models, shaped after it.

    ``VAE`` gets a :class:`~lvmkit.guides.GaussianEncoder`, ``SigmoidBeliefNet`` a
    :class:`~lvmkit.guides.BernoulliEncoder`, ``CategoricalVAE`` a
    :class:`~lvmkit.guides.OneHotEncoder` and ``TwoLayerVAE`` a
    :class:`~lvmkit.guides.TwoLayerEncoder`; the guide's parameters are named
    ``{model name}_guide``.

    :raises TypeError: for a model this package does not know.

    Example:

    >>> from lvmkit.models import VAE
    >>> from lvmkit.models.registry import default_guide
    >>> guide = default_guide(VAE(x_dim=64, z_dim=5, name="my_vae"))
    >>> type(guide).__name__, guide.z_dim, guide._pyro_name
    ('GaussianEncoder', 5, 'my_vae_guide')
    """
    for cls in type(model).__mro__:
        if cls in _GUIDES:
            return _GUIDES[cls](model, f"{model._pyro_name}_guide")
    raise TypeError(
        f"no default guide for {type(model).__name__}: write a guide for it (any Pyro"
        " program with the model's arguments and latent sites), e.g. with lvmkit.guides"
    )
