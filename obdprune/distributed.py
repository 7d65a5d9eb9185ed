"""Running under torchrun: one process per rank, DistributedDataParallel, and what every rank must agree on.

``torchrun --nproc-per-node N -m obdprune prune ...`` (or a script that calls :func:`obdprune.prune`) runs
the same program on N ranks. What makes their results one result:

- **Data.** In-memory training data is sharded per step: every rank draws the same seeded permutation of
  each epoch and takes every N-th sample of each global batch (:class:`ShardedBatches`), so ``batch_size``
  is the global batch and N ranks see exactly the samples one process would. Each rank scales its summed
  loss by N / (samples in the global batch); DDP's gradient average is then the global batch mean.
  Evaluation and curvature samples are split the same way.
- **Sums.** Curvature estimates (means over samples) and evaluation counts are all-reduced with their
  sample counts (:func:`all_reduce_sums`, :func:`all_reduce_mean`), so every rank holds the estimate on
  the union of the samples and takes the same branch.
- **Masks.** Every rank selects from identical parameters and identical saliency; the masks are then
  verified by a hash all-gather every round (:func:`check_same_masks`): a mismatch is an error.
- **Files.** Rank 0 writes; the others write nothing and wait at a barrier (:func:`barrier`).
- **Failures.** A rank that fails records the reason in the rendezvous store; a watchdog thread on every
  rank sees it within a second and ends its process with exit code 1, wherever that process is waiting.
  A rank that dies closes its sockets, which fails the others' collectives at once; a rank that hangs is
  caught by the collective timeout (``OBDPRUNE_DIST_TIMEOUT`` seconds, default 300).

Outside torchrun nothing here does anything: :func:`current` is the one-process world.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from obdprune.batches import Batches, TensorBatches
from obdprune.errors import ObdpruneError, UsageError

__all__ = ["World", "current", "launched", "process_group", "ShardedBatches", "shard", "all_reduce_sums",
           "all_reduce_mean", "broadcast_object", "sync_module", "check_same_masks", "mask_digest", "barrier",
           "wrap", "unwrap", "RankMismatch", "sync_seconds", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = 300.0
ABORT_KEY = "obdprune/abort"
_SYNC_SECONDS: dict[str, float] = {}


class RankMismatch(ObdpruneError):
    """Ranks of one distributed run disagree on something they must share (masks, sizes)."""


@dataclass(frozen=True)
class World:
    """This process's place in a run: ``rank`` of ``size`` (``local_rank`` on its machine), and the backend."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def writer(self) -> bool:
        """Rank 0 writes every file."""
        return self.rank == 0

    def device(self, name: str | torch.device) -> torch.device:
        """``cuda`` means this rank's own GPU (``cuda:LOCAL_RANK``) under torchrun."""
        device = torch.device(name)
        if device.type == "cuda" and device.index is None and self.distributed:
            return torch.device("cuda", self.local_rank)
        return device

    def to_dict(self, batch_size: int | None = None) -> dict:
        """What a manifest records: world size, backend and (given the batch size) the global batch size."""
        d: dict[str, Any] = {"world_size": self.size, "backend": self.backend}
        if batch_size is not None:
            d["global_batch_size"] = batch_size
        return d


def launched() -> bool:
    """True when torchrun (or an equivalent launcher) started this process as one rank of several."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and "RANK" in os.environ


def current() -> World:
    """The initialized process group's world, or the one-process world."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return World()
    dist = torch.distributed
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0") or 0),
                 str(dist.get_backend()))


def _timeout() -> float:
    text = os.environ.get("OBDPRUNE_DIST_TIMEOUT", "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        raise UsageError(f"OBDPRUNE_DIST_TIMEOUT must be a number of seconds, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise UsageError(f"OBDPRUNE_DIST_TIMEOUT must be a positive number of seconds, got {text!r}")
    return value


@contextlib.contextmanager
def process_group(device: str | torch.device = "cpu", *, backend: str | None = None,
                  timeout: float | None = None) -> Iterator[World]:
    """Join the run torchrun started (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` in the
    environment) for the duration of the block; yields the :class:`World`.

    backend: ``gloo`` for CPU, ``nccl`` for CUDA (the default follows ``device``). timeout: seconds any
    collective may wait (default ``OBDPRUNE_DIST_TIMEOUT`` or 300). An exception leaving the block is
    announced to the other ranks, whose watchdogs then stop them with exit code 1.

    Example::

        with process_group("cpu") as world:       # under torchrun --nproc-per-node 2
            result = obdprune.prune(model, (x, y), (xv, yv), sparsity=0.9)
    """
    if not launched() or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        yield current()
        return
    if not torch.distributed.is_available():
        raise UsageError("this torch build has no torch.distributed; install a torch with distributed support")
    device = torch.device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0") or 0))
    seconds = _timeout() if timeout is None else float(timeout)
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    world = current()
    stop = threading.Event()
    watchdog = threading.Thread(target=_watch, args=(world, stop), name="obdprune-watchdog", daemon=True)
    watchdog.start()
    try:
        yield world
    except BaseException as e:
        stop.set()
        _announce(world, e)
        raise
    else:
        stop.set()
    finally:
        watchdog.join(timeout=5)
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()


def _store():
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def _announce(world: World, e: BaseException) -> None:
    """Tell the other ranks this one is stopping (best effort: the store may be gone with rank 0)."""
    text = str(e) or type(e).__name__
    with contextlib.suppress(Exception):
        _store().set(ABORT_KEY, f"rank {world.rank}: {text}")


def _watch(world: World, stop: threading.Event) -> None:
    """Every 0.5 s: has another rank announced a failure, or has the store (rank 0) gone? Then exit(1)."""
    try:
        store = _store()
    except Exception:
        return
    while not stop.wait(0.5):
        try:
            failed = store.check([ABORT_KEY])
            reason = store.get(ABORT_KEY).decode(errors="replace") if failed else ""
        except Exception as e:  # the store lives in rank 0: it is gone
            if stop.is_set():
                return
            failed, reason = True, f"lost contact with rank 0 ({type(e).__name__})"
        if failed and not stop.is_set():
            print(f"obdprune: error: rank {world.rank} stops because {reason}", file=sys.stderr, flush=True)
            os._exit(1)


# ---------------------------------------------------------------------------------------------- data


class ShardedBatches(Batches):
    """This rank's share of in-memory data: every rank draws the same seeded permutations and keeps every
    ``size``-th sample of each global batch (training), its contiguous slice (evaluation), or every
    ``size``-th sample of a drawn sample (curvature). ``len()`` is the global sample count.

    >>> full = TensorBatches(torch.arange(10.0).view(10, 1), torch.zeros(10, dtype=torch.long))
    >>> [x.view(-1).tolist() for x, _ in ShardedBatches(full, World(1, 2)).eval_batches(3)]
    [[5.0, 6.0, 7.0], [8.0, 9.0]]
    """

    def __init__(self, full: TensorBatches, world: World):
        self.full, self.world = full, world

    def __len__(self) -> int:
        return len(self.full)

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.full.steps_per_epoch(batch_size)

    def global_batch_sizes(self, batch_size: int) -> list[int]:
        n = len(self.full)
        return [min(batch_size, n - s * batch_size) for s in range(self.steps_per_epoch(batch_size))]

    def _take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.full.x[idx], self.full.y[idx]

    def epoch(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(len(self), generator=generator)
        for step in range(self.steps_per_epoch(batch_size)):
            yield self._take(perm[step * batch_size:(step + 1) * batch_size][self.world.rank::self.world.size])

    def eval_batches(self, batch_size: int = 1000) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, r, w = len(self), self.world.rank, self.world.size
        lo, hi = n * r // w, n * (r + 1) // w
        for i in range(lo, hi, batch_size):
            yield self.full.x[i:min(i + batch_size, hi)], self.full.y[i:min(i + batch_size, hi)]

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randperm(len(self), generator=generator)[:n]
        return self._take(idx[self.world.rank::self.world.size])

    def example(self) -> torch.Tensor:
        return self.full.example()


def shard(batches: Batches, world: World) -> Batches:
    """In-memory batches as this rank's :class:`ShardedBatches`; a user's loader as it is (shard it with
    ``torch.utils.data.DistributedSampler``)."""
    if world.distributed and isinstance(batches, TensorBatches):
        return ShardedBatches(batches, world)
    return batches


# ---------------------------------------------------------------------------------------------- collectives


@contextlib.contextmanager
def _timed(label: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _SYNC_SECONDS[label] = _SYNC_SECONDS.get(label, 0.0) + time.perf_counter() - t0


def sync_seconds(label: str | None = None) -> float | dict[str, float]:
    """Seconds this process spent in collectives (waiting for slower ranks included), by label."""
    return dict(_SYNC_SECONDS) if label is None else _SYNC_SECONDS.get(label, 0.0)


def _comm_device(world: World) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if world.backend == "nccl" else torch.device("cpu")


def all_reduce_sums(world: World, values: list[float], label: str = "other") -> list[float]:
    """Element-wise sums over ranks of ``values`` (float64: integer counts stay exact below 2**53).

    >>> all_reduce_sums(World(), [3.0, 4])
    [3.0, 4.0]
    """
    if not world.distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device(world))
    with _timed(label):
        torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def all_reduce_mean(world: World, means: Mapping[str, torch.Tensor], count: int,
                    label: str = "curvature") -> dict[str, torch.Tensor]:
    """The mean over all ranks' samples of per-rank means ``means`` over ``count`` samples each:
    Σ_r count_r·mean_r / Σ_r count_r, one all-reduce of a flat buffer. A rank with ``count == 0`` adds
    nothing (its ``means`` only give the shapes). Tensors keep their shapes, dtypes and devices.
    """
    if not world.distributed:
        return dict(means)
    names = list(means)
    dtype = torch.float64 if any(means[n].dtype == torch.float64 for n in names) else torch.float32
    dev = _comm_device(world)
    flat = torch.cat([means[n].detach().reshape(-1).to(dev, dtype) * count for n in names]
                     + [torch.tensor([float(count)], dtype=dtype, device=dev)])
    with _timed(label):
        torch.distributed.all_reduce(flat)
    total = float(flat[-1])
    if total <= 0:
        raise ObdpruneError("no rank had a sample for the curvature estimate; use more samples than ranks")
    out, at = {}, 0
    for n in names:
        m = means[n]
        out[n] = (flat[at:at + m.numel()] / total).view_as(m).to(m.device, m.dtype)
        at += m.numel()
    return out


def broadcast_object(world: World, obj: Any, label: str = "other") -> Any:
    """Rank 0's ``obj`` on every rank (pickled in memory by torch; never written to a file)."""
    if not world.distributed:
        return obj
    box = [obj if world.writer else None]
    with _timed(label):
        torch.distributed.broadcast_object_list(box, src=0, device=_comm_device(world) if world.backend == "nccl"
                                                else None)
    return box[0]


@torch.no_grad()
def sync_module(world: World, model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers into ``model`` on every rank (as DDP does when it wraps)."""
    if not world.distributed:
        return
    with _timed("other"):
        for t in [*model.parameters(), *model.buffers()]:
            torch.distributed.broadcast(t.data, src=0)


def barrier(world: World) -> None:
    """Wait until every rank gets here (bounded by the collective timeout)."""
    if world.distributed:
        with _timed("barrier"):
            torch.distributed.barrier()


def mask_digest(masks: Any) -> str:
    """SHA-256 over the masks' names, shapes and bits, in name order.

    >>> from obdprune.masking import MaskSet
    >>> a, b = MaskSet({"w": torch.tensor([True, False])}), MaskSet({"w": torch.tensor([False, True])})
    >>> mask_digest(a) == mask_digest(MaskSet({"w": torch.tensor([True, False])})), mask_digest(a) == mask_digest(b)
    (True, False)
    """
    h = hashlib.sha256()
    for name in sorted(masks):
        m = masks[name].detach().cpu().to(torch.uint8).contiguous()
        h.update(f"{name}:{tuple(m.shape)}:".encode())
        h.update(m.numpy().tobytes())
    return h.hexdigest()


def check_same_masks(world: World, masks: Any, what: str) -> str:
    """All-gather every rank's :func:`mask_digest` and raise :class:`RankMismatch` unless they are equal;
    returns the digest."""
    digest = mask_digest(masks)
    if world.distributed:
        digests: list[Any] = [None] * world.size
        with _timed("masks"):
            torch.distributed.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            ranks = ", ".join(f"rank {r}: {d[:12]}" for r, d in enumerate(digests))
            raise RankMismatch(f"{what}: the ranks chose different masks ({ranks}); the ranks' parameters or "
                               f"data differ, which obdprune does not support")
    return digest


# ---------------------------------------------------------------------------------------------- DDP


def wrap(model: nn.Module, world: World) -> nn.Module:
    """``model`` in DistributedDataParallel (rank 0's weights copied to every rank), or ``model`` itself in
    one process. Wrap again after any change of the model's structure, and build the optimizer anew."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    p = next(model.parameters(), None)
    ids = [p.device.index] if p is not None and p.device.type == "cuda" else None
    with _timed("other"):
        return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper, or ``model`` itself."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model
