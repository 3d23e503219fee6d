"""The SVI runner: mini-batches, data-size scaling, progress, checkpoints and resume.

Scaling. :func:`fit` maximizes the evidence lower bound of N data from mini-batches of B.
With global latents ``theta`` and per-datum latents ``z_n`` the unbiased estimate (Hoffman,
Blei, Wang & Paisley 2013, "Stochastic Variational Inference") is

    ELBO ~ E_q[log p(theta) - log q(theta)]
           + (N / B) sum_{n in batch} E_q[log p(x_n, z_n | theta) - log q(z_n | x_n)]

so only the sites inside the *data plate* are scaled by N / B, in the model and in the guide
(their guide entropies); global sites, their entropies and factors outside the plate count
once. A data plate that declares the full size N and is subsampled
(``pyro.plate("data", N, subsample=...)`` or ``subsample_size=B``) already carries that
scale in Pyro, and ``fit`` adds nothing to it. Losses are reported per datum: loss / N.

The data plate is the plate named by ``data_plate=``, else the plate named ``"data"`` (the
project's convention), else the only plate of the batch's size that holds an observed site.
With B < N and no such plate (or several candidates) ``fit`` refuses with an error that says
how to name it.

Which data the model sees. There are three ways to write the data plate:

1. Over the batch, the plain Pyro way: ``with pyro.plate("data", len(x)):``. ``fit`` passes
   the batch ``x = data[idx]`` (and ``labels=labels[idx]``); at B = N it passes the data in
   their order, unshuffled, so per-datum parameters line up with their data. At B < N the
   plate's position i holds a different datum in every batch, so a guide with per-datum
   parameters cannot be trained this way: ``fit`` refuses an ``AutoGuide`` with latent sites
   in such a plate (it cannot see inside a hand-written guide; write it as 2 or 3).
2. Full size declared, batch passed: ``with pyro.plate("data", N, subsample=torch.arange(len(x)))``
   in a model that takes the batch. ``fit`` fixes the plate's indices to the batch's
   indices ``idx`` (the rows of ``x`` in order), in the model and the guide. A guide with
   a data plate must declare the same full-size plate: Pyro replays the guide's indices
   into the model, so ``fit`` refuses a guide plate over the batch.
3. Pyro's own subsampling idiom: ``with pyro.plate("data", len(x), subsample_size=B) as ind:``
   and ``obs=x[ind]``, with B = ``batch_size``. ``fit`` detects it (the ``"data"`` or
   ``data_plate`` plate draws its own subsample), passes the *whole* data set and the whole
   ``labels`` every step, and fixes ``ind`` to the batch it drew; the model indexes its data
   (and labels) with ``ind``. An ``AutoNormal`` on such a model keeps one parameter per datum
   and trains each with its own datum.

In 2 and 3 the plate's indices are fixed by conditioning the plate's subsample site (a sample
site of the plate's name), so an ``AutoGuide``'s plates, which reuse the model's plate names,
see the same indices, and every batch holds exactly B data: the last batch of an epoch is the
last B of the epoch's permutation (still a uniformly random B-subset, so the estimate stays
unbiased; some data of the previous batch are seen again).

Data-parallel. Under ``torchrun --nproc_per_node W`` (or with a ``torch.distributed``
process group already initialised) the same call trains data-parallel
(:mod:`lvmkit.inference.distributed`): ``batch_size`` is per process, every epoch's
permutation comes from the shared seed, and the W shards of each global batch of
``W * batch_size`` are the batch one process with that batch size would draw. Each rank
scales its shard as above and the ranks' gradients are averaged, weighted by shard size,
so the step is the single-process step of the global batch. Rank 0 shows progress and
writes the checkpoints, every rank resumes from the same file, a checkpoint of another
world size is refused, and the History (losses, diagnostics) is the same on every rank.

Checkpoints (``checkpoint_dir``): ``checkpoint.pt`` is the newest, ``checkpoint-<step>.pt``
the ``keep_last - 1`` before it, each written atomically. A corrupt newest file is skipped
with a warning in favour of the previous one, and renamed ``<name>.unreadable`` (kept, not
deleted). When training raises, the :class:`History`
so far is on the exception (``exc.history``) and in ``checkpoint_dir/history.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.distributions import ExpandedDistribution, MaskedDistribution
from pyro.infer import SVI, Trace_ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import (
    Bernoulli,
    Categorical,
    Independent,
    OneHotCategorical,
    RelaxedBernoulli,
    RelaxedOneHotCategorical,
)

from lvmkit._io import atomic_save, atomic_write_bytes, fsync_directory
from lvmkit._rng import RandomState
from lvmkit._validation import (
    LOW_PRECISION,
    PROGRAM_ERRORS,
    check_count,
    check_data,
    check_device,
    check_observed_values,
    check_tensor_arguments,
    describe,
    program_error,
)
from lvmkit.data import Dataset, check_dataset
from lvmkit.inference import distributed

CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_NAME = "history.json"
DATA_PLATE = "data"
# Guide logits are inspected on a call's first step and then every this many steps: the
# check reads the distributions SVI already builds, and costs nothing on other steps.
SATURATION_CHECK_EVERY = 500
# Rank r of a data-parallel job seeds Pyro's generators with seed + r * this (rank 0 draws
# what a single process draws).
RANK_SEED_STRIDE = 1_000_003
_OLDER_CHECKPOINT = re.compile(r"checkpoint-(\d+)\.pt")
_CHECKPOINT_KEYS = ("step", "n", "batch_size", "params", "optim", "rng", "batches", "history")


class CheckpointError(RuntimeError):
    """No checkpoint in ``checkpoint_dir`` can be read; the message names every file tried.

    Example:

    >>> import os
    >>> import torch
    >>> from lvmkit.inference import fit
    >>> from lvmkit.inference.training import CheckpointError
    >>> from lvmkit.models import build
    >>> model, guide = build("vae", x_dim=4, z_dim=2, hidden=(8,))
    >>> os.makedirs("broken")
    >>> with open("broken/checkpoint.pt", "w") as handle:
    ...     _ = handle.write("not a checkpoint")
    >>> x = torch.bernoulli(torch.full((8, 4), 0.5))
    >>> fit(model, guide, x, steps=2, batch_size=4, checkpoint_dir="broken", progress=False)
    Traceback (most recent call last):
    ...
    lvmkit.inference.training.CheckpointError: no checkpoint in 'broken' can be read: ...
    """


class SaturatedLogitsWarning(RuntimeWarning):
    """A discrete guide site's logits are so large that its gradient is exactly zero.

    Example: a guide whose logit starts at 200.

    >>> import warnings
    >>> import pyro
    >>> import pyro.distributions as dist
    >>> import torch
    >>> from lvmkit.inference import fit
    >>> from lvmkit.inference.training import SaturatedLogitsWarning
    >>> def model(x):
    ...     with pyro.plate("data", len(x)):
    ...         z = pyro.sample("z", dist.Bernoulli(0.5))
    ...         pyro.sample("x", dist.Normal(z, 1.0), obs=x)
    >>> def guide(x):
    ...     logit = pyro.param("logit", torch.tensor(200.0))
    ...     with pyro.plate("data", len(x)):
    ...         pyro.sample("z", dist.Bernoulli(logits=logit))
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     history = fit(model, guide, torch.zeros(4), steps=1, batch_size=4, progress=False)
    >>> [str(w.message)[:43] for w in caught if w.category is SaturatedLogitsWarning]
    ["guide site 'z': 4 of 4 logits are saturated"]
    """


@dataclass
class History:
    """What :func:`fit` records at every step.

    :ivar loss: per-datum loss (negative ELBO estimate / N) at each step.
    :ivar wall_time: cumulative seconds spent in training steps (resumed runs continue it).
    :ivar step: the 1-based global step number.
    :ivar epoch: the 0-based epoch the step's batch came from.
    :ivar extras: other per-step scalars, e.g. an estimator's ``diagnostics()`` or what the
        callback returns; a key first seen at a later step is padded with NaN before it.

    Example:

    >>> import torch
    >>> from lvmkit.inference import fit
    >>> from lvmkit.models import build
    >>> model, guide = build("vae", x_dim=4, z_dim=2, hidden=(8,))
    >>> x = torch.bernoulli(torch.full((8, 4), 0.5))
    >>> history = fit(model, guide, x, steps=5, batch_size=4, progress=False)
    >>> history.step, history.epoch
    ([1, 2, 3, 4, 5], [0, 0, 1, 1, 2])
    >>> len(history.loss), len(history.wall_time)
    (5, 5)
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

    Every datum is seen once per epoch. The last batch of an epoch may be smaller than
    ``batch_size``; with ``fixed_size`` it is instead the permutation's last ``batch_size``
    indices (a plate that draws its own subsample, an ``AutoGuide``'s for one, needs the
    same size every step). At ``batch_size == n`` the order is the data's own: no shuffle.
    The state (generator, permutation, position) is checkpointed so a resumed run draws the
    same batches as an uninterrupted one.
    """

    def __init__(self, n: int, batch_size: int, seed: int, fixed_size: bool = False):
        self.n, self.batch_size, self.fixed_size = n, batch_size, fixed_size
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.position = -1, n
        self.order = torch.arange(n)

    def next(self) -> tuple[int, torch.Tensor]:
        if self.position >= self.n:
            self.epoch += 1
            if self.batch_size < self.n:
                self.order = torch.randperm(self.n, generator=self.generator)
            self.position = 0
        start = self.position
        if self.fixed_size:
            start = min(start, self.n - self.batch_size)
        idx = self.order[start : self.position + self.batch_size]
        self.position = min(self.position + self.batch_size, self.n)
        return self.epoch, idx

    def state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "epoch": self.epoch,
                "position": self.position, "order": self.order}

    def load(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.epoch, self.position, self.order = state["epoch"], state["position"], state["order"]


class _FitHandler(Messenger):
    """What :func:`fit` does to every run of the model or the guide.

    - Scales the sites inside the data plate by ``scale`` (N / B of this step) unless Pyro
      already scales that plate (it declares the full size and is subsampled).
    - Fixes the subsample indices of a full-size data plate (one whose declared size is N)
      to ``indices``, the batch's rows.
    - While ``checking`` (guide only), warns once per site about saturated logits.
    """

    def __init__(self, plate: str | None, n: int):
        super().__init__()
        self.plate, self.n = plate, n
        self.scale = 1.0
        self.indices: torch.Tensor | None = None
        self.checking = False
        self.warned: set[str] = set()

    def _pyro_sample(self, msg) -> None:
        if site_is_subsample(msg):
            if self.indices is not None and msg["name"] == self.plate:
                self._fix_indices(msg)
            return
        if self.scale != 1.0:
            for frame in msg["cond_indep_stack"]:
                if frame.name == self.plate:
                    if frame.full_size in (None, frame.size):  # not subsampled by Pyro
                        msg["scale"] = msg["scale"] * self.scale
                    break
        if self.checking and not msg["is_observed"] and msg["name"] not in self.warned:
            found = _saturation(msg["fn"])
            if found is not None:
                self.warned.add(msg["name"])
                warnings.warn(_saturation_message(msg["name"], *found),
                              SaturatedLogitsWarning, stacklevel=2)

    def _fix_indices(self, msg) -> None:
        fn, idx = msg["fn"], self.indices
        if fn.size != self.n:  # a plate over the batch: its positions are the batch's rows
            return
        if fn.subsample_size is not None and fn.subsample_size != len(idx):
            raise ValueError(
                f"plate {self.plate!r} draws subsample_size={fn.subsample_size}, but fit's "
                f"batch_size is {len(idx)}: give the plate subsample_size=batch_size (fit "
                "fixes its indices to the batch it draws)"
            )
        # on the plate's device, as the plate's own draw would be
        msg["value"] = idx.to(fn.device)


class _StopAtPlate(Exception):
    pass


class _RefusedPlate(ValueError):
    """fit's own refusal of a plate, raised while tracing: not the program's error."""


class _SubsampleProbe(Messenger):
    """Stops a model at its data plate if the plate draws its own subsample (form 3 of the
    module docstring), before the model indexes its data with the drawn indices."""

    def __init__(self, plate: str):
        super().__init__()
        self.plate = plate
        self.subsample_size: int | None = None

    def _pyro_sample(self, msg) -> None:
        if (site_is_subsample(msg) and msg["name"] == self.plate and msg["value"] is None
                and msg["fn"].subsample_size is not None):
            self.subsample_size = msg["fn"].subsample_size
            raise _StopAtPlate


def _handled(fn: Callable, handler: Messenger) -> Callable:
    def wrapped(*args, **kwargs):
        with handler:
            return fn(*args, **kwargs)

    return wrapped


@dataclass
class _Plan:
    """What the first trace found: the data plate, and how batches reach the model."""

    plate: str | None
    pass_full: bool  # form 3: the model gets the whole data and indexes it
    fixed_size: bool  # a full-size data plate: every batch must hold exactly B data
    params: frozenset[str]  # the param store names model and guide use


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
    data_plate: str | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    keep_last: int = 2,
    resume: bool = True,
    progress: bool = True,
    callback: Callable[[History], dict[str, float] | None] | None = None,
    use_differentiable_loss: bool = False,
) -> History:
    """Train ``guide`` (and the model's parameters) by stochastic variational inference.

    Each step draws a mini-batch of B indices ``idx`` and calls ``model(x)`` / ``guide(x)``
    (``model(x, labels=y)`` when labels are given) with ``x = data[idx]``, or with the whole
    data when the model subsamples its data plate itself (see the module docstring: the
    three ways to write the data plate and what ``fit`` passes to each). The sites inside
    the data plate are scaled by N / B, global sites count once, and one optimizer step is
    taken on ``elbo``.

    Before the first step ``fit`` traces model and guide once and refuses, with an error
    naming the sites: a latent model site the guide lacks (Pyro would draw it from the
    prior, which is no lower bound; model-enumerated sites are fine), and, at B < N, an
    ``AutoGuide`` with per-datum latents in a data plate over the batch. While training it
    warns once per guide site whose logits are saturated (the gradient through sigmoid or
    softmax is exactly zero), checking the first step and every
    ``SATURATION_CHECK_EVERY`` steps.

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
    :param batch_size: B, between 1 and N (a larger value raises ``ValueError``); per
        process under ``torchrun`` (see the module docstring).
    :param labels: ``None`` (the model takes no labels), ``True`` (use ``data.y`` of a
        ``Dataset``) or a tensor of N labels; passed as the keyword ``labels``.
    :param data_plate: the name of the plate over the data; default ``"data"`` if the model
        has one, else the only plate of size B that holds an observed site.
    :param seed: seeds Pyro's global RNGs (torch, python, numpy) at the start and the
        batch order, so the same seed gives the same losses and parameters.
    :param device: where batches are moved; the model's networks must live there too.
        Under ``torchrun`` with ``device="cuda"`` each rank takes the GPU of its
        ``LOCAL_RANK`` (:func:`lvmkit.inference.distributed.setup` tells the script which,
        to move its networks there first).
    :param checkpoint_dir: if given, it must be writable (checked before the first step);
        every ``checkpoint_every`` steps and at the end ``fit`` writes ``checkpoint.pt``
        there atomically: parameters, optimizer state, every RNG state, the batch order,
        the history and the step counter. The previous newest becomes
        ``checkpoint-<step>.pt``.
    :param keep_last: how many checkpoints to keep (the newest and ``keep_last - 1``
        before it); older ones, and those of a run that ``resume=False`` replaces, are
        deleted once a new one is written.
    :param resume: continue from the newest readable checkpoint in ``checkpoint_dir``. A
        corrupt newest file is skipped with a warning naming it and the file used instead
        (and renamed ``<name>.unreadable``);
        if none can be read, :class:`CheckpointError` names them all. A checkpoint of a
        model with other parameter names or shapes is refused (``ValueError``).
    :param progress: show a tqdm bar with the running (exponentially averaged, 0.9) per-datum
        loss.
    :param callback: called as ``callback(history)`` after every step; a returned dict of
        floats is recorded in ``History.extras``.
    :param use_differentiable_loss: step through ``elbo.differentiable_loss`` + ``backward``
        instead of ``SVI.step`` (the path DDP and Lightning use); gradients are identical for
        ELBOs that implement both. An estimator's own parameters (REBAR's temperature and
        etas, RELAX's network) sit in the param store and are stepped by ``optim`` on
        either path; where the estimator has ``optim_args`` (REBAR, RELAX) and ``optim``'s
        arguments are a dict, they get the estimator's rate (its ``variance_optim_lr``).
    :raises FloatingPointError: when a loss is NaN or infinite; no checkpoint is written for
        that step, so the last checkpoint on disk is the last good state.
    :raises OSError: when ``checkpoint_dir`` cannot be written, before any step.
    :raises TypeError, ValueError: before any step, naming the argument or site: data that is
        not a finite, non-empty real or integer tensor off the ``meta`` device (or a Dataset
        with such ``x``), counts that are not ints (NumPy ints are; bools are not), a seed
        outside [0, 2**32 - 1], a device that does not exist here, an ELBO or optimizer of
        the wrong kind or a learning rate that is not positive and finite, non-bool flags,
        model latents the guide lacks, observed values that broadcast against their
        distribution; errors of the program on the first batch name the batch.

    Any exception raised while training (a non-finite loss, an error in the model, an
    interrupt) carries the :class:`History` of the steps done as ``exc.history``; with a
    ``checkpoint_dir`` it is also written to ``checkpoint_dir/history.json``.

    Example: a sigmoid belief net trained with REBAR for 10 steps, then 5 more steps
    resumed from its checkpoint.

    >>> import pyro
    >>> import torch
    >>> from lvmkit.inference import RebarELBO, fit
    >>> from lvmkit.models import build
    >>> x = torch.bernoulli(torch.full((20, 4), 0.5))
    >>> model, guide = build("sbn-linear", x_dim=4, layers=(3,), init_data=x)
    >>> history = fit(model, guide, x, elbo=RebarELBO(), steps=10, batch_size=5,
    ...               optim=pyro.optim.Adam({"lr": 1e-2}), checkpoint_dir="run",
    ...               progress=False)
    >>> len(history.loss), sorted(history.extras)
    (10, ['eta/b1', 'log_grad_variance', 'temperature', 'variance_objective'])
    >>> history = fit(model, guide, x, elbo=RebarELBO(), steps=15, batch_size=5,
    ...               optim=pyro.optim.Adam({"lr": 1e-2}), checkpoint_dir="run",
    ...               progress=False)
    >>> history.step[-1], len(history.loss)
    (15, 15)
    """
    x_all, y_all = _unpack(data, labels)
    n = x_all.shape[0]
    steps, epochs, batch_size, checkpoint_every, keep_last = _check_batching(
        n, batch_size, steps, epochs, checkpoint_every, keep_last)
    elbo = Trace_ELBO() if elbo is None else elbo
    optim = pyro.optim.Adam({"lr": 1e-3}) if optim is None else optim
    _check_options(model, guide, elbo, optim, seed, device, checkpoint_dir, callback,
                   use_differentiable_loss, resume=resume, progress=progress)
    _give_controls_their_rate(elbo, optim)
    seed = int(seed)
    context = distributed.setup(device)
    if context.enabled:
        device = context.device
    # Under torchrun, batch_size is per process: the ranks' shards make one global batch.
    global_batch = batch_size * context.world_size
    if global_batch > n:
        raise ValueError(f"batch_size={batch_size} on each of {context.world_size} processes "
                         f"asks for {global_batch} data per step; the data hold N={n}")
    total = steps if steps is not None else epochs * math.ceil(n / global_batch)
    distributed.check_same_everywhere(context, n=n, batch_size=batch_size, total=total,
                                      seed=seed)
    if use_differentiable_loss and not hasattr(elbo, "differentiable_loss"):
        raise TypeError(f"{type(elbo).__name__} has no differentiable_loss; use the SVI path")
    if data_plate is not None and (not isinstance(data_plate, str) or not data_plate):
        raise TypeError(f"data_plate must be a plate name (a non-empty str), got {data_plate!r}")
    checkpoints = None
    if checkpoint_dir is not None:
        checkpoints = _Checkpoints(os.fspath(checkpoint_dir), keep_last)
        checkpoints.check_writable()

    # Each rank draws its own latents (the batch order comes from the shared seed below).
    pyro.set_rng_seed((seed + RANK_SEED_STRIDE * context.rank) % 2**32)  # numpy takes < 2**32
    model_handler = _FitHandler(data_plate or DATA_PLATE, n)
    guide_handler = _FitHandler(data_plate or DATA_PLATE, n)
    plan = _first_trace(model, guide, data, x_all, y_all, batch_size, data_plate,
                        model_handler, guide_handler, device, seed)
    model_handler.plate = guide_handler.plate = plan.plate
    batches = _Batches(n, global_batch, seed, fixed_size=plan.fixed_size)
    sync = distributed.RankSync(context) if context.enabled else None
    if sync is not None:
        sync.broadcast_params(plan.params)
    history = History()
    step = 0

    if plan.pass_full:
        x_full = x_all.to(device)
        y_full = None if y_all is None else y_all.to(device)
        dynamic = isinstance(data, Dataset) and data.binarize == "dynamic"
        # Fresh pixels for the batch's rows only; the model reads no other row (it indexes
        # its data with the plate's indices, fixed to the batch).
        x_full = x_full.clone() if dynamic else x_full

    def get_batch() -> tuple[int, torch.Tensor, torch.Tensor, float, dict[str, torch.Tensor]]:
        """The step's epoch, this rank's indices and data, its share of the global batch
        (1 in a single process), and the keyword arguments."""
        epoch, global_idx = batches.next()
        idx = distributed.shard(global_idx, context.rank, context.world_size)
        share = len(idx) / len(global_idx)
        if plan.pass_full:
            if dynamic:  # the whole global batch: every rank's generator advances alike
                fresh = data.batch(global_idx, batches.generator).to(device)
                x_full[global_idx.to(device)] = fresh
            kwargs = {} if y_full is None else {"labels": y_full}
            return epoch, idx, x_full, share, kwargs
        if isinstance(data, Dataset):
            # the whole global batch binarised, so that the generator advances alike
            x = distributed.shard(data.batch(global_idx, batches.generator), context.rank,
                                  context.world_size)
        else:
            x = x_all[idx]
        kwargs = {} if y_all is None else {"labels": y_all[idx].to(device)}
        return epoch, idx, x.to(device), share, kwargs

    scaled_model = _handled(model, model_handler)
    scaled_guide = _handled(guide, guide_handler)

    if checkpoints is not None:
        if resume:
            restored = checkpoints.load()
            if restored is not None:
                step, history = _restore(restored[0], restored[1], optim, elbo, batches, n,
                                         batch_size, plan.params, context)
                if step > total:
                    raise ValueError(
                        f"checkpoint {restored[0]!r} is at step {step}, past the {total} steps"
                        " this run asks for: it would return the longer-trained model. Ask"
                        f" for at least {step} steps, or use another checkpoint_dir or"
                        " resume=False."
                    )
        else:
            checkpoints.replace_existing()

    svi = SVI(scaled_model, scaled_guide, optim, elbo)
    start_wall = history.wall_time[-1] if history.wall_time else 0.0
    first_step = step + 1
    bar = _progress_bar(progress and context.is_main, step, total)
    running = None  # exponential moving average shown on the bar; single losses are noisy
    try:
        while step < total:
            tic = time.perf_counter()
            epoch, idx, x, share, kwargs = get_batch()
            if len(idx):
                model_handler.scale = guide_handler.scale = n / len(idx)
            if plan.plate is not None:
                model_handler.indices = guide_handler.indices = idx
            guide_handler.checking = (step + 1 == first_step
                                      or (step + 1) % SATURATION_CHECK_EVERY == 0)
            if sync is not None:
                loss = sync.step(elbo, optim, scaled_model, scaled_guide, x, kwargs, share,
                                 use_differentiable_loss)
            elif use_differentiable_loss:
                loss = _differentiable_step(elbo, optim, scaled_model, scaled_guide, x, kwargs)
            else:
                loss = svi.step(x, **kwargs)
            guide_handler.checking = False
            step += 1
            if not math.isfinite(loss):
                hint = ("" if x.dtype not in LOW_PRECISION else
                        f"; data has dtype {x.dtype}, in which log-densities overflow easily:"
                        " convert it with .float()")
                raise FloatingPointError(
                    f"non-finite loss {loss} at step {step}; parameters of this step are not "
                    f"checkpointed{hint}"
                )
            start_wall += time.perf_counter() - tic
            extras = _diagnostics(elbo)
            if sync is not None:
                extras = sync.mean_of(extras)
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
            if checkpoints is not None and (step % checkpoint_every == 0 or step == total):
                state = _checkpoint_state(step, optim, elbo, batches, history, n, batch_size,
                                          context)
                if context.is_main:
                    checkpoints.save(state, step)
    except BaseException as exc:
        _hand_over_history(exc, history, checkpoints if context.is_main else None)
        raise
    finally:
        if bar is not None:
            bar.close()
    return history


def _hand_over_history(exc: BaseException, history: History,
                       checkpoints: _Checkpoints | None) -> None:
    """Put the steps done so far where the caller finds them: on the exception, and beside
    the checkpoints. Never masks the exception being raised."""
    where = "exc.history"
    try:
        exc.history = history
    except AttributeError:  # an exception type with __slots__
        where = None
    if checkpoints is not None:
        path = os.path.join(checkpoints.directory, HISTORY_NAME)
        try:
            atomic_write_bytes(json.dumps(history.to_dict()).encode(), path, prefix=".checkpoint-")
            where = path if where is None else f"{where} and {path}"
        except OSError:
            pass
    if where is not None and hasattr(exc, "add_note"):
        exc.add_note(f"fit: the History of the {len(history)} steps done is in {where}")


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
    if isinstance(data, Dataset):
        check_dataset(data)
    else:
        check_data(x)
    if labels is False:
        labels = None
    if labels is not None:
        if not torch.is_tensor(labels) or labels.shape[:1] != x.shape[:1]:
            shape = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
            raise ValueError(f"labels must be a tensor of {x.shape[0]} labels, got {shape}")
        check_tensor_arguments({"labels": labels})
    return x, labels


def _check_batching(n: int, batch_size: int, steps: int | None, epochs: int | None,
                    checkpoint_every: int, keep_last: int
                    ) -> tuple[int | None, int | None, int, int, int]:
    """The counts as Python ints (NumPy ints are accepted, bools are not)."""
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps= and epochs=")
    if steps is not None:
        steps = check_count("steps", steps, minimum=0)
    else:
        epochs = check_count("epochs", epochs, minimum=0)
    # An error rather than clipping: a silently larger batch changes the gradient noise
    # (and so the results) the user asked for.
    if (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
            or not 0 < batch_size <= n):
        raise ValueError(f"batch_size must be an int in [1, N={n}], got {batch_size!r}")
    return (steps, epochs, int(batch_size), check_count("checkpoint_every", checkpoint_every),
            check_count("keep_last", keep_last))


# Pyro seeds NumPy's legacy generator, which takes seeds in [0, 2**32 - 1].
_MAX_SEED = 2**32 - 1


def _check_options(model, guide, elbo, optim, seed, device, checkpoint_dir, callback,
                   use_differentiable_loss, **flags) -> None:
    """Refuse arguments of the wrong kind before anything runs, naming the argument."""
    for name, fn in (("model", model), ("guide", guide)):
        if not callable(fn):
            raise TypeError(f"{name} must be a callable Pyro program, got {type(fn).__name__}")
    if isinstance(elbo, type):
        raise TypeError(f"elbo must be an ELBO instance, got the class {elbo.__name__}; pass "
                        f"{elbo.__name__}()")
    if not hasattr(elbo, "loss_and_grads"):
        raise TypeError(f"elbo must be a Pyro ELBO (with loss_and_grads), got {elbo!r}")
    if not isinstance(optim, pyro.optim.PyroOptim):
        raise TypeError(f"optim must be a pyro.optim optimizer (e.g. pyro.optim.Adam({{'lr': "
                        f"1e-3}})), got {optim!r}")
    optim_args = getattr(optim, "pt_optim_args", None)
    lr = optim_args.get("lr") if isinstance(optim_args, dict) else None
    # torch refuses a negative lr only at the first step, takes inf (NaN losses) and 0 (no
    # training at all) without a word
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, numbers.Real)
                           or not math.isfinite(lr) or lr <= 0):
        raise ValueError(f"optim's learning rate lr={lr!r} must be a positive finite number")
    if (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
            or not 0 <= seed <= _MAX_SEED):
        raise ValueError(f"seed must be an int in [0, 2**32 - 1], got {seed!r}")
    check_device(device)
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, str | os.PathLike):
        raise TypeError(f"checkpoint_dir must be a str or os.PathLike, got {checkpoint_dir!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {callback!r}")
    # "no" is truthy: a non-bool flag would silently mean True
    for name, flag in {"use_differentiable_loss": use_differentiable_loss, **flags}.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")


# -- the first trace -------------------------------------------------------------------------
def _first_trace(model: Callable, guide: Callable, data, x_all: torch.Tensor,
                 y_all: torch.Tensor | None, batch_size: int, data_plate: str | None,
                 model_handler: _FitHandler, guide_handler: _FitHandler, device,
                 seed: int) -> _Plan:
    """Trace model and guide once on the first B data; find the data plate and how the
    model takes its data; refuse what would train silently wrong.

    Tracing also registers every parameter (including the networks' own ``nn.Parameter``
    objects) in the param store before a checkpoint is restored into them. The model runs
    with values drawn from its prior; nothing is learned.
    """
    n = x_all.shape[0]
    name = data_plate or DATA_PLATE
    first_idx = torch.arange(batch_size)
    if isinstance(data, Dataset):  # a separate generator: the batch stream stays untouched
        x = data.batch(first_idx, torch.Generator().manual_seed(seed)).to(device)
    else:
        x = x_all[first_idx].to(device)
    kwargs = {} if y_all is None else {"labels": y_all[:batch_size].to(device)}
    model_handler.indices = guide_handler.indices = first_idx
    probe = _SubsampleProbe(name)
    try:
        model_trace, guide_trace, pass_full = _trace_first(
            model, guide, data, x_all, y_all, x, kwargs, first_idx, name, probe, batch_size,
            model_handler, guide_handler, device, seed)
    except PROGRAM_ERRORS as err:
        described = ", ".join(f"{key}: {describe(value)}"
                              for key, value in {"data": x, **kwargs}.items())
        wrapped = program_error(
            err, f"running the guide and the model on the first batch ({described}) failed")
        if wrapped is None:
            raise
        raise wrapped from err
    model_handler.indices = guide_handler.indices = None
    plate = _find_data_plate(model_trace, name, data_plate, n, batch_size)
    if plate is not None:
        check_observed_values(model_trace, plate, f"data has shape {tuple(x_all.shape)}")
    model_frame = _frame(model_trace, plate)
    guide_frame = _frame(guide_trace, plate)
    declared = _check_plates(plate, model_frame, guide_frame, n, batch_size)
    _check_guide_covers_model(model_trace, guide_trace)
    if batch_size < n and plate is not None:
        _check_same_plate(model_trace, guide_trace, plate)
    if batch_size < n and plate is not None and not declared:
        _check_no_per_datum_autoguide(guide, plate, batch_size, n)
    if batch_size < n and plate is not None and declared:
        _check_no_joint_autoguide(guide, plate, batch_size, n)
    params = frozenset(name for trace in (model_trace, guide_trace)
                       for name, site in trace.nodes.items() if site["type"] == "param")
    # A plate that draws B indices (the model's or a guide's own) cannot take fewer.
    full_size = declared or (guide_frame is not None and _is_subsampled(guide_frame))
    return _Plan(plate=plate, pass_full=pass_full, fixed_size=batch_size < n and full_size,
                 params=params)


def _trace_first(model, guide, data, x_all, y_all, x, kwargs, first_idx, name, probe,
                 batch_size, model_handler, guide_handler, device, seed):
    """The first traces of model and guide (see :func:`_first_trace`), scored."""
    pass_full = False
    with poutine.block(), torch.no_grad():
        try:
            model_trace = poutine.trace(_handled(_handled(model, probe), model_handler)
                                        ).get_trace(x, **kwargs)
        except _StopAtPlate:
            pass_full = True
            if probe.subsample_size != batch_size:
                raise _RefusedPlate(
                    f"plate {name!r} draws subsample_size={probe.subsample_size}, but fit's "
                    f"batch_size is {batch_size}: make them equal (fit passes the whole data "
                    "and fixes the plate's indices to the batch it draws)"
                ) from None
            x = x_all.to(device)
            if isinstance(data, Dataset) and data.binarize == "dynamic":
                x = x.clone()
                x[first_idx] = data.batch(first_idx, torch.Generator().manual_seed(seed)).to(device)
            kwargs = {} if y_all is None else {"labels": y_all.to(device)}
            model_trace = poutine.trace(_handled(model, model_handler)).get_trace(x, **kwargs)
        guide_trace = poutine.trace(_handled(guide, guide_handler)).get_trace(x, **kwargs)
        # scored here, so that data the model cannot score fails naming the data, before
        # the first step
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
    return model_trace, guide_trace, pass_full


def _frames(trace) -> dict[str, Any]:
    """The plates of a trace's sample sites, by name (the first frame seen of each)."""
    frames = {}
    for site in trace.nodes.values():
        if site["type"] == "sample":
            for frame in site["cond_indep_stack"]:
                frames.setdefault(frame.name, frame)
    return frames


def _frame(trace, plate: str | None):
    return None if plate is None else _frames(trace).get(plate)


def _is_subsampled(frame) -> bool:
    """Whether Pyro scales the plate itself: it declares a size and holds fewer indices."""
    return frame.full_size not in (None, -1, frame.size)


def _find_data_plate(trace, name: str, data_plate: str | None, n: int,
                     batch_size: int) -> str | None:
    frames = _frames(trace)
    if name in frames:
        return name
    plates = sorted(frames)
    if data_plate is not None:
        raise ValueError(f"data_plate={data_plate!r}: the model has no such plate "
                         f"(its plates: {plates})")
    candidates = sorted({
        frame.name for site in trace.nodes.values()
        if site["type"] == "sample" and site["is_observed"] and not site_is_subsample(site)
        for frame in site["cond_indep_stack"] if frame.size == batch_size
    })
    if len(candidates) == 1:
        return candidates[0]
    if batch_size == n:  # nothing to scale and no index to fix: any plate will do
        return None
    found = (f"several plates of size {batch_size} hold observed sites: {candidates}"
             if candidates else
             f"no plate of size {batch_size} holds an observed site (plates: {plates})")
    raise ValueError(
        f"fit(batch_size={batch_size} < N={n}) must know which sites are per datum, to scale "
        f"them by N / B, but the model has no plate named {DATA_PLATE!r} and {found}. Put "
        f"the per-datum sites in pyro.plate({DATA_PLATE!r}, len(x)) or pass data_plate=<name>."
    )


def _check_plates(plate: str | None, model_frame, guide_frame, n: int, batch_size: int
                  ) -> bool:
    """Check the data plate's sizes; return whether it declares the full size N."""
    if plate is None or model_frame is None:
        return False
    declared = model_frame.full_size not in (None, -1, model_frame.size)
    if declared and model_frame.full_size != n:
        raise ValueError(
            f"plate {plate!r} declares size {model_frame.full_size}, but the data has N={n}: "
            "declare the data set's size (Pyro scales the plate's sites by size / "
            "subsample_size)"
        )
    if not declared and model_frame.size not in (-1, batch_size):
        raise ValueError(
            f"plate {plate!r} has size {model_frame.size}, but the batch has {batch_size} "
            f"rows: size the data plate by the batch, pyro.plate({plate!r}, len(x)), or "
            f"declare the full size N={n} (see fit's module docstring)"
        )
    if (declared and batch_size < n and guide_frame is not None
            and not _is_subsampled(guide_frame)):
        # Pyro replays the guide's subsample indices into the model: the guide's plate over
        # the batch would hand the model the positions 0..B-1 instead of the batch's data.
        raise ValueError(
            f"the model's plate {plate!r} declares the full size N={n}, the guide's has "
            f"size {guide_frame.size}: declare the same plate in the guide, "
            f"pyro.plate({plate!r}, {n}, subsample=...) (fit fixes both to the batch)"
        )
    return declared


def _check_guide_covers_model(model_trace, guide_trace) -> None:
    """Refuse latent model sites the guide lacks, once, instead of Pyro's warning at every
    step: SVI would draw them from the prior, and the objective is then no lower bound."""
    guide_sites = {name for name, site in guide_trace.nodes.items() if site["type"] == "sample"}
    missing = [
        name for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
        and not site["infer"].get("enumerate")  # summed out by TraceEnum_ELBO in the model
        and name not in guide_sites
    ]
    if missing:
        raise ValueError(
            f"the guide has no site for the model's latent sample site(s) {missing} (Pyro's "
            "'Found vars in model but not guide'): SVI would draw them from the prior and the "
            "objective would not be a lower bound. Sample them in the guide, observe them in "
            "the model, or mark them infer={'enumerate': 'parallel'} for TraceEnum_ELBO."
        )


def _check_same_plate(model_trace, guide_trace, plate: str) -> None:
    """A site inside the data plate in the model but not in the guide (or the reverse)
    would have its log-density scaled by N / B on one side only."""

    def inside(trace) -> dict[str, bool]:
        return {name: any(frame.name == plate for frame in site["cond_indep_stack"])
                for name, site in trace.nodes.items()
                if site["type"] == "sample" and not site_is_subsample(site)}

    in_model, in_guide = inside(model_trace), inside(guide_trace)
    split = sorted(name for name in in_guide.keys() & in_model.keys()
                   if in_guide[name] != in_model[name])
    if split:
        where = {name: "model" if in_model[name] else "guide" for name in split}
        raise ValueError(
            f"site(s) {split} are inside plate {plate!r} in only one of model and guide "
            f"(inside it in: {where}): fit scales the per-datum sites by N / B, so model and "
            f"guide must both sample them inside pyro.plate({plate!r}, ...)"
        )


def _autoguide_parts(guide) -> list:
    from pyro.infer.autoguide import AutoCallable, AutoGuide, AutoGuideList

    if isinstance(guide, AutoGuideList):
        return [part for sub in guide for part in _autoguide_parts(sub)]
    if isinstance(guide, AutoGuide) and not isinstance(guide, AutoCallable):
        return [guide]
    return []


def _check_no_joint_autoguide(guide, plate: str, batch_size: int, n: int) -> None:
    """An ``AutoContinuous`` guide (``AutoHVM``, ``AutoDiagonalNormal``, ...) joins every
    latent into one vector of the prototype's shape: over a subsampled data plate its
    entries follow the plate's positions 0..B-1, not the data, so each would fit a different
    datum at every step (Pyro trains it silently)."""
    from pyro.infer.autoguide import AutoContinuous

    for part in _autoguide_parts(guide):
        trace = getattr(part, "prototype_trace", None)
        if trace is None or not isinstance(part, AutoContinuous):
            continue
        sites = [
            name for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]
            and not site_is_subsample(site)
            and any(f.name == plate for f in site["cond_indep_stack"])
        ]
        if sites:
            raise ValueError(
                f"{type(part).__name__} joins all latents into one vector, so its entries for "
                f"the per-datum site(s) {sites} in the subsampled plate {plate!r} (B="
                f"{batch_size} of N={n}) follow the batch's positions, not the data: each "
                "would be trained on other data at every step. Use an amortized guide "
                "(lvmkit.guides.AmortizedAutoHVM), AutoNormal, or batch_size=N."
            )


def _check_no_per_datum_autoguide(guide, plate: str, batch_size: int, n: int) -> None:
    """An AutoGuide keeps one parameter per plate position; over a data plate of size B < N
    each position would hold a different datum at every step. Guides marked ``amortized``
    (no per-datum parameters, e.g. ``AmortizedAutoHVM``) are fine."""
    for part in _autoguide_parts(guide):
        trace = getattr(part, "prototype_trace", None)
        if trace is None or getattr(part, "amortized", False):
            continue
        sites = [
            name for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]
            and not site_is_subsample(site)
            and any(f.name == plate and not _is_subsampled(f) for f in site["cond_indep_stack"])
        ]
        if sites:
            raise ValueError(
                f"{type(part).__name__} keeps per-datum parameters for site(s) {sites} in "
                f"plate {plate!r}, which has the batch's size {batch_size} < N={n}: every "
                "batch would train the same parameters on other data. Declare the full size "
                f"in the model, `with pyro.plate({plate!r}, len(x), subsample_size="
                f"{batch_size}) as ind:` and index the data with ind (fit then passes the "
                f"whole data and fixes ind to the batch), or use batch_size={n}, or an "
                "amortized guide."
            )


# -- saturated logits ------------------------------------------------------------------------
def _saturation(fn) -> tuple[int, int, float, float, torch.dtype] | None:
    """(saturated, total, largest |logit| or gap, threshold, dtype) for a discrete
    distribution whose logits push sigmoid / softmax within rounding of 0 or 1, else None.

    Past ``log(2 / eps)`` (16.6 in float32, 36.7 in float64) ``sigmoid`` rounds to 1 and
    the gradient of ``log q`` through it is exactly zero; a softmax saturates when the
    largest logit leads the next by that much. A relaxed site (temperature T, logistic or
    Gumbel noise bounded by about the same amount) saturates whatever the noise beyond
    ``(1 + T)`` times the threshold. Parameters given as probs saturate within ``eps`` of
    0 or 1, where ``clamp_probs`` stops the gradient.
    """
    while isinstance(fn, (Independent, MaskedDistribution, ExpandedDistribution)):
        fn = fn.base_dist
    if isinstance(fn, (RelaxedBernoulli, RelaxedOneHotCategorical)):
        binary = isinstance(fn, RelaxedBernoulli)
        temperature = fn.temperature
        fn = fn.base_dist
    elif isinstance(fn, (Bernoulli, Categorical, OneHotCategorical)):
        binary = isinstance(fn, Bernoulli)
        temperature = None
        if isinstance(fn, OneHotCategorical):
            fn = fn._categorical
    else:
        return None
    with torch.no_grad():
        logits = fn.__dict__.get("logits")
        if logits is None:  # given as probs; reading .logits would clamp them first
            probs = fn.__dict__.get("probs")
            if probs is None:
                return None
            probs = probs.detach()
            eps = torch.finfo(probs.dtype).eps
            if binary:
                bad = (probs <= eps) | (probs >= 1 - eps)
            else:
                bad = probs.max(-1).values >= 1 - eps
            count = int(bad.sum())
            return (count, bad.numel(), float("nan"), 1 - eps, probs.dtype) if count else None
        logits = logits.detach()
        if not logits.dtype.is_floating_point:
            return None
        threshold = math.log(2 / torch.finfo(logits.dtype).eps)
        if binary:
            gap = logits.abs()
        elif logits.shape[-1] < 2:
            return None
        else:
            top2 = logits.topk(2, dim=-1).values
            gap = top2[..., 0] - top2[..., 1]
        limit = threshold if temperature is None else threshold * (1 + temperature.detach())
        bad = gap >= limit
        count = int(bad.sum())
        if not count:
            return None
        return count, bad.numel(), float(gap.max()), threshold, logits.dtype


def _saturation_message(site: str, count: int, total: int, worst: float, threshold: float,
                        dtype: torch.dtype) -> str:
    if math.isnan(worst):
        what = f"{count} of {total} probabilities are within eps of 0 or 1"
    else:
        what = (f"{count} of {total} logits are saturated (|logit|, or the softmax's lead, "
                f"up to {worst:.3g} >= {threshold:.3g})")
    return (
        f"guide site {site!r}: {what} in {dtype}, so sigmoid/softmax round to 0 or 1 and "
        "their gradient is exactly zero: those units have stopped learning. Initialise or "
        "clamp the logits smaller (e.g. logits.clamp(-10, 10)) or lower the learning rate."
    )


# -- the step --------------------------------------------------------------------------------
def _differentiable_step(elbo, optim, model, guide, x, kwargs) -> float:
    with poutine.trace(param_only=True) as param_capture:
        loss = elbo.differentiable_loss(model, guide, x, **kwargs)
        if torch.is_tensor(loss) and loss.requires_grad:  # nothing to train: as SVI does
            loss.backward()
    # An estimator's own parameters (REBAR's temperature and etas, ...) are read through
    # the param store in the loss, so they are captured and stepped with the model's.
    params = {site["value"].unconstrained() for site in param_capture.trace.nodes.values()}
    optim(params)
    pyro.infer.util.zero_grads(params)
    return loss.item() if torch.is_tensor(loss) else float(loss)


def _give_controls_their_rate(elbo, optim: pyro.optim.PyroOptim) -> None:
    """Per-parameter arguments for an estimator that asks for them (REBAR's and RELAX's
    controls train at ``variance_optim_lr``, as the reference code's faster rate); an
    ``optim`` built with a callable already chooses per parameter and is left alone."""
    optim_args = getattr(elbo, "optim_args", None)
    if callable(optim_args) and isinstance(optim.pt_optim_args, dict):
        optim.pt_optim_args = optim_args(optim.pt_optim_args)
        optim.pt_optim_args_argc = 1


def _diagnostics(elbo) -> dict[str, float] | None:
    report = getattr(elbo, "diagnostics", None)
    if not callable(report):
        return None
    return {key: float(value) for key, value in report().items()}


def _progress_bar(progress: bool, initial: int, total: int):
    if not progress:
        return None
    from lvmkit._progress import progress_bar

    return progress_bar(total, initial, desc="fit")


# -- checkpoints -----------------------------------------------------------------------------
class _Checkpoints:
    """The checkpoint files of one directory: ``checkpoint.pt`` is the newest,
    ``checkpoint-<step>.pt`` the older ones this run keeps (``keep_last`` in all)."""

    def __init__(self, directory: str, keep_last: int):
        self.directory, self.keep_last = directory, keep_last
        self.path = os.path.join(directory, CHECKPOINT_NAME)
        self.newest_step: int | None = None  # the step in checkpoint.pt, once known good
        self.stale: set[str] = set()  # files of a run this one replaces

    def check_writable(self) -> None:
        try:
            os.makedirs(self.directory, exist_ok=True)
            handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=self.directory)
            os.close(handle)
            os.remove(probe)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"checkpoint_dir {self.directory!r} is not a writable directory "
                f"({type(exc).__name__}: {exc.strerror or exc}); fit checks before the first "
                "step so that no training is lost. Pass another checkpoint_dir, or None.",
            ) from exc

    def _older(self) -> list[tuple[int, str]]:
        """The older checkpoints as (step, file name), newest first."""
        found = []
        for name in os.listdir(self.directory):
            match = _OLDER_CHECKPOINT.fullmatch(name)
            if match:
                found.append((int(match.group(1)), name))
        return sorted(found, reverse=True)

    def candidates(self) -> list[str]:
        names = [CHECKPOINT_NAME] if os.path.exists(self.path) else []
        return [os.path.join(self.directory, name)
                for name in names + [name for _, name in self._older()]]

    def replace_existing(self) -> None:
        """``resume=False``: this run's first save deletes the checkpoints found here."""
        self.stale = {os.path.basename(path) for path in self.candidates()}

    def load(self) -> tuple[str, dict] | None:
        """The newest readable checkpoint as (path, state); None if there is none."""
        failed = []
        for path in self.candidates():
            try:
                state = torch.load(path, weights_only=False)
                if not isinstance(state, dict) or not all(k in state for k in _CHECKPOINT_KEYS):
                    raise ValueError("not a checkpoint written by fit")
            except Exception as exc:  # truncated, random bytes, empty: all mean unreadable
                failed.append((path, f"{path} ({type(exc).__name__}: {exc})"))
                continue
            if failed:
                kept = _set_aside([bad for bad, _ in failed])
                warnings.warn(
                    f"checkpoint {'; '.join(why for _, why in failed)} cannot be read; "
                    f"resuming from the previous one, {path} (step {state['step']}). "
                    f"The unreadable file(s) are kept as {kept}.",
                    RuntimeWarning, stacklevel=3,
                )
            if os.path.basename(path) == CHECKPOINT_NAME:
                self.newest_step = state["step"]
            return path, state
        if failed:
            raise CheckpointError(
                f"no checkpoint in {self.directory!r} can be read: "
                f"{'; '.join(why for _, why in failed)}. "
                "Delete them or pass resume=False to start over."
            )
        return None

    def save(self, state: dict, step: int) -> None:
        def keep_previous() -> None:  # the newest so far becomes checkpoint-<step>.pt
            if self.newest_step is not None and os.path.exists(self.path):
                os.replace(self.path, os.path.join(self.directory,
                                                   f"checkpoint-{self.newest_step}.pt"))

        atomic_save(state, self.path, prefix=".checkpoint-", before_replace=keep_previous)
        self.newest_step = step
        self._prune(step)
        fsync_directory(self.directory)

    def _prune(self, step: int) -> None:
        kept = 0
        for older_step, name in self._older():
            # Newer than this save: an abandoned timeline (or an unreadable file) of a
            # run resumed from before it.
            if name in self.stale or older_step >= step or kept >= self.keep_last - 1:
                os.remove(os.path.join(self.directory, name))
            else:
                kept += 1
        self.stale = set()


def _set_aside(paths: list[str]) -> list[str]:
    """Rename unreadable checkpoints to ``<name>.unreadable``: out of the loader's and the
    pruning's way, but not deleted (a file unreadable here, say written by another torch,
    may still hold work)."""
    kept = []
    for path in paths:
        try:
            os.replace(path, path + ".unreadable")
            kept.append(path + ".unreadable")
        except OSError:
            kept.append(path)
    return kept



def _checkpoint_state(step: int, optim, elbo, batches: _Batches, history: History, n: int,
                      batch_size: int, context: distributed.DistributedContext
                      ) -> dict[str, Any]:
    return {
        "world_size": context.world_size,
        # every rank's own generators (each draws its own latents); rank 0's are "rng"
        "rng_ranks": distributed.gather_objects(RandomState().as_dict(), context),
        "step": step,
        "n": n,
        "batch_size": batch_size,
        "params": pyro.get_param_store().get_state(),
        "optim": optim.get_state(),
        "optim_config": _optim_config(optim),
        # What the estimator learns or tracks outside the param store (REBAR's temperature
        # and etas, NVIL's running moments, ...), if it has any.
        "elbo": {"type": type(elbo).__name__, "state": _elbo_state(elbo),
                 "max_plate_nesting": _guessed_nesting(elbo)},
        # CUDA's generators once CUDA is in use (saving them would otherwise start it)
        "rng": RandomState().as_dict(),
        "batches": batches.state(),
        "history": history.to_dict(),
    }


def _optim_config(optim) -> dict:
    """The optimizer's class and, per parameter, its arguments (plain values): a resumed
    run's torch optimizers take their learning rate and betas from the saved state, so a run
    resumed with other settings would silently keep the old ones."""
    constructor = getattr(optim, "pt_optim_constructor", None)
    args = {}
    get_args = getattr(optim, "_get_optim_args", None)
    if callable(get_args):
        for name, param in pyro.get_param_store().named_parameters():
            try:
                values = get_args(param)
            except (KeyError, TypeError, ValueError):
                continue
            args[name] = {k: v for k, v in dict(values).items()
                          if isinstance(v, int | float | str | bool | tuple)}
    return {"class": getattr(constructor, "__name__", type(optim).__name__), "args": args}


def _check_optim_config(path: str, saved: dict | None, optim) -> None:
    if saved is None:
        return  # a checkpoint written before the optimizer's settings were saved
    now = _optim_config(optim)
    if saved["class"] != now["class"]:
        raise ValueError(
            f"checkpoint {path!r} was written by a run with the optimizer {saved['class']};"
            f" this run uses {now['class']}. Use another checkpoint_dir or resume=False."
        )
    for name, args in now["args"].items():
        old = saved["args"].get(name)
        if old is None:
            continue
        changed = {k: (old[k], v) for k, v in args.items() if k in old and old[k] != v}
        if changed:
            key, (was, got) = next(iter(changed.items()))
            raise ValueError(
                f"checkpoint {path!r} was written with {key}={was!r} for parameter {name!r};"
                f" this run asks for {key}={got!r}, which the restored optimizer state would"
                " silently replace. Resume with the same optimizer settings, or use another"
                " checkpoint_dir or resume=False."
            )


def _guessed_nesting(elbo) -> int | None:
    """The plate nesting a Pyro ELBO with vectorized particles guessed on its first step.
    The guess traces model and guide, drawing random numbers, so a resumed run must not
    guess again after its generators are restored: it would draw other latents from there
    on than the run it continues."""
    nesting = getattr(elbo, "max_plate_nesting", None)
    return int(nesting) if isinstance(nesting, int | float) and math.isfinite(nesting) else None


def _elbo_state(elbo) -> dict | None:
    state_dict = getattr(elbo, "state_dict", None)
    return state_dict() if callable(state_dict) else None


def _restore(path: str, state: dict, optim, elbo, batches: _Batches, n: int, batch_size: int,
             used: frozenset[str], context: distributed.DistributedContext
             ) -> tuple[int, History]:
    saved_world = state.get("world_size", 1)
    if saved_world != context.world_size:
        # Another world size is another global batch, so another batch stream: refused
        # rather than continued on other data than the checkpoint's run would have seen.
        raise ValueError(
            f"checkpoint {path!r} was written by a job of {saved_world} process(es); this "
            f"one has {context.world_size}. Resume with the same number of processes "
            "(torchrun --nproc_per_node), or use another checkpoint_dir or resume=False."
        )
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
        nesting = saved.get("max_plate_nesting")
        if nesting is not None and getattr(elbo, "max_plate_nesting", None) == math.inf:
            elbo.max_plate_nesting = nesting  # not guessed again (see _guessed_nesting)
    _check_params_match(path, state["params"]["params"], used)
    _load_params(state["params"])
    _check_optim_config(path, state.get("optim_config"), optim)
    optim.set_state(state["optim"])
    rng = state.get("rng_ranks") or [state["rng"]]
    RandomState.from_dict(rng[context.rank]).restore()
    batches.load(state["batches"])
    return state["step"], History.from_dict(state["history"])


def _check_params_match(path: str, saved: dict[str, torch.Tensor], used: frozenset[str]
                        ) -> None:
    """Refuse a checkpoint of another model: resumed with other names or shapes, part of
    the model would keep its initial values.

    ``used`` are the parameters the first trace of model and guide read; the store holds
    them (unconstrained, as the checkpoint does). Saved parameters this model does not use
    (an estimator's, another model's in the same store) are no reason to refuse.
    """
    store = pyro.get_param_store()._params
    absent = sorted(name for name in used if name not in saved)
    reshaped = [f"{name} {tuple(saved[name].shape)} in the checkpoint vs "
                f"{tuple(store[name].shape)} here"
                for name in sorted(used) if name in saved and name in store
                and saved[name].shape != store[name].shape]
    if not absent and not reshaped:
        return
    problems = []
    if absent:
        problems.append(f"in this model but not in the checkpoint: {absent}")
        unused = sorted(name for name in saved if name not in used)
        if unused:
            problems.append(f"in the checkpoint but not in this model: {unused}")
    if reshaped:
        problems.append("other shapes: " + ", ".join(reshaped))
    raise ValueError(
        f"checkpoint {path!r} was written by a model with other parameters; "
        + "; ".join(problems) + ". Use another checkpoint_dir or resume=False."
    )


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
