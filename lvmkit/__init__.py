"""lvmkit: latent-variable models for Pyro.

Models are plain Pyro programs (:mod:`lvmkit.models`), approximate posteriors live in
:mod:`lvmkit.guides`, and training, evaluation and gradient estimators live in
:mod:`lvmkit.inference`.
"""

__version__ = "0.2.0"

_EXPORTS = {
    "data": "lvmkit.data",
    "models": "lvmkit.models",
    "guides": "lvmkit.guides",
    "inference": "lvmkit.inference",
}


def __getattr__(name):
    import importlib

    if name in _EXPORTS:
        return importlib.import_module(_EXPORTS[name])
    # Convenience re-exports of the most used functions.
    if name in ("fit", "log_likelihood"):
        from lvmkit import inference

        return getattr(inference, name)
    if name == "load_dataset":
        from lvmkit.data import load_dataset

        return load_dataset
    raise AttributeError(f"module 'lvmkit' has no attribute {name!r}")


def __dir__():
    return sorted([*_EXPORTS, "fit", "log_likelihood", "load_dataset", "__version__"])
