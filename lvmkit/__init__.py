"""lvmkit: latent-variable models for Pyro.

Models are plain Pyro programs (:mod:`lvmkit.models`), approximate posteriors live in
:mod:`lvmkit.guides`, and training, evaluation and gradient estimators live in
:mod:`lvmkit.inference`.

Example: train a sigmoid belief net on the digits with REBAR, then estimate log p(x).

>>> import lvmkit
>>> from lvmkit.inference import RebarELBO
>>> from lvmkit.models import build
>>> train = lvmkit.load_dataset("digits", split="train")
>>> model, guide = build("sbn-linear", x_dim=64, layers=(20,), init_data=train.x)
>>> history = lvmkit.fit(model, guide, train, elbo=RebarELBO(), steps=20, progress=False)
>>> lvmkit.log_likelihood(model, guide, train.x[:10], num_samples=100).shape
torch.Size([10])
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
