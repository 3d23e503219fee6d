"""The SVI runner: mini-batches, data-size scaling, progress, checkpoints and resume.

:func:`fit` maximizes the evidence lower bound of a dataset of N points from mini-batches
of B points:

    ELBO(x_1..N) = sum_n E_q[log p(x_n, z_n) - log q(z_n | x_n)]
                 ~ (N / B) sum_{n in batch} E_q[log p(x_n, z_n) - log q(z_n | x_n)]

(Hoffman et al. 2013, "Stochastic Variational Inference"), i.e. it wraps model and guide in
``poutine.scale(N / B)`` unless the model's ``"data"`` plate already declares the full size
``N`` (``pyro.plate("data", N, subsample=...)``), in which case Pyro applies that scale itself.
Losses are reported per datum: loss / N.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from lvmkit._rng import RandomState
from lvmkit.data import Dataset

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class History:
    """What :func:`fit` records at every step.

    :ivar loss: per-datum loss (negative ELBO estimate / N) at each step.
    :ivar wall_time: cumulative seconds spent in training steps (resumed runs continue it).
    :ivar step: the 1-based global step number.
    :ivar epoch: the 0-based epoch the step's batch came from.
    :ivar extras: other per-step scalars, e.g. an estimator's ``diagnostics()`` or what the
        callback returns; a key first seen at a later step is padded with NaN before it.
    """

    loss: list[float] = field(default_factory=list)
    wall_time: list[float] = field(default_factory=list)
    step: list[int] = field(default_factory=list)
    epoch: list[int] = field(default_factory=list)
    extras: dict[str, list[float]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.loss)

    def record(self, step: int, epoch: int, loss: float, wall_time: float,
               extras: dict[str, float] | None = None) -> None:
        self.step.append(step)
        self.epoch.append(epoch)
        self.loss.append(loss)
        self.wall_time.append(wall_time)
        for key, value in (extras or {}).items():
            self.extras.setdefault(key, [math.nan] * (len(self.loss) - 1)).append(float(value))
        for values in self.extras.values():
            if len(values) < len(self.loss):
                values.append(math.nan)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> History:
        return cls(**{key: state[key] for key in ("loss", "wall_time", "step", "epoch", "extras")})

    def save(self, path: str | os.PathLike) -> None:
        """Write the history as JSON."""
        with open(path, "w") as handle:
            json.dump(self.to_dict(), handle)


class _Batches:
    """Epochs of seeded random permutations, cut into consecutive batches.

    The last batch of an epoch may be smaller than ``batch_size``; every datum is seen once
    per epoch. The state (generator, permutation, position) is checkpointed so a resumed run
    draws the same batches as an uninterrupted one.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.position = -1, n
        self.order = torch.arange(n)

    def next(self) -> tuple[int, torch.Tensor]:
        if self.position >= self.n:
            self.epoch += 1
            self.order = torch.randperm(self.n, generator=self.generator)
            self.position = 0
        idx = self.order[self.position : self.position + self.batch_size]
        self.position += len(idx)
        return self.epoch, idx

    def state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "epoch": self.epoch,
                "position": self.position, "order": self.order}

    def load(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.epoch, self.position, self.order = state["epoch"], state["position"], state["order"]


def fit(
    model: Callable,
    guide: Callable,
    data: torch.Tensor | Dataset,
    *,
    elbo: pyro.infer.ELBO | None = None,
    optim: pyro.optim.PyroOptim | None = None,
    steps: int | None = None,
    epochs: int | None = None,
    batch_size: int = 100,
    labels: torch.Tensor | bool | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    resume: bool = True,
    progress: bool = True,
    callback: Callable[[History], dict[str, float] | None] | None = None,
    use_differentiable_loss: bool = False,
) -> History:
    """Train ``guide`` (and the model's parameters) by stochastic variational inference.

    Each step draws a mini-batch ``x`` (and ``labels``), calls ``model(x)`` / ``guide(x)``
    (``model(x, labels=y)`` when labels are given), scales both by N / B (see the module
    docstring) and takes one optimizer step on ``elbo``.

    :param data: a float tensor (N, ...) or a :class:`~lvmkit.data.Dataset` (a dataset with
        ``binarize="dynamic"`` gets fresh binary pixels for every batch).
    :param elbo: any Pyro ELBO (``Trace_ELBO`` by default, also ``TraceGraph_ELBO``,
        ``TraceEnum_ELBO``, ``RenyiELBO`` and lvmkit's estimators). If it has a
        ``diagnostics()`` method returning a dict of floats, those are recorded every step in
        ``History.extras``.
    :param optim: a ``pyro.optim`` optimizer (default ``pyro.optim.Adam({"lr": 1e-3})``).
    :param steps: number of optimizer steps in total (resumed runs count the steps already
        done). Give exactly one of ``steps`` and ``epochs``.
    :param epochs: number of passes over the data, ``ceil(N / batch_size)`` steps each.
    :param batch_size: B, between 1 and N (a larger value raises ``ValueError``).
    :param labels: ``None`` (the model takes no labels), ``True`` (use ``data.y`` of a
        ``Dataset``) or a tensor of N labels; passed as the keyword ``labels``.
    :param seed: seeds Pyro's global RNGs (torch, python, numpy) at the start and the
        batch order, so the same seed gives the same losses and parameters.
    :param device: where batches are moved; the model's networks must live there too.
    :param checkpoint_dir: if given, write ``checkpoint.pt`` there atomically every
        ``checkpoint_every`` steps and at the end: parameters, optimizer state, every RNG
        state, the batch order, the history and the step counter.
    :param resume: continue from an existing checkpoint in ``checkpoint_dir``.
    :param progress: show a tqdm bar with the running (exponentially averaged, 0.9) per-datum
        loss.
    :param callback: called as ``callback(history)`` after every step; a returned dict of
        floats is recorded in ``History.extras``.
    :param use_differentiable_loss: step through ``elbo.differentiable_loss`` + ``backward``
        instead of ``SVI.step`` (the path DDP and Lightning use); gradients are identical for
        ELBOs that implement both. An estimator's own parameters (REBAR's temperature and
        etas, RELAX's network) are stepped by its ``step_controls()``, as on the SVI path.
    :raises FloatingPointError: when a loss is NaN or infinite; no checkpoint is written for
        that step, so the last checkpoint on disk is the last good state.
    """
    x_all, y_all = _unpack(data, labels)
    n = x_all.shape[0]
    _check_batching(n, batch_size, steps, epochs, checkpoint_every)
    total = steps if steps is not None else epochs * math.ceil(n / batch_size)
    elbo = Trace_ELBO() if elbo is None else elbo
    optim = pyro.optim.Adam({"lr": 1e-3}) if optim is None else optim
    if use_differentiable_loss and not hasattr(elbo, "differentiable_loss"):
        raise TypeError(f"{type(elbo).__name__} has no differentiable_loss; use the SVI path")

    pyro.set_rng_seed(seed)
    batches = _Batches(n, batch_size, seed)
    history = History()
    step = 0
    path = None if checkpoint_dir is None else os.path.join(checkpoint_dir, CHECKPOINT_NAME)

    def get_batch() -> tuple[int, torch.Tensor, dict[str, torch.Tensor]]:
        epoch, idx = batches.next()
        x = data.batch(idx, batches.generator) if isinstance(data, Dataset) else x_all[idx]
        kwargs = {} if y_all is None else {"labels": y_all[idx].to(device)}
        return epoch, x.to(device), kwargs

    scale = {"value": 1.0}
    first_idx = torch.arange(batch_size)
    if isinstance(data, Dataset):  # a separate generator: the batch stream stays untouched
        first_x = data.batch(first_idx, torch.Generator().manual_seed(seed)).to(device)
    else:
        first_x = x_all[first_idx].to(device)
    first_kwargs = {} if y_all is None else {"labels": y_all[:batch_size].to(device)}
    user_scales = _first_trace(model, guide, first_x, first_kwargs)

    def scaled(fn: Callable) -> Callable:
        if user_scales:
            return fn

        def wrapped(*args, **kwargs):
            with poutine.scale(scale=scale["value"]):
                return fn(*args, **kwargs)

        return wrapped

    scaled_model, scaled_guide = scaled(model), scaled(guide)

    if path is not None and resume and os.path.exists(path):
        step, history = _restore(path, optim, elbo, batches, n, batch_size)

    svi = SVI(scaled_model, scaled_guide, optim, elbo)
    start_wall = history.wall_time[-1] if history.wall_time else 0.0
    bar = _progress_bar(progress, step, total)
    running = None  # exponential moving average shown on the bar; single losses are noisy
    try:
        while step < total:
            tic = time.perf_counter()
            epoch, x, kwargs = get_batch()
            scale["value"] = n / x.shape[0]
            if use_differentiable_loss:
                loss = _differentiable_step(elbo, optim, scaled_model, scaled_guide, x, kwargs)
            else:
                loss = svi.step(x, **kwargs)
            step += 1
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss {loss} at step {step}; parameters of this step are not "
                    "checkpointed"
                )
            start_wall += time.perf_counter() - tic
            extras = _diagnostics(elbo)
            history.record(step, epoch, loss / n, start_wall, extras)
            if callback is not None:
                reported = callback(history)
                if reported:
                    for key, value in reported.items():
                        history.extras.setdefault(key, [math.nan] * len(history.loss))
                        history.extras[key][-1] = float(value)
            if bar is not None:
                running = loss / n if running is None else 0.9 * running + 0.1 * loss / n
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4g}", refresh=False)
            if path is not None and (step % checkpoint_every == 0 or step == total):
                _save_checkpoint(path, step, optim, elbo, batches, history, n, batch_size)
    finally:
        if bar is not None:
            bar.close()
    return history


def _unpack(data: torch.Tensor | Dataset, labels: torch.Tensor | bool | None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(data, Dataset):
        x = data.x
        if labels is True:
            labels = data.y
    elif torch.is_tensor(data):
        x = data
        if labels is True:
            raise ValueError("labels=True needs a Dataset; pass the label tensor instead")
    else:
        raise TypeError(f"data must be a torch.Tensor or a Dataset, got {type(data).__name__}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"data is empty (shape {tuple(x.shape)}); fit needs at least one datum")
    if labels is False:
        labels = None
    if labels is not None:
        if not torch.is_tensor(labels) or labels.shape[:1] != x.shape[:1]:
            shape = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
            raise ValueError(f"labels must be a tensor of {x.shape[0]} labels, got {shape}")
    return x, labels


def _check_batching(n: int, batch_size: int, steps: int | None, epochs: int | None,
                    checkpoint_every: int) -> None:
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps= and epochs=")
    count = steps if steps is not None else epochs
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"steps/epochs must be a non-negative int, got {count!r}")
    # An error rather than clipping: a silently larger batch changes the gradient noise
    # (and so the results) the user asked for.
    if not isinstance(batch_size, int) or not 0 < batch_size <= n:
        raise ValueError(f"batch_size must be an int in [1, N={n}], got {batch_size!r}")
    if not isinstance(checkpoint_every, int) or checkpoint_every <= 0:
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")


def _first_trace(model: Callable, guide: Callable, x: torch.Tensor, kwargs: dict) -> bool:
    """Trace guide and model once; return whether the model scales by the data size itself.

    The model scales itself when its ``"data"`` plate declares a full size larger than the
    batch (a subsampling plate: Pyro then scales its sites by size / subsample_size).
    Tracing also registers every parameter (including the networks' own ``nn.Parameter``
    objects) in the param store before a checkpoint is restored into them. The model runs
    with values drawn from its prior; nothing is learned.
    """
    with poutine.block(), torch.no_grad():
        poutine.trace(guide).get_trace(x, **kwargs)
        trace = poutine.trace(model).get_trace(x, **kwargs)
    for site in trace.nodes.values():
        for frame in site.get("cond_indep_stack", ()):
            if frame.name == "data" and frame.full_size not in (None, -1):
                return frame.full_size != frame.size
    return False


def _differentiable_step(elbo, optim, model, guide, x, kwargs) -> float:
    with poutine.trace(param_only=True) as param_capture:
        loss = elbo.differentiable_loss(model, guide, x, **kwargs)
        loss.backward()
    params = {site["value"].unconstrained() for site in param_capture.trace.nodes.values()}
    optim(params)
    pyro.infer.util.zero_grads(params)
    # An estimator's own parameters (REBAR's temperature and etas, ...) live outside the
    # param store, and SVI's path leaves them to the estimator: so does this one.
    step_controls = getattr(elbo, "step_controls", None)
    if callable(step_controls):
        step_controls()
    return loss.item()


def _diagnostics(elbo) -> dict[str, float] | None:
    report = getattr(elbo, "diagnostics", None)
    if not callable(report):
        return None
    return {key: float(value) for key, value in report().items()}


def _progress_bar(progress: bool, initial: int, total: int):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="fit", dynamic_ncols=True)


def _save_checkpoint(path: str, step: int, optim, elbo, batches: _Batches, history: History,
                     n: int, batch_size: int) -> None:
    """Write the checkpoint to a temporary file in the same directory, fsync, then rename.

    ``os.replace`` is atomic on POSIX and Windows, so a crash leaves either the old or the
    new checkpoint, never a partial one.
    """
    state = {
        "step": step,
        "n": n,
        "batch_size": batch_size,
        "params": pyro.get_param_store().get_state(),
        "optim": optim.get_state(),
        # What the estimator learns or tracks outside the param store (REBAR's temperature
        # and etas, NVIL's running moments, ...), if it has any.
        "elbo": {"type": type(elbo).__name__, "state": _elbo_state(elbo)},
        # CUDA's generators once CUDA is in use (saving them would otherwise start it)
        "rng": RandomState().as_dict(),
        "batches": batches.state(),
        "history": history.to_dict(),
    }
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _elbo_state(elbo) -> dict | None:
    state_dict = getattr(elbo, "state_dict", None)
    return state_dict() if callable(state_dict) else None


def _restore(path: str, optim, elbo, batches: _Batches, n: int, batch_size: int
             ) -> tuple[int, History]:
    state = torch.load(path, weights_only=False)
    if (state["n"], state["batch_size"]) != (n, batch_size):
        raise ValueError(
            f"checkpoint {path!r} was written for N={state['n']}, batch_size="
            f"{state['batch_size']}; this run has N={n}, batch_size={batch_size}. "
            "Use another checkpoint_dir or resume=False."
        )
    saved = state.get("elbo")  # absent from checkpoints written before it was saved
    if saved is not None:
        if saved["type"] != type(elbo).__name__:
            raise ValueError(
                f"checkpoint {path!r} was written by a run with {saved['type']}; this run "
                f"uses {type(elbo).__name__}. Use another checkpoint_dir or resume=False."
            )
        if saved["state"] is not None:
            # First: an estimator may register networks in the param store, whose saved
            # values _load_params then writes into the networks' own tensors.
            elbo.load_state_dict(saved["state"])
    _load_params(state["params"])
    optim.set_state(state["optim"])
    RandomState.from_dict(state["rng"]).restore()
    batches.load(state["batches"])
    return state["step"], History.from_dict(state["history"])


def _load_params(saved: dict[str, Any]) -> None:
    """Load saved parameters, writing in place into tensors the store already holds.

    ``ParamStore.set_state`` swaps in new tensor objects, but ``pyro.module`` and
    ``PyroModule`` networks keep computing with their own ``nn.Parameter`` objects: the
    optimizer would then update tensors the model never reads. The first trace of the model
    (done by :func:`fit` before restoring) registers the networks' own parameters, so copying
    into those keeps model, store and optimizer on the same tensors.
    """
    store = pyro.get_param_store()
    with torch.no_grad():
        for name, value in saved["params"].items():
            current = store._params.get(name)
            if current is not None and current.shape == value.shape:
                current.copy_(value)
            else:
                store._params[name] = value
                store._param_to_name[value] = name
    for name, constraint in saved["constraints"].items():
        if isinstance(constraint, type(torch.distributions.constraints.real)):
            constraint = torch.distributions.constraints.real
        store._constraints[name] = constraint
