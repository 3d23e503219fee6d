"""Data-parallel training on ``torch.distributed``, as :func:`lvmkit.inference.fit` uses it.

The same script runs as ``python train.py`` and as ``torchrun --nproc_per_node W train.py``.
Under ``torchrun`` (or with a process group already initialised) each of the W processes
("ranks") trains on its own shard of every batch:

- at step ``t`` the ranks together see exactly the batch that one process with
  ``batch_size * W`` draws at step ``t``: the epoch's permutation comes from the shared seed
  and each global batch is cut into W contiguous shards (:func:`shard`), as
  ``torch.utils.data.DistributedSampler`` does with a shared seed;
- every rank scales the log-densities of its local sites by ``N / B_global`` (the global
  batch size), so the **sum** of the ranks' gradients is the single-process gradient of the
  global batch, and the ranks' gradients are summed (:func:`all_reduce_sum_`);
- the summed gradient is the same on every rank, so the same optimizer step keeps the
  parameters identical everywhere; the estimators' own learned controls (REBAR's and
  RELAX's temperature, etas and control network) are summed the same way, and their
  running statistics (NVIL's moments) are averaged after every step.

The all-reduce is written out explicitly rather than through
``torch.nn.parallel.DistributedDataParallel``: Pyro's parameters live in its param store
and are created lazily on the first trace, the estimators hand their gradients on through
``loss_and_grads`` as well as through ``differentiable_loss``, and a rank's shard of the
last batch of an epoch may be smaller than the others' (or empty), which DDP's averaging
would weigh wrongly. One flat buffer per step keeps it to one collective call.
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.infer.util
import torch
import torch.distributed as dist
from pyro import poutine

#: What ``torchrun`` puts in every worker's environment.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

#: Seconds a collective waits for the other ranks before failing (``LVMKIT_DIST_TIMEOUT``).
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a data-parallel job.

    :ivar rank: this process's index, 0 to ``world_size - 1``.
    :ivar world_size: the number of processes (1 when not distributed).
    :ivar device: the device this rank computes on.
    :ivar owns_group: whether :func:`setup` created the process group (and
        :func:`teardown` should destroy it).

    Example:

    >>> from lvmkit.inference.distributed import DistributedContext, setup
    >>> context = setup()  # not under torchrun: one rank
    >>> context == DistributedContext(rank=0, world_size=1)
    True
    >>> context.enabled, context.is_main
    (False, True)
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints and shows progress."""
        return self.rank == 0


def launched_by_torchrun(env: dict[str, str] | None = None) -> bool:
    """Whether the environment holds torchrun's variables for a job of more than one rank.

    Example:

    >>> from lvmkit.inference.distributed import launched_by_torchrun
    >>> env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
    ...        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    >>> launched_by_torchrun(env), launched_by_torchrun({**env, "WORLD_SIZE": "1"})
    (True, False)
    >>> launched_by_torchrun({})
    False
    """
    env = os.environ if env is None else env
    return all(key in env for key in TORCHRUN_ENV) and int(env["WORLD_SIZE"]) > 1


def setup(device: str | torch.device = "cpu", timeout_s: float | None = None
          ) -> DistributedContext:
    """Join the data-parallel job this process belongs to, if any.

    Uses an already initialised process group as it is; otherwise, under ``torchrun``,
    initialises one: gloo on the CPU, NCCL on CUDA, where each rank takes the GPU of its
    ``LOCAL_RANK`` (unless ``device`` names an index). Outside both, returns a context of
    one rank on ``device``.

    :param timeout_s: how long a collective waits for the others before it fails (default
        ``LVMKIT_DIST_TIMEOUT`` or 300 s), so that a rank that died cannot hang the job.

    Example: the same script runs alone and under ``torchrun``.

    >>> from lvmkit.inference.distributed import setup, teardown
    >>> context = setup("cpu")
    >>> context.rank, context.world_size, context.owns_group
    (0, 1, False)
    >>> teardown(context)  # nothing to destroy here
    """
    device = torch.device(device)
    initialised = dist.is_available() and dist.is_initialized()
    if not initialised and not launched_by_torchrun():
        return DistributedContext(device=device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if not initialised:
        if timeout_s is None:
            timeout_s = float(os.environ.get("LVMKIT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        owns = True
        # The group outlives this call (fit may be called again in the same job).
        atexit.register(_destroy_if_initialised)
        _note_uncaught_exceptions()
    return DistributedContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                              device=device, owns_group=owns)


def teardown(context: DistributedContext) -> None:
    """Destroy the process group if :func:`setup` created it.

    Example: a process group initialised by the caller is left to the caller.

    >>> import torch.distributed as dist
    >>> from lvmkit.inference.distributed import setup, teardown
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> context = setup()
    >>> context.owns_group
    False
    >>> teardown(context)
    >>> dist.is_initialized()
    True
    >>> dist.destroy_process_group()
    """
    if context.owns_group and dist.is_initialized():
        dist.destroy_process_group()


_exiting_on_exception = False


def _note_uncaught_exceptions() -> None:
    """Chain ``sys.excepthook`` so that the exit handler knows whether this process is
    leaving on an uncaught exception."""
    previous = sys.excepthook

    def hook(*exc_info):
        global _exiting_on_exception
        _exiting_on_exception = True
        previous(*exc_info)

    sys.excepthook = hook


#: seconds a rank leaving normally waits for its peers at exit (gloo)
EXIT_BARRIER_TIMEOUT_S = 30.0


def _destroy_if_initialised() -> None:
    if not dist.is_initialized():
        return
    # A rank that exits while a peer still works aborts gloo's threads at teardown
    # ("terminate called without an active exception", one test_distributed run in
    # three here), with or without destroying the group: ranks leaving normally meet
    # first. The wait is short and bounded: a rank whose peer called sys.exit (which
    # no hook sees) mid-collective, or is still busy, leaves after the timeout instead of
    # waiting out the group's. Work that only rank 0 does (evaluation) ends with
    # wait_for_main, so the peers do not reach this point early. A rank leaving on an
    # uncaught exception does not wait: torchrun stops the others.
    if not _exiting_on_exception and dist.get_backend() == "gloo":
        try:
            dist.monitored_barrier(
                timeout=datetime.timedelta(seconds=EXIT_BARRIER_TIMEOUT_S))
        except RuntimeError as error:
            print(f"lvmkit: rank {dist.get_rank()} leaves without its peers"
                  f" ({str(error).splitlines()[0][:200]})", file=sys.stderr)
            return
    dist.destroy_process_group()


def wait_for_main(context: DistributedContext, timeout_s: float | None = None) -> None:
    """Every rank waits here until rank 0 gets here too, however long rank 0 works alone
    before that (evaluating, writing files): up to ``timeout_s`` seconds
    (``LVMKIT_DIST_WAIT_TIMEOUT``, default a day) on gloo; on NCCL, the group's timeout.
    Nothing to wait for in one process.

    Example:

    >>> from lvmkit.inference.distributed import DistributedContext, wait_for_main
    >>> wait_for_main(DistributedContext())  # a single process
    """
    if not context.enabled:
        return
    if dist.get_backend() != "gloo":
        barrier(context)
        return
    if timeout_s is None:
        timeout_s = float(os.environ.get("LVMKIT_DIST_WAIT_TIMEOUT", 86400.0))
    dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))


def shard(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous share of a global batch's indices.

    The shards of ranks 0..W-1, concatenated, are ``indices`` in order. Sizes differ by at
    most one; a global batch smaller than W leaves some ranks an empty shard.

    Example:

    >>> import torch
    >>> from lvmkit.inference.distributed import shard
    >>> batch = torch.tensor([7, 3, 9, 1, 4])
    >>> [shard(batch, rank, world_size=2).tolist() for rank in range(2)]
    [[7, 3, 9], [1, 4]]
    >>> shard(torch.tensor([5]), rank=1, world_size=2)
    tensor([], dtype=torch.int64)
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return torch.tensor_split(indices, world_size)[rank]


def check_same_everywhere(context: DistributedContext, **values: int) -> None:
    """Refuse a job whose ranks disagree on settings that must be shared (N, batch size,
    steps, seed): their batches would not partition one global batch.

    Example: in one process there is nothing to disagree with.

    >>> from lvmkit.inference.distributed import DistributedContext
    >>> one = DistributedContext()  # a single process: rank 0 of 1
    >>> from lvmkit.inference.distributed import check_same_everywhere
    >>> check_same_everywhere(one, n=100, batch_size=10, seed=0)
    """
    if not context.enabled:
        return
    names = sorted(values)
    mine = torch.tensor([int(values[name]) for name in names], dtype=torch.long)
    gathered = [torch.zeros_like(mine) for _ in range(context.world_size)]
    dist.all_gather(gathered, _to_backend(mine, context))
    gathered = [g.cpu() for g in gathered]
    for i, name in enumerate(names):
        seen = sorted({int(g[i]) for g in gathered})
        if len(seen) > 1:
            per_rank = ", ".join(f"rank {r}: {int(g[i])}" for r, g in enumerate(gathered))
            raise ValueError(f"the ranks of this job disagree on {name} ({per_rank}); every "
                             "rank must call fit with the same data and settings")


def all_reduce_sum_(tensors: Sequence[torch.Tensor], context: DistributedContext) -> None:
    """Sum each tensor over the ranks, in place, in one collective call.

    Example: in one process the sum is the tensor itself (with W ranks, each would hold
    the sum of the W values).

    >>> import torch
    >>> from lvmkit.inference.distributed import DistributedContext
    >>> one = DistributedContext()  # a single process: rank 0 of 1
    >>> from lvmkit.inference.distributed import all_reduce_sum_
    >>> grads = [torch.tensor([1.0, 2.0]), torch.tensor(3.0)]
    >>> all_reduce_sum_(grads, one)
    >>> grads
    [tensor([1., 2.]), tensor(3.)]
    """
    _all_reduce_(tensors, context, average=False)


def all_reduce_mean_(tensors: Sequence[torch.Tensor], context: DistributedContext) -> None:
    """Average each floating tensor over the ranks, in place (integer ones are left alone:
    step counters agree already).

    Example:

    >>> import torch
    >>> from lvmkit.inference.distributed import DistributedContext
    >>> one = DistributedContext()  # a single process: rank 0 of 1
    >>> from lvmkit.inference.distributed import all_reduce_mean_
    >>> moments = [torch.tensor([0.5]), torch.tensor(7)]
    >>> all_reduce_mean_(moments, one)
    >>> moments
    [tensor([0.5000]), tensor(7)]
    """
    _all_reduce_([t for t in tensors if t.is_floating_point()], context, average=True)


def _all_reduce_(tensors: Sequence[torch.Tensor], context: DistributedContext,
                 average: bool) -> None:
    if not context.enabled or not tensors:
        return
    with torch.no_grad():
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
        flat = _to_backend(flat, context)
        dist.all_reduce(flat)
        if average:
            flat /= context.world_size
        offset = 0
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t).to(t))
            offset += t.numel()


def sum_gradients_(params: Iterable[torch.Tensor], context: DistributedContext) -> None:
    """Sum the gradients of ``params`` over the ranks, in place.

    Every rank must pass the same parameters in the same order; a parameter whose gradient
    is missing on this rank (unused by its shard) counts as zero, so that the collective's
    layout agrees everywhere.

    Example:

    >>> import torch
    >>> from lvmkit.inference.distributed import DistributedContext
    >>> one = DistributedContext()  # a single process: rank 0 of 1
    >>> from lvmkit.inference.distributed import sum_gradients_
    >>> weight = torch.nn.Parameter(torch.ones(2))
    >>> (3 * weight).sum().backward()
    >>> sum_gradients_([weight], one)
    >>> weight.grad
    tensor([3., 3.])
    """
    params = list(params)
    if not context.enabled or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_sum_([p.grad for p in params], context)


def broadcast_(tensors: Sequence[torch.Tensor], context: DistributedContext,
               source: int = 0) -> None:
    """Overwrite each tensor with rank ``source``'s value (the initial parameters).

    Example:

    >>> import torch
    >>> from lvmkit.inference.distributed import DistributedContext
    >>> one = DistributedContext()  # a single process: rank 0 of 1
    >>> from lvmkit.inference.distributed import broadcast_
    >>> params = [torch.zeros(3)]
    >>> broadcast_(params, one)  # rank 0 is the source: unchanged
    >>> params
    [tensor([0., 0., 0.])]
    """
    if not context.enabled or not tensors:
        return
    with torch.no_grad():
        flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
        flat = _to_backend(flat, context)
        dist.broadcast(flat, src=source)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t).to(t))
            offset += t.numel()


def sum_scalar(value: float, context: DistributedContext) -> float:
    """The sum over the ranks of one float (the ranks' shares of the loss).

    Example:

    >>> from lvmkit.inference.distributed import DistributedContext
    >>> one = DistributedContext()  # a single process: rank 0 of 1
    >>> from lvmkit.inference.distributed import sum_scalar
    >>> sum_scalar(2.5, one)
    2.5
    """
    if not context.enabled:
        return value
    tensor = _to_backend(torch.tensor([value], dtype=torch.float64), context)
    dist.all_reduce(tensor)
    return float(tensor.item())


def barrier(context: DistributedContext) -> None:
    """Wait until every rank gets here (nothing to wait for in one process).

    Example:

    >>> from lvmkit.inference.distributed import DistributedContext
    >>> one = DistributedContext()  # a single process: rank 0 of 1
    >>> from lvmkit.inference.distributed import barrier
    >>> barrier(one)
    """
    if context.enabled:
        dist.barrier()


def _to_backend(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    # NCCL only moves CUDA tensors; gloo takes CPU ones.
    backend = dist.get_backend()
    if backend == "nccl":
        return tensor.to(context.device)
    return tensor.cpu()


def gather_objects(obj: Any, context: DistributedContext) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process).

    Example:

    >>> from lvmkit.inference.distributed import DistributedContext
    >>> one = DistributedContext()  # a single process: rank 0 of 1
    >>> from lvmkit.inference.distributed import gather_objects
    >>> gather_objects({"rank": 0, "loss": 1.5}, one)
    [{'rank': 0, 'loss': 1.5}]
    """
    if not context.enabled:
        return [obj]
    out: list[Any] = [None] * context.world_size
    dist.all_gather_object(out, obj)
    return out


class RankSync:
    """One data-parallel training step of :func:`lvmkit.inference.fit`, and what keeps the
    ranks identical.

    Each rank computes the single-process estimate on its shard (its sites scaled by
    N / its shard size), backpropagates, and its gradients are weighted by its share of the
    global batch, ``B_r / B``, and summed over the ranks: for a loss
    ``L_r = G + (N / B_r) l_r`` with global terms ``G`` and local terms ``l_r`` that gives
    ``G + (N / B) sum_r l_r``, the single-process estimate of the global batch (an exact
    average of the ranks' gradients when the shards are equal). A rank with an empty shard
    (a last batch of an epoch smaller than W) contributes zero.

    The step goes through the ELBO's ``differentiable_loss`` where it has one, so that an
    estimator's own controls (REBAR's temperature and etas, RELAX's network) receive their
    variance-objective gradients in ``.grad``; they are read through the param store, so
    they are summed and stepped with the model's parameters. Floating buffers of the
    estimator's modules (NVIL's running moments) are averaged after each step.

    Example: :func:`~lvmkit.inference.fit` builds one under ``torchrun``; here a process
    group of one rank stands in for the job (with one rank the step is an ordinary step).

    >>> import pyro
    >>> import torch
    >>> import torch.distributed as dist
    >>> from lvmkit.inference.distributed import RankSync, setup
    >>> from lvmkit.models import build
    >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    >>> model, guide = build("vae", x_dim=4, z_dim=2, hidden=(8,))
    >>> x = torch.bernoulli(torch.full((6, 4), 0.5))
    >>> sync = RankSync(setup())
    >>> loss = sync.step(pyro.infer.Trace_ELBO(), pyro.optim.Adam({"lr": 1e-2}), model,
    ...                  guide, x, {}, share=1.0, use_differentiable_loss=False)
    >>> isinstance(loss, float), len(sync.names)  # the parameters every rank steps
    (True, 8)
    >>> dist.destroy_process_group()
    """

    def __init__(self, context: DistributedContext) -> None:
        self.context = context
        self.names: list[str] | None = None

    def broadcast_params(self, names: Iterable[str]) -> None:
        """Start every rank from rank 0's parameters."""
        store = pyro.get_param_store()
        broadcast_([store._params[name] for name in sorted(names) if name in store._params],
                   self.context)

    def step(self, elbo, optim, model, guide, x, kwargs: dict, share: float,
             use_differentiable_loss: bool) -> float:
        store = pyro.get_param_store()
        loss = 0.0
        with poutine.trace(param_only=True) as capture:
            if share > 0:
                if hasattr(elbo, "differentiable_loss"):
                    value = elbo.differentiable_loss(model, guide, x, **kwargs)
                    if value.requires_grad:
                        value.backward()
                    loss = float(value.detach())
                elif use_differentiable_loss:
                    raise TypeError(f"{type(elbo).__name__} has no differentiable_loss")
                else:
                    loss = float(elbo.loss_and_grads(model, guide, x, **kwargs))
        if share > 0 or self.names is None:
            self._agree_on(sorted(capture.trace.nodes))
        params = [store._params[name] for name in self.names]
        self._sum_weighted_grads(params, share)
        optim({p for p in params if p.grad is not None})
        pyro.infer.util.zero_grads(set(params))
        all_reduce_mean_(_estimator_buffers(elbo), self.context)
        return sum_scalar(share * loss, self.context)

    def mean_of(self, values: dict[str, float] | None) -> dict[str, float] | None:
        """The ranks' mean of each reported diagnostic, so every rank records the same."""
        if not values:
            return values
        keys = sorted(values)
        tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        all_reduce_mean_([tensor], self.context)
        return dict(zip(keys, tensor.tolist(), strict=True))

    def _agree_on(self, names: list[str]) -> None:
        """Check, in one small collective, that every rank steps the same parameters (the
        collectives below lay them out by name)."""
        code = float(zlib.crc32("\0".join(names).encode()))
        probe = _to_backend(torch.tensor([code, -code], dtype=torch.float64), self.context)
        dist.all_reduce(probe, op=dist.ReduceOp.MAX)
        if probe[0].item() != code or probe[1].item() != -code:
            raise RuntimeError(
                f"rank {self.context.rank} steps the parameters {names}, and another rank "
                "steps others: every rank must run the same model and guide"
            )
        self.names = names

    def _sum_weighted_grads(self, params: list[torch.Tensor], share: float) -> None:
        """Sum ``share * grad`` over the ranks; a parameter no rank has a gradient for
        keeps ``grad = None`` (an optimizer then leaves it alone, as in one process)."""
        if not params:
            return
        has_grad = torch.tensor([float(p.grad is not None) for p in params],
                                dtype=torch.float64)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            elif share != 1.0:
                p.grad.mul_(share)
        grads = [p.grad for p in params]
        all_reduce_sum_([*grads, has_grad], self.context)
        for p, seen in zip(params, has_grad.tolist(), strict=True):
            if seen == 0:
                p.grad = None


def _estimator_buffers(elbo) -> list[torch.Tensor]:
    """Floating buffers of the estimator's modules (NVIL's running moments), in a fixed
    order."""
    modules = [elbo] if isinstance(elbo, torch.nn.Module) else [
        value for _, value in sorted(vars(elbo).items()) if isinstance(value, torch.nn.Module)]
    return [b for module in modules for _, b in sorted(module.named_buffers())
            if b.is_floating_point()]
