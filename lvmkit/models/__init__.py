"""Generative models p(x, z), each a plain Pyro program with a ``"data"`` plate."""

from lvmkit._lazy import lazy_exports

# name -> submodule; add a line when a module gains a public name.
_EXPORTS: dict[str, str] = {
    "VAE": "lvmkit.models.vae",
    "M2": "lvmkit.models.semi_supervised",
    "ADGM": "lvmkit.models.semi_supervised",
    "SDGM": "lvmkit.models.semi_supervised",
    "RingOfModes": "lvmkit.models.targets",
    "Banana": "lvmkit.models.targets",
    "Funnel": "lvmkit.models.targets",
    "SyntheticTarget": "lvmkit.models.targets",
    "SigmoidBeliefNet": "lvmkit.models.sbn",
    "CategoricalVAE": "lvmkit.models.categorical",
    "TwoLayerVAE": "lvmkit.models.two_layer",
    "build": "lvmkit.models.registry",
    "MODEL_NAMES": "lvmkit.models.registry",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
