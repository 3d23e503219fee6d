"""Checks at the boundary: data handed to a model, with errors that name the site."""

from __future__ import annotations

import numbers
import weakref
from typing import Any

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
    if x.device.type == "meta":
        raise ValueError(
            f"site {site!r}: the observations are on the 'meta' device, which holds no values"
        )
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


# --------------------------------------------------------------------------- arguments


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as a Python int if it is an integer >= ``minimum``; else ``ValueError``
    naming the argument ``name``.

    NumPy and other ``numbers.Integral`` integers are accepted; ``bool`` is refused (``True``
    for a count is a mistake, not 1), as are floats, even integral ones, and tensors.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        want = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return int(value)


def describe(value: Any) -> str:
    """A short description of an argument for error messages: a tensor's shape, dtype and
    device, else its type."""
    if torch.is_tensor(value):
        return f"tensor of shape {tuple(value.shape)}, {value.dtype}, on {value.device}"
    return type(value).__name__


# float16 overflows past 65504 (a sum of log-densities of a few hundred pixels) and bfloat16
# keeps 3 significant digits: evaluated in them, log p(x) is off by nats, or infinite.
LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_precision(value: Any, name: str) -> None:
    """Refuse a half-precision tensor where log-densities must be accurate (evaluation)."""
    if torch.is_tensor(value) and value.dtype in LOW_PRECISION:
        raise TypeError(
            f"{name} has dtype {value.dtype}: log-densities computed from it overflow (float16"
            " holds at most 65504) or lose digits (bfloat16 keeps about 3), so the estimates"
            " would be off by nats; convert it with .float()"
        )


def check_tensor_arguments(named: dict[str, Any]) -> None:
    """Refuse tensor arguments no program can compute with, naming the argument.

    ``named`` maps an argument's name (``"args[0]"``, ``"labels"``) to its value; values that
    are not tensors are left to the program. A tensor is refused when it is on the ``meta``
    device (it holds no values: every result would be a shape without numbers), when it is
    empty along its first (data) dimension, or when it holds a NaN or an infinity (a
    floating-point or complex tensor): every log-density computed from it would be NaN or
    infinite, or, worse, a finite number that looks plausible.
    """
    for name, value in named.items():
        if not torch.is_tensor(value):
            continue
        if value.device.type == "meta":
            raise ValueError(
                f"{name} is on the 'meta' device ({describe(value)}), which holds no values;"
                " move it to the device of the model's parameters (e.g. .to('cpu'))"
            )
        if value.dim() > 0 and value.shape[0] == 0:
            raise ValueError(f"{name} is empty ({describe(value)}); expected at least one datum")
        if value.is_floating_point() or value.is_complex():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                bad = (~finite).nonzero()[0].tolist()
                raise ValueError(
                    f"{name} has a non-finite value {value[tuple(bad)].item()} at index {bad}"
                )


# Errors a user's program raises when it gets arguments it was not written for: torch's
# messages name neither the argument nor that the failure is in the user's program.
PROGRAM_ERRORS = (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError,
                  NotImplementedError, ZeroDivisionError)
# AttributeError (e.g. a list where a tensor was expected) and IndexError / KeyError /
# ZeroDivisionError (a shape the program did not expect) come back as TypeError and ValueError.
_AS = {AttributeError: TypeError, IndexError: ValueError, KeyError: ValueError,
       ZeroDivisionError: ValueError}


def program_error(err: BaseException, context: str) -> BaseException | None:
    """An exception of a public kind whose message starts with ``context`` (which names the
    arguments) and goes on with ``err``'s; ``None`` for an exception that is not one of
    :data:`PROGRAM_ERRORS` exactly (a subclass may take other constructor arguments, or
    carry a meaning of its own): re-raise that one unchanged."""
    kind = type(err)
    if kind not in PROGRAM_ERRORS:
        return None
    message = err.args[0] if kind is KeyError and err.args else err
    return _AS.get(kind, kind)(f"{context}: {kind.__name__}: {message}")


def check_data(x: Any, name: str = "data") -> None:
    """Refuse data no likelihood can score, naming the argument ``name``.

    Integer data are allowed (categorical or count observations); bool and complex are not
    (torch's distributions score neither); nor are empty data, data on the ``meta`` device
    (it holds no values) and NaN or infinite values.
    """
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} has dtype {x.dtype}; convert it to a float (or integer) tensor")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); expected (N, ...) with N >= 1")
    check_tensor_arguments({name: x})


def check_device(device: Any, name: str = "device") -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine; else ``ValueError`` naming
    the argument. The ``meta`` device is refused: it holds no values to train or score."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"{name}={device!r} is not a torch device: {err}") from None
    if resolved.type == "meta":
        raise ValueError(f"{name}={device!r}: the 'meta' device holds no values; use 'cpu' or"
                         " an accelerator")
    backend = getattr(torch, resolved.type, None)
    if resolved.type != "cpu" and backend is not None and hasattr(backend, "is_available"):
        if not backend.is_available():
            raise ValueError(f"{name}={device!r}: no {resolved.type} device is available here")
        count = getattr(backend, "device_count", None)
        if resolved.index is not None and count is not None and resolved.index >= count():
            raise ValueError(
                f"{name}={device!r}: there are {count()} {resolved.type} device(s) here"
            )
    return resolved


def check_observed_values(model_trace: Any, plate: str, data_description: str) -> None:
    """Refuse an observed value with no data dimension inside the vectorized plate ``plate``.

    Such a value broadcasts along the plate, so every datum would be scored against the
    same observation: data of shape (D,) handed to a model written for (N, D) does this.
    ``data_description`` (e.g. ``"data has shape (2,)"``) ends the message.
    """
    import pyro.distributions as dist  # Pyro loads slowly; lvmkit.data does not need it

    for name, site in model_trace.nodes.items():
        if (site["type"] != "sample" or not site["is_observed"]
                or isinstance(site["fn"], dist.Unit)  # pyro.factor: its value holds no data
                or site["infer"].get("_deterministic")):
            continue
        frames = [f for f in site["cond_indep_stack"] if f.name == plate and f.vectorized]
        if not frames:
            continue
        fn, value = site["fn"], torch.as_tensor(site["value"])
        event_shape = tuple(fn.event_shape)
        # an event dim the value lacks (or has as 1) broadcasts: one observed number would be
        # scored as several, e.g. data (N, 1) for a likelihood with events of size D
        for k in range(1, len(event_shape) + 1):
            have = value.shape[-k] if value.dim() >= k else 1
            if have == 1 and event_shape[-k] != 1:
                raise ValueError(
                    f"site {name!r}: observed value of shape {tuple(value.shape)} has size 1 at"
                    f" dim {-k}, where its distribution's event shape {event_shape} has"
                    f" {event_shape[-k]}: the value would be broadcast, one observation scored"
                    f" as {event_shape[-k]}; {data_description}: is it what the model expects?"
                )
        position = frames[0].dim - fn.event_dim
        full = tuple(fn.batch_shape) + event_shape
        if len(full) < -position:
            continue
        if value.dim() < -position or value.shape[position] != full[position]:
            raise ValueError(
                f"site {name!r}: observed value of shape {tuple(value.shape)} has no dimension "
                f"of size {full[position]} for pyro.plate({plate!r}) (dim {frames[0].dim}, "
                f"event dim {fn.event_dim}), so every datum would be scored against the same "
                f"value; {data_description}: is it what the model expects?"
            )


def check_full_plates(traces: Any, what: str) -> None:
    """Refuse sites in a subsampled plate (``pyro.plate(..., subsample_size=B)``) for
    ``what``, a computation that scores every datum of the data passed: each trace would
    draw another subset, so that a column would hold other data in each draw, and the
    plate's N / B scale would enter the log densities."""
    for trace in traces:
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            for frame in site["cond_indep_stack"]:
                if frame.full_size is not None and frame.full_size != frame.size:
                    raise ValueError(
                        f"site {name!r} is in the subsampled plate {frame.name!r}"
                        f" (subsample_size {frame.size} of {frame.full_size}): {what} scores"
                        " every datum of the data passed, and each trace would draw another"
                        " subset; run the model with the full plate (subsample_size=None)"
                    )
