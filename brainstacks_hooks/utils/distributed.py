"""Several processes (``torchrun``, ``accelerate launch``): who writes, who waits, how decisions stay identical.

Every function is a no-op (or the single-process answer) when ``torch.distributed`` is not initialised, so
library code calls them unconditionally. The collective ones (:func:`barrier`, :func:`broadcast_object`,
:func:`all_gather_object`, :func:`on_main_process`) must be called by every process, in the same order.

The SFT recipe uses them so that the main process alone writes the run directory, the others wait and then
read the same state, and every decision that depends on a measured number is taken on numbers that are the
same on every process (see :mod:`brainstacks_hooks.training.outer_loop`). The router pipeline's passes over
examples (features, oracle, loss table) split their batches with :func:`map_sharded` (see
:mod:`brainstacks_hooks.router.pipeline`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch.distributed as dist

from .logging import get_logger

logger = get_logger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: How long a process waits at a collective (e.g. for the main process to prepare the data) before it fails.
TIMEOUT = timedelta(hours=2)


def is_initialized() -> bool:
    """``torch.distributed`` is available and its default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    return dist.get_rank() if is_initialized() else 0


def is_main_process() -> bool:
    """This process is rank 0 (always true when not distributed): the one that writes files and logs."""
    return rank() == 0


def launched_distributed() -> bool:
    """This process was started by a launcher (``torchrun``, ``accelerate launch``) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ


def init_distributed(cpu: bool = False) -> bool:
    """Initialise the process group when :func:`launched_distributed` and it is not initialised yet.

    Goes through accelerate's ``PartialState``, as the HF ``Trainer`` does (``gloo`` with ``cpu`` or without a
    GPU, else ``nccl`` with this process's GPU as the current device), so the Trainer later joins the same group.
    Call it before loading the model, so a quantized model is placed on this process's GPU. Returns whether
    the process group is initialised.
    """
    if is_initialized() or not launched_distributed():
        return is_initialized()
    from accelerate import PartialState

    state = PartialState(cpu=cpu, timeout=TIMEOUT)
    logger.info("process %d of %d (%s, %s)", state.process_index, state.num_processes, state.backend, state.device)
    return is_initialized()


def barrier() -> None:
    """Wait until every process gets here."""
    if is_initialized():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` of process ``src`` on every process (any picklable object)."""
    if not is_initialized():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """``[obj of process 0, obj of process 1, ...]`` on every process."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _describe(error: BaseException) -> tuple[str, str]:
    """What the other processes need to raise ``error`` again: its class name and its message (plain strings)."""
    return type(error).__name__, str(error)


def _rebuild(name: str, message: str) -> BaseException:
    """The project's error class of that name with ``message`` (a ``RuntimeError`` naming it for any other class)."""
    from .. import errors

    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, errors.BrainstacksError):
        return cls(message)
    return RuntimeError(f"{name}: {message}")


def on_main_process(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Call ``fn`` on the main process only while the others wait; returns its result there, ``None`` elsewhere.

    An exception of ``fn`` is raised on every process (the others get it from the main one), so no process
    waits forever for a main process that failed.
    """
    if not is_initialized():
        return fn(*args, **kwargs)
    result, error = None, None
    if is_main_process():
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            error = e
    shared = broadcast_object(_describe(error) if error is not None else None)
    if error is not None:
        raise error
    if shared is not None:
        raise _rebuild(*shared)
    return result


def computed_on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` computed by the main process alone, its result on every process (collective;
    ``fn`` must not call collectives; the result is pickled). Not distributed: just ``fn(*args, **kwargs)``."""
    return broadcast_object(on_main_process(fn, *args, **kwargs))


def shard_of(items: Sequence[T]) -> Sequence[T]:
    """The items this process computes in :func:`map_sharded`: ``items[rank::world_size]`` (all of them when not
    distributed)."""
    return items[rank() :: world_size()] if is_initialized() else items


def map_sharded(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(x) for x in items]`` computed by the processes together, on every process (collective).

    Process ``r`` computes ``items[r]``, ``items[r + world_size]``, ... (:func:`shard_of`), in order; the results
    are gathered and put back in the order of ``items``, so every process gets the list one process computing
    every item would get. ``fn`` must not call collectives itself, and its results should be CPU objects (they
    are pickled; a CUDA tensor would come back on the GPU of the process that computed it). An exception of
    ``fn`` on any process is raised on every process (after every process finished its share), so none waits
    forever. Not distributed: exactly ``[fn(x) for x in items]``.
    """
    if not is_initialized():
        return [fn(x) for x in items]
    n = world_size()
    mine: list[R] = []
    error: BaseException | None = None
    try:
        mine = [fn(x) for x in shard_of(items)]
    except Exception as e:
        error = e
    parts = all_gather_object((mine, _describe(error) if error is not None else None))
    if error is not None:
        raise error
    for _, theirs in parts:
        if theirs is not None:
            raise _rebuild(*theirs)
    return [parts[i % n][0][i // n] for i in range(len(items))]  # item i was process i % n's (i // n)-th


__all__ = [
    "TIMEOUT",
    "all_gather_object",
    "barrier",
    "broadcast_object",
    "computed_on_main",
    "init_distributed",
    "is_initialized",
    "is_main_process",
    "launched_distributed",
    "map_sharded",
    "on_main_process",
    "rank",
    "shard_of",
    "world_size",
]
