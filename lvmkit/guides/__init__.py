"""Approximate posteriors q(z | x): mean-field encoders and hierarchical guides."""

from lvmkit._lazy import lazy_exports

# name -> submodule; add a line when a module gains a public name.
_EXPORTS: dict[str, str] = {
    "GaussianEncoder": "lvmkit.guides.encoders",
    "AmortizedAutoHVM": "lvmkit.guides.amortized",
    "AutoHVM": "lvmkit.guides.hierarchical",
    "AuxiliaryEncoder": "lvmkit.guides.hierarchical",
    "BernoulliEncoder": "lvmkit.guides.encoders",
    "OneHotEncoder": "lvmkit.guides.encoders",
    "TwoLayerEncoder": "lvmkit.guides.encoders",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
