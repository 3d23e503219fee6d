"""Checks at the boundary: data handed to a model, with errors that name the site."""

from __future__ import annotations

import weakref

import torch

# The last tensor that passed, as (weak reference, version counter, event_shape, support):
# a model and its guide check the same batch, and estimators run them several times per
# step, so repeating the scan over the data would be pure overhead.
_last_passed: tuple | None = None


def check_observations(
    x: torch.Tensor,
    *,
    site: str = "x",
    event_shape: tuple[int, ...] | None = None,
    support: str = "real",
) -> None:
    """Raise ``ValueError`` naming ``site`` if ``x`` cannot be scored by its likelihood.

    :param x: a batch of observations, batch dimension first.
    :param event_shape: the per-datum shape the model expects (``None`` skips the check).
    :param support: ``"real"``, ``"unit"`` (values in [0, 1], e.g. a Bernoulli likelihood
        of dynamically or statically binarized pixels) or ``"binary"`` ({0, 1}).
    """
    global _last_passed
    if not torch.is_tensor(x):
        raise TypeError(f"site {site!r}: expected a torch.Tensor, got {type(x).__name__}")
    key = (x._version, None if event_shape is None else tuple(event_shape), support)
    if _last_passed is not None and _last_passed[0]() is x and _last_passed[1:] == key:
        return
    if event_shape is not None:
        expected = tuple(event_shape)
        if x.dim() != len(expected) + 1 or tuple(x.shape[1:]) != expected:
            dims = ", ".join(map(str, expected))
            raise ValueError(
                f"site {site!r}: expected a batch of shape (batch, {dims}), got {tuple(x.shape)}"
            )
    if not torch.is_floating_point(x):
        raise TypeError(f"site {site!r}: expected a floating-point tensor, got {x.dtype}")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        raise ValueError(f"site {site!r}: non-finite value {x[tuple(bad)].item()} at index {bad}")
    if support in ("unit", "binary"):
        outside = (x < 0) | (x > 1)
        if support == "binary":
            outside = outside | ((x != 0) & (x != 1))
        if bool(outside.any()):
            bad = outside.nonzero()[0].tolist()
            want = "[0, 1]" if support == "unit" else "{0, 1}"
            raise ValueError(
                f"site {site!r}: value {x[tuple(bad)].item()} at index {bad} is outside {want}"
                " required by its Bernoulli likelihood"
            )
    elif support != "real":
        raise ValueError(f"unknown support {support!r}")
    _last_passed = (weakref.ref(x), *key)
