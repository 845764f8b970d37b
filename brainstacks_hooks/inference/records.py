"""What a :class:`~brainstacks_hooks.inference.store.StackStore` reports and how large its default budget is."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from ..stacks.modes import Mode

__all__ = ["ActivationReport", "StackBudgetError", "StackEntry", "StoreStats", "default_budget_bytes"]


def default_budget_bytes(device: torch.device | str) -> int:
    """The store's default device budget: half the free memory of a CUDA device, a quarter of available RAM.

    Measured when called (create the store after loading the model). RAM is read from ``/proc/meminfo``
    (``MemAvailable``), falling back to ``os.sysconf``; 4 GiB when neither is readable.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024 // 4
    except (OSError, KeyError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (AttributeError, OSError, ValueError):
        return 4 << 30


class StackBudgetError(ConfigError):
    """A single route needs more bytes than the store's device budget allows."""


@dataclass(frozen=True)
class StackEntry:
    """One stack file listed in the ``brainstacks.json`` index.

    Attributes:
        name: ``"<domain>/r<round>"``, unique in the index; routes and reports use it, never positions.
        domain: domain the stack belongs to.
        round_index: inner-loop round.
        path: absolute path of the safetensors file.
        sha256: checksum recorded in the index (verified on first load).
        dtype: parameter dtype.
        nbytes: parameter bytes once loaded (what budgets count).
        position: position in the index: stacks are attached in this order, as :meth:`BrainStacks.load`
            does, so a route computes bit-identically to a full load.
    """

    name: str
    domain: str
    round_index: int
    path: Path
    sha256: str
    dtype: torch.dtype
    nbytes: int
    position: int


@dataclass
class StoreStats:
    """Counters of a :class:`StackStore` (per stack, not per route).

    Attributes:
        hits: stacks a route found already on the device tier.
        host_hits: stacks promoted from the host tier (no disk read).
        misses: stacks read from disk.
        bytes_read: file bytes read from disk (each file counted once per load).
        load_ms: wall time spent reading, verifying and building stacks from disk (prefetches included).
        verified: checksum verifications done (first load of a file, or after the file changed).
        evictions: stacks evicted from the device tier.
        host_evictions: stacks dropped from the host tier.
        prefetched: stacks loaded by :meth:`StackStore.prefetch`.
        resident_bytes: parameter bytes on the device tier now (not reset by ``reset_stats``).
        host_bytes: parameter bytes on the host tier now (not reset by ``reset_stats``).
    """

    hits: int = 0
    host_hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    load_ms: float = 0.0
    verified: int = 0
    evictions: int = 0
    host_evictions: int = 0
    prefetched: int = 0
    resident_bytes: int = 0
    host_bytes: int = 0


@dataclass(frozen=True)
class ActivationReport:
    """What one :meth:`StackStore.activate` call did.

    Attributes:
        weights: the positive weights applied, by domain.
        mode: ``Mode.routed(weights)``; set on the ``BrainStacks`` unless ``set_mode=False``.
        attached: names of the stacks attached now, in index order.
        hits: names found on the device tier.
        host_hits: names promoted from the host tier.
        loaded: names read from disk.
        evicted: names evicted from the device tier to make room.
        bytes_read: file bytes read from disk by this call.
        load_ms: wall time of this call's disk loads.
    """

    weights: dict[str, float]
    mode: Mode
    attached: tuple[str, ...]
    hits: tuple[str, ...] = ()
    host_hits: tuple[str, ...] = ()
    loaded: tuple[str, ...] = ()
    evicted: tuple[str, ...] = ()
    bytes_read: int = 0
    load_ms: float = 0.0
