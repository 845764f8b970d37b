"""``StackStore``: disk-offloaded frozen stacks, loaded only when a route needs them (paper section 6.3).

The "Superposition LLM": every domain stack stays on disk (safetensors, written by
:meth:`BrainStacks.save`) until a route gives its domain a weight above zero. Then its header is checked
through ``safetensors.safe_open``, its data copied once from a memory map, its sha256 verified (first load),
and the stack is attached to the model with :meth:`BrainStacks.add_frozen`.
A domain gated off costs no load and no compute: its stacks are detached.

Example::

    stacks = BrainStacks.attach(model, StackConfig())          # hooks only, no stacks
    store = StackStore(stacks, "out/stacks", budget_bytes=2 << 30)
    report = store.activate({"chat": 0.8, "code": 0.4})        # loads chat + code, detaches the rest
    out = model.generate(**inputs)                             # routed(chat=0.8, code=0.4)
    store.activate({"chat": 1.0})                              # cache hit: nothing read from disk

Tiers and budgets (all byte counts are parameter bytes, :meth:`Stack.nbytes`):

* **device tier** (``budget_bytes``): stacks resident on the compute device, in LRU order. The stacks of
  the current route are always resident; other recently used stacks stay cached while they fit, so a
  repeated route reads nothing. When a route needs room, least recently used stacks are evicted first.
  The tier never holds more than ``budget_bytes``; a single route needing more raises
  :class:`StackBudgetError` before anything changes.
* **host tier** (``host_budget_bytes``, default 0 = off): stacks evicted from the device tier are kept as
  (pinned, on CUDA) CPU copies, so a later route promotes them with a host-to-device copy instead of a
  disk read. On a CPU-only machine the compute device *is* host RAM, so the second tier adds nothing
  that a larger ``budget_bytes`` would not give (it works, without copies, but is pointless).

The budget is bounded by default (``budget_bytes="auto"``, see :func:`default_budget_bytes`: half the free
memory of a CUDA device when the store is created, a quarter of the available RAM on the CPU) and covers
everything the store makes the hooks hold on the device: with ``StackConfig.group_frozen`` the hooks compute
a route from resident slots holding a copy of each stack in the grouped layout (``BrainStacks`` pools, see
:mod:`~brainstacks_hooks.stacks.frozen_pool`); a cached stack keeps its slot while it stays on the device tier,
so a switch between cached routes copies nothing. The store sets the pools' capacity to the number of stacks
the budget can hold with their slots and reserves those slots' bytes, so a stack costs about twice its bytes
(once with ``group_frozen=False``). With ``StackConfig.offload_frozen`` the stacks
and their pools stay in host RAM and nothing is held on the accelerator. ``budget_bytes=None`` is
unlimited (nothing is evicted).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, FingerprintMismatch, StackLoadError, StackStateError
from ..stacks.brainstacks import BrainStacks
from ..stacks.modes import Mode
from ..stacks.serialization import (
    PARAM_NAMES,
    check_config_compatible,
    check_fingerprint,
    read_stack_index,
    read_stack_metadata,
)
from ..stacks.stack import Stack
from ..utils.dtypes import SAFETENSORS_CODES
from ..utils.logging import get_logger
from .records import ActivationReport, StackBudgetError, StackEntry, StoreStats, default_budget_bytes

logger = get_logger(__name__)


#: Meta-device Stack skeletons by (config, shapes, dtype), cloned for every load (they hold no memory).
_TEMPLATES: dict[tuple[str, tuple[tuple[str, tuple[int, int]], ...], torch.dtype], Stack] = {}


@dataclass
class _Cached:
    """A loaded stack and the flat buffer its parameters are views of."""

    entry: StackEntry
    stack: Stack
    buf: torch.Tensor  # uint8 [data bytes]: the file's data section
    items: list[tuple[str, tuple[int, ...], int, int]]  # key, shape, byte offset in buf, bytes


@dataclass
class _Read:
    """Result of reading one file (possibly in a prefetch thread): a flat buffer and bookkeeping."""

    entry: StackEntry
    buf: torch.Tensor
    items: list[tuple[str, tuple[int, ...], int, int]]
    file_bytes: int
    ms: float
    signature: tuple[int, int, int]
    verified: bool
    event: Any = None  # torch.cuda.Event when the buffer was copied on the side stream
    for_device: bool = True


@dataclass
class _Layout:
    """The tensors a stack file must hold (stable key -> shape) and their total bytes."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    nbytes: int = 0
    group_nbytes: int = 0  # what the stack's slot in the hooks' grouped pools holds (A, router, B)


def _file_signature(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _clone_module(module: nn.Module) -> nn.Module:
    """Structural copy of a parameter-free-to-be module tree: new objects, new containers, shared leaves.

    Every dict, set and list attribute (``_parameters``, ``_modules``, hook dicts, ``keys`` ...) is copied
    shallowly and sub-modules are cloned recursively; parameters still point at the template's (meta)
    tensors and must be rebound. About 30x cheaper than ``copy.deepcopy`` for a 210-module stack.
    """
    clone = module.__class__.__new__(module.__class__)
    state = {k: (v.copy() if isinstance(v, (dict, set, list)) else v) for k, v in module.__dict__.items()}
    state["_modules"] = {k: (_clone_module(m) if m is not None else None) for k, m in module._modules.items()}
    clone.__dict__.update(state)
    return clone


def _sha256_mapped(mm: mmap.mmap) -> str:
    return hashlib.sha256(mm).hexdigest()  # releases the GIL: runs alongside the tensor copies


class StackStore:
    """Frozen stacks on disk, attached on demand by name, with an LRU device cache and a host tier.

    Args:
        stacks: the model's :class:`BrainStacks` (from :meth:`BrainStacks.attach`; its frozen stacks, if
            any, must not belong to the index's domains).
        directory: a directory written by :meth:`BrainStacks.save` (``brainstacks.json`` + stack files).
            The index is read once here; calls never rescan the directory.
        budget_bytes: device budget in parameter bytes, stacks plus their slots in the hooks' grouped pools
            (``"auto"``, the default: :func:`default_budget_bytes`; ``None``: unlimited, nothing evicted).
        host_budget_bytes: host-tier budget (``0``: no host tier, ``None``: unlimited). Pointless on a
            CPU-only machine (see the module docstring).
        device: where stacks are computed; default: the model's device (CPU when the model spans
            several devices or ``StackConfig.offload_frozen`` is set).
        allow_fingerprint_mismatch: load stacks saved on a base whose config hash differs (shapes must
            still match), with a warning.

    The index's ``domain_order`` becomes ``stacks.domain_order`` so prefix semantics keep training order.

    Raises:
        StackLoadError: the index is missing or malformed, or its config is incompatible.
        FingerprintMismatch: the stacks were trained on another base model.
        StackStateError: ``stacks`` already holds frozen stacks of the index's domains.

    Not thread-safe: call it from one thread (prefetches run in a worker it owns). Create the store
    after the model is on its final device: stacks are placed on ``device`` when they are loaded.
    """

    def __init__(self, stacks: BrainStacks, directory: str | os.PathLike, budget_bytes: int | str | None = "auto",
                 host_budget_bytes: int | None = 0, device: torch.device | str | None = None,
                 allow_fingerprint_mismatch: bool = False) -> None:
        if isinstance(budget_bytes, str) and budget_bytes != "auto":
            raise ConfigError(f"budget_bytes must be a byte count, 'auto' or None (got {budget_bytes!r})")
        for label, value in (("budget_bytes", budget_bytes), ("host_budget_bytes", host_budget_bytes)):
            if isinstance(value, int) and value < 0:
                raise ConfigError(f"{label} must be >= 0 or None (got {value})")
        self.stacks = stacks
        self.directory = Path(directory)
        self.host_budget_bytes = host_budget_bytes
        self.allow_fingerprint_mismatch = allow_fingerprint_mismatch
        self.device = torch.device(device) if device is not None else self._default_device()
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device} requested but CUDA is not available")
        self._budget_bytes: int | None = default_budget_bytes(self.device) if budget_bytes == "auto" else budget_bytes
        # the hooks' pool slots live on the compute device unless frozen stacks are offloaded
        self._grouped = stacks.config.group_frozen and not stacks.config.offload_frozen
        self._cuda = self.device.type == "cuda"
        if self.host_budget_bytes != 0 and self.device.type == "cpu":
            logger.info("host tier on a CPU device: stacks evicted from the device tier stay in the same RAM "
                        "(a larger budget_bytes is equivalent)")
        self._layouts: dict[torch.dtype, _Layout] = {}
        self.entries: dict[str, StackEntry] = {}
        self.domain_order: list[str] = []
        self._by_domain: dict[str, list[StackEntry]] = {}
        self._read_index()
        clash = sorted({s.domain for s in stacks.frozen_stacks} & set(self._by_domain))
        if clash:
            raise StackStateError(f"stacks already holds frozen stacks of store domains {clash}; "
                                  "attach the store to a BrainStacks without them")
        stacks.set_domain_order(self.domain_order)
        self._device_tier: OrderedDict[str, _Cached] = OrderedDict()  # least recently used first
        self._host_tier: OrderedDict[str, _Cached] = OrderedDict()
        self._attached: list[str] = []
        self._verified: dict[str, tuple[int, int, int]] = {}
        self._pending: dict[str, tuple[Future[_Read], int]] = {}  # name -> (read, device bytes reserved)
        self._pending_bytes = 0
        self._pool_reserved = 0  # bytes of the hooks' pool slots, counted in the budget
        self.pool_slots: int | None = None  # stacks the pools hold at most (None: unbounded)
        self._plan_pool()
        self._hash_pool: ThreadPoolExecutor | None = None
        self._prefetch_pool: ThreadPoolExecutor | None = None
        self._side_stream: Any = None
        self._stats = StoreStats()
        logger.info("stack store %s: %d stacks of %d domains, device %s, budget %s, host budget %s",
                    self.directory, len(self.entries), len(self._by_domain), self.device,
                    budget_bytes, host_budget_bytes)

    # ------------------------------------------------------------------ budget
    @property
    def budget_bytes(self) -> int | None:
        """The device budget in bytes (``None``: unlimited). Setting it re-plans the pools' slots; a smaller
        budget takes effect (evictions) at the next :meth:`activate`."""
        return self._budget_bytes

    @budget_bytes.setter
    def budget_bytes(self, value: int | None) -> None:
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ConfigError(f"budget_bytes must be a byte count >= 0 or None (got {value!r})")
        self._budget_bytes = value
        self._plan_pool()

    def _plan_pool(self) -> None:
        """Pool capacity: as many stacks as the budget holds with their slots (reserved, counted in the budget)."""
        self.pool_slots, self._pool_reserved = None, 0
        if self._grouped and self._budget_bytes is not None and self.entries:
            # one slot table per storage dtype, each up to pool_slots: a slot is reserved for every dtype in the
            # index (exact for the usual single-dtype index, conservative for a mixed one)
            slot = sum(self._layout(d).group_nbytes for d in {e.dtype for e in self.entries.values()})
            cost = max(e.nbytes for e in self.entries.values()) + slot
            self.pool_slots = min(len(self.entries), self._budget_bytes // cost)
            self._pool_reserved = self.pool_slots * slot
        if self._grouped:
            self.stacks.pool_capacity = self.pool_slots

    # ------------------------------------------------------------------ index
    def _default_device(self) -> torch.device:
        if self.stacks.config.offload_frozen:
            return torch.device("cpu")
        devices = {self.stacks.device_of(k) for k in self.stacks.keys}
        return devices.pop() if len(devices) == 1 else torch.device("cpu")

    def _read_index(self) -> None:
        index = read_stack_index(self.directory)
        check_config_compatible(index.config, self.stacks.config, str(index.path))
        check_fingerprint(index.fingerprint, self.stacks.fingerprint, str(index.path), self.allow_fingerprint_mismatch)
        root = self.directory.absolute()
        for e in index.entries:
            name = f"{e.domain}/r{e.round_index}"
            entry = StackEntry(name, e.domain, e.round_index, root / e.file, e.sha256, e.dtype,
                               self._layout(e.dtype).nbytes, e.position)
            self.entries[name] = entry
            self._by_domain.setdefault(e.domain, []).append(entry)
        for entries in self._by_domain.values():
            entries.sort(key=lambda e: e.position)
        self.domain_order = index.domain_order + [d for d in self._by_domain if d not in index.domain_order]

    def _layout(self, dtype: torch.dtype) -> _Layout:
        layout = self._layouts.get(dtype)
        if layout is None:
            cfg, elem = self.stacks.config, torch.empty((), dtype=dtype).element_size()
            E, r = cfg.num_experts, cfg.rank
            layout = _Layout()
            for key, (d_in, d_out) in self.stacks.shapes.items():
                shapes = {"A": (E, r, d_in), "B": (E, d_out, r), "router": (E, d_in), "noise": (E, d_in)}
                for name in PARAM_NAMES:
                    layout.shapes[f"{key}.{name}"] = shapes[name]
                    layout.nbytes += math.prod(shapes[name]) * elem
                    if name != "noise":  # a pool slot holds A, router and B
                        layout.group_nbytes += math.prod(shapes[name]) * elem
            self._layouts[dtype] = layout
        return layout

    # ------------------------------------------------------------------ public views
    @property
    def domains(self) -> list[str]:
        """Domains in the index, in training order."""
        return list(self.domain_order)

    def stacks_of(self, domain: str) -> list[StackEntry]:
        """Index entries of one domain, in index order."""
        if domain not in self._by_domain:
            raise ConfigError(f"unknown domain {domain!r}; the store holds {self.domain_order}")
        return list(self._by_domain[domain])

    @property
    def resident(self) -> list[str]:
        """Names on the device tier, least recently used first."""
        return list(self._device_tier)

    @property
    def host_resident(self) -> list[str]:
        """Names on the host tier, least recently used first."""
        return list(self._host_tier)

    @property
    def attached(self) -> list[str]:
        """Names attached to the model now, in index order."""
        return list(self._attached)

    def stats(self) -> StoreStats:
        """A copy of the counters, with the current resident and host bytes."""
        return replace(self._stats, resident_bytes=self._tier_bytes(self._device_tier),
                       host_bytes=self._tier_bytes(self._host_tier))

    def reset_stats(self) -> None:
        """Zero the counters (resident and host bytes always reflect the current state)."""
        self._stats = StoreStats()

    @staticmethod
    def _tier_bytes(tier: Mapping[str, _Cached]) -> int:
        return sum(c.entry.nbytes for c in tier.values())

    # ------------------------------------------------------------------ routing
    def _route(self, weights: Mapping[str, float]) -> tuple[dict[str, float], list[StackEntry]]:
        if not isinstance(weights, Mapping):
            raise ConfigError(f"weights must map domain names to floats, got {type(weights).__name__}")
        unknown = sorted(str(d) for d in weights if d not in self._by_domain)
        if unknown:
            raise ConfigError(f"route names unknown domains {unknown}; the store holds {self.domain_order}")
        positive: dict[str, float] = {}
        for d, w in weights.items():
            w = float(w)
            if not math.isfinite(w) or w < 0:
                raise ConfigError(f"routed weight of {d!r} must be finite and >= 0 (got {w})")
            if w > 0:
                positive[d] = w
        needed = sorted((e for d in positive for e in self._by_domain[d]), key=lambda e: e.position)
        return positive, needed

    def activate(self, weights: Mapping[str, float], set_mode: bool = True) -> ActivationReport:
        """Attach exactly the stacks of the domains with weight > 0, detach all others, set routed mode.

        Stacks found on the device tier cost nothing; others come from the host tier or from disk
        (checksum verified on the first load of each file). Least recently used stacks are evicted when
        the budget requires it. With ``set_mode`` (default) the ``BrainStacks`` is switched to
        ``Mode.routed(weights)``, so a plain ``model(...)``/``model.generate(...)`` uses the route;
        with ``set_mode=False`` only attachments change and the caller runs under
        ``stacks.using(report.mode)`` (or :meth:`routed`).

        A route with no positive weight detaches every store stack (the base model, plus any
        non-store stacks). In-flight prefetches are waited for first.

        Raises:
            ConfigError: unknown domain, negative or non-finite weight.
            StackBudgetError: the route needs more than ``budget_bytes`` (nothing changed).
            StackLoadError: a stack file is missing, corrupt or mismatched (named with its domain). No
                store stack is attached afterwards (with ``set_mode`` the mode becomes ``routed({})``, the
                base function: never a partial route), the cache keeps what it had, and other routes work.
        """
        positive, needed = self._route(weights)
        need_bytes = sum(e.nbytes for e in needed) + self._pool_reserved
        if self.budget_bytes is not None and (need_bytes > self.budget_bytes or (
                self.pool_slots is not None and len(needed) > self.pool_slots)):
            raise StackBudgetError(
                f"route {sorted(positive)} needs {len(needed)} stacks of {sum(e.nbytes for e in needed)} bytes"
                + (f" and their grouped copy of {self._group_bytes(needed)} bytes" if self._grouped else "")
                + f", more than the device budget of {self.budget_bytes} bytes; raise budget_bytes or route "
                "fewer domains")
        self._collect_prefetches(wait=True)
        keep = {e.name for e in needed}
        hits, host_hits, loaded, evicted = [], [], [], []
        bytes_before, ms_before = self._stats.bytes_read, self._stats.load_ms
        try:
            for e in needed:
                if e.name in self._device_tier:
                    self._device_tier.move_to_end(e.name)
                    hits.append(e.name)
                    continue
                from_host = self._host_tier.pop(e.name, None)  # taken first: making room cannot drop it
                evicted += self._make_room(e.nbytes, keep)
                if from_host is not None:
                    self._promote(from_host)
                    host_hits.append(e.name)
                else:
                    self._device_tier[e.name] = self._build(self._read(e, device_target=True))
                    self._stats.misses += 1
                    loaded.append(e.name)
        except StackLoadError:
            self._detach_all()
            if set_mode:
                self.stacks.set_mode(Mode.routed({}))
            raise
        self._stats.hits += len(hits)
        self._stats.host_hits += len(host_hits)
        self._attach([e.name for e in needed])
        mode = Mode.routed(positive)
        if set_mode:
            self.stacks.set_mode(mode)
        report = ActivationReport(dict(positive), mode, tuple(self._attached), tuple(hits), tuple(host_hits),
                                  tuple(loaded), tuple(evicted), self._stats.bytes_read - bytes_before,
                                  self._stats.load_ms - ms_before)
        logger.debug("activate %s: %d hit, %d host, %d loaded (%d B, %.1f ms), %d evicted", mode.describe(),
                     len(hits), len(host_hits), len(loaded), report.bytes_read, report.load_ms, len(evicted))
        return report

    @contextlib.contextmanager
    def routed(self, weights: Mapping[str, float]) -> Iterator[ActivationReport]:
        """Activate ``weights`` and run the block under ``stacks.routed(weights)`` (previous mode restored)."""
        report = self.activate(weights, set_mode=False)
        with self.stacks.using(report.mode):
            yield report

    def deactivate(self) -> None:
        """Detach every store stack (they stay cached). The mode is left as it is."""
        self._detach_all()

    def clear(self) -> None:
        """Detach everything and drop both tiers (files are re-verified only if they changed)."""
        self._collect_prefetches(wait=True)
        self._detach_all()
        for cached in self._device_tier.values():
            self.stacks.release_frozen(cached.stack)
        self._device_tier.clear()
        self._host_tier.clear()
        self.stacks.clear_group_cache()  # free the pools' memory too

    def close(self) -> None:
        """Wait for prefetches and stop the store's worker threads (the cache stays usable)."""
        self._collect_prefetches(wait=True)
        for pool in (self._hash_pool, self._prefetch_pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._hash_pool = self._prefetch_pool = None

    # ------------------------------------------------------------------ attachments
    def _attach(self, names: list[str]) -> None:
        if names == self._attached:
            return
        self._detach_all()
        for name in names:  # index order, as BrainStacks.load: bit-identical grouped compute
            self.stacks.add_frozen(self._device_tier[name].stack)
            self._attached.append(name)

    def _detach_all(self) -> None:
        for name in self._attached:
            cached = self._device_tier.get(name)
            if cached is not None:  # keeps its pool slot: attaching it again copies nothing
                self.stacks.remove_frozen(cached.stack, release=False)
        self._attached = []

    def _detach_one(self, name: str) -> None:
        if name in self._attached:
            self.stacks.remove_frozen(self._device_tier[name].stack, release=False)
            self._attached.remove(name)

    # ------------------------------------------------------------------ tiers
    def route_nbytes(self, weights: Mapping[str, float]) -> int:
        """Bytes a route needs on the device: its stacks plus their pool slots (the smallest budget that fits it)."""
        _, needed = self._route(weights)
        return sum(e.nbytes for e in needed) + self._group_bytes(needed)

    def _group_bytes(self, entries: list[StackEntry]) -> int:
        """Bytes of the pool slots of ``entries`` (0 when stacks are not grouped on the device)."""
        if not self._grouped or not entries:
            return 0
        return sum(self._layout(e.dtype).group_nbytes for e in entries)

    def device_bytes(self) -> int:
        """Bytes counted against the budget now: resident stacks, in-flight prefetches and the reserved pool slots."""
        return self._tier_bytes(self._device_tier) + self._pending_bytes + self._pool_reserved

    def _make_room(self, nbytes: int, keep: set[str]) -> list[str]:
        """Evict least recently used device stacks (never those in ``keep``) until ``nbytes`` fit."""
        if self.budget_bytes is None:
            return []
        evicted = []
        used = self.device_bytes()
        for name in list(self._device_tier):
            if used + nbytes <= self.budget_bytes:
                break
            if name in keep:
                continue
            used -= self._device_tier[name].entry.nbytes
            self._evict(name)
            evicted.append(name)
        if used + nbytes > self.budget_bytes:  # cannot happen: activate checks the route fits
            raise StackBudgetError(f"cannot fit {nbytes} bytes in the device budget of {self.budget_bytes}")
        return evicted

    def _evict(self, name: str) -> None:
        self._detach_one(name)
        cached = self._device_tier.pop(name)
        self.stacks.release_frozen(cached.stack)
        self._stats.evictions += 1
        if self.host_budget_bytes != 0:
            if self.host_budget_bytes is not None and cached.entry.nbytes > self.host_budget_bytes:
                return
            self._make_host_room(cached.entry.nbytes)
            if cached.buf.device.type != "cpu":
                host = torch.empty(cached.buf.numel(), dtype=torch.uint8, pin_memory=self._cuda)
                host.copy_(cached.buf)
                self._bind(cached.stack, cached.entry.dtype, host, cached.items)
                cached.buf = host
            self._host_tier[name] = cached
        logger.debug("evicted %s from the device tier%s", name, " to the host tier" if name in self._host_tier else "")

    def _make_host_room(self, nbytes: int) -> None:
        if self.host_budget_bytes is None:
            return
        used = self._tier_bytes(self._host_tier)
        while self._host_tier and used + nbytes > self.host_budget_bytes:
            _, dropped = self._host_tier.popitem(last=False)
            used -= dropped.entry.nbytes
            self._stats.host_evictions += 1

    def _promote(self, cached: _Cached) -> None:
        """Move a stack taken from the host tier onto the device tier (pinned, asynchronous copy on CUDA)."""
        if cached.buf.device != self.device:
            cached.buf = cached.buf.to(self.device, non_blocking=self._cuda)
            self._bind(cached.stack, cached.entry.dtype, cached.buf, cached.items)
        self._device_tier[cached.entry.name] = cached

    # ------------------------------------------------------------------ loading
    def _read(self, entry: StackEntry, device_target: bool, on_side_stream: bool = False) -> _Read:
        """Read and check one file into a flat buffer (on the device when ``device_target``).

        Safe to run in a worker thread: touches no store state except the read-only index and layouts.
        """
        t0 = time.perf_counter()
        where = f"stack {entry.name} (domain {entry.domain!r}, file {entry.path})"
        try:
            st = entry.path.stat()
            signature = _file_signature(st)
            verify = self._verified.get(entry.name) != signature
            buf, items = self._read_checked(entry, verify, pin=self._cuda, parallel_hash=not on_side_stream)
        except FingerprintMismatch as e:
            raise FingerprintMismatch(f"{where}: {e}") from e
        except StackLoadError as e:
            raise StackLoadError(f"{where}: {e}") from e
        except OSError as e:
            raise StackLoadError(f"{where}: cannot read the file ({e})") from e
        event = None
        if device_target and buf.device != self.device:
            if on_side_stream:
                with torch.cuda.stream(self._side_stream):
                    buf = buf.to(self.device, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(self._side_stream)
            else:
                buf = buf.to(self.device)
        return _Read(entry, buf, items, st.st_size, (time.perf_counter() - t0) * 1000.0, signature, verify, event,
                     device_target)

    def _read_checked(self, entry: StackEntry, verify: bool, pin: bool,
                      parallel_hash: bool) -> tuple[torch.Tensor, list[tuple[str, tuple[int, ...], int, int]]]:
        """Validate header and metadata, copy the data section into an owned buffer, check the sha256.

        The header and metadata are read through ``safe_open`` (:func:`read_stack_metadata`); the data
        section is copied from a memory map in one memcpy, at raw-read speed (840 ``get_tensor`` copies
        per SmolLM2 stack take about twice as long). With ``verify`` the checksum is computed from the same
        mapping in a worker thread, overlapping the copy (hashlib releases the GIL).
        """
        path = entry.path
        meta = read_stack_metadata(path)
        check_fingerprint(meta["fingerprint"], self.stacks.fingerprint, str(path), self.allow_fingerprint_mismatch)
        check_config_compatible(meta["config"], self.stacks.config, str(path))
        if (meta["domain"], meta["round"]) != (entry.domain, entry.round_index):
            raise StackLoadError(f"file metadata says {meta['domain']}/r{meta['round']}, index says {entry.name}")
        if meta["dtype"] != str(entry.dtype).removeprefix("torch."):
            raise StackLoadError(f"file dtype {meta['dtype']} differs from the index dtype {entry.dtype}")
        with open(path, "rb") as fh:
            try:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise StackLoadError(f"cannot map the file ({e})") from e
            future = self._pool("hash").submit(_sha256_mapped, mm) if verify and parallel_hash else None
            error: StackLoadError | None = None
            try:
                buf, items = self._copy_data(mm, self._layout(entry.dtype), entry.dtype, pin)
            except StackLoadError as e:
                error = e
            finally:  # the hash must be done with the mapping before it is closed
                digest = future.result() if future is not None else _sha256_mapped(mm) if verify else None
                mm.close()
        if digest is not None and digest != entry.sha256:
            raise StackLoadError(f"checksum mismatch (index sha256 {entry.sha256[:16]}..., file {digest[:16]}...)")
        if error is not None:
            raise error
        return buf, items

    @staticmethod
    def _copy_data(mm: mmap.mmap, layout: _Layout, dtype: torch.dtype,
                   pin: bool) -> tuple[torch.Tensor, list[tuple[str, tuple[int, ...], int, int]]]:
        """Check every tensor's key, shape, dtype and extent, then copy the data section into one buffer.

        The copy matters: tensors viewing the file mapping would change (or fault) if the file were
        rewritten in place after verification. It is one single-threaded memcpy (numpy), not thousands of
        ``Tensor.copy_`` calls, whose intra-op parallel regions each cost a scheduler time slice when the
        CPU is oversubscribed (measured 100x slower than the memcpy).
        """
        size = len(mm)
        try:
            n = int.from_bytes(mm[:8], "little")
            header = json.loads(mm[8 : 8 + n])
        except (ValueError, UnicodeDecodeError) as e:
            raise StackLoadError(f"unreadable safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise StackLoadError("unreadable safetensors header (not a JSON object)")
        start = 8 + n
        header.pop("__metadata__", None)
        expected = layout.shapes
        missing, extra = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
        if missing or extra:
            raise StackLoadError(f"key mismatch; missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                                 f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
        elem = torch.empty((), dtype=dtype).element_size()
        items = []
        for key, shape in expected.items():
            info = header[key]
            try:
                found, begin, end = tuple(info["shape"]), int(info["data_offsets"][0]), int(info["data_offsets"][1])
                code = info["dtype"]
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise StackLoadError(f"malformed header entry for {key} ({e})") from e
            if found != shape:
                raise StackLoadError(f"{key} has shape {found}, expected {shape}")
            if code != SAFETENSORS_CODES.get(dtype):
                raise StackLoadError(f"{key} has dtype {code}, metadata says {dtype}")
            nbytes = math.prod(shape) * elem
            if end - begin != nbytes or begin % elem or start + end > size:
                raise StackLoadError(f"{key} has invalid data offsets [{begin}, {end}] in a {size}-byte file")
            items.append((key, shape, begin, nbytes))
        data = size - start
        if sum(item[3] for item in items) != data:
            raise StackLoadError(f"data section of {data} bytes does not match its tensors")
        buf = torch.empty(data, dtype=torch.uint8, pin_memory=pin)
        src = np.frombuffer(mm, dtype=np.uint8, count=data, offset=start)
        try:
            np.copyto(buf.numpy(), src)
        finally:
            del src  # release the export before the mapping is closed
        return buf, items

    def _build(self, read: _Read) -> _Cached:
        """Turn a read buffer into a frozen :class:`Stack` whose parameters are views of the buffer."""
        entry = read.entry
        if read.verified:
            self._verified[entry.name] = read.signature
            self._stats.verified += 1
        self._stats.bytes_read += read.file_bytes
        self._stats.load_ms += read.ms
        key = (json.dumps(self.stacks.config.to_dict(), sort_keys=True), tuple(self.stacks.shapes.items()),
               entry.dtype)
        template = _TEMPLATES.get(key)
        if template is None:  # built once on the meta device: no allocation, no random init per load
            template = _TEMPLATES[key] = Stack(self.stacks.shapes, self.stacks.config, "template",
                                               dtype=entry.dtype, device="meta")
        stack = _clone_module(template)
        assert isinstance(stack, Stack)
        stack.relabel(entry.domain, entry.round_index, self.stacks.config, self.stacks.keys)
        self._bind(stack, entry.dtype, read.buf, read.items)
        stack.frozen = True
        stack.train(False)
        logger.debug("loaded %s from %s (%d B, %.1f ms%s)", entry.name, entry.path.name, read.file_bytes, read.ms,
                     ", verified" if read.verified else "")
        return _Cached(entry, stack, read.buf, read.items)

    @staticmethod
    def _bind(stack: Stack, dtype: torch.dtype, buf: torch.Tensor,
              items: list[tuple[str, tuple[int, ...], int, int]]) -> None:
        """Point every parameter of ``stack`` at its slice of ``buf`` (no copy)."""
        for key, shape, offset, nbytes in items:
            target, _, name = key.rpartition(".")
            view = buf[offset : offset + nbytes].view(dtype).view(shape)
            setattr(stack.module_for(target), name, nn.Parameter(view, requires_grad=False))

    def _pool(self, kind: str) -> ThreadPoolExecutor:
        attr = f"_{kind}_pool"
        pool = getattr(self, attr)
        if pool is None:
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"stackstore-{kind}")
            setattr(self, attr, pool)
        return pool

    # ------------------------------------------------------------------ prefetch
    def prefetch(self, weights: Mapping[str, float]) -> list[str]:
        """Start loading the stacks a route will need, without attaching or evicting anything.

        Stacks go to the device tier while its free budget allows, then to the host tier while that
        allows; the rest is left for :meth:`activate`. Returns the names scheduled.

        On CUDA the reads run in a worker thread into pinned host buffers and the host-to-device copies
        are issued on a side stream; :meth:`activate` waits for them (and makes the compute stream wait
        on their events). This path cannot be tested on the CPU-only development machine. On CPU the
        loads are synchronous: a following :meth:`activate` finds them as hits.

        A load error is not raised here: the stack is skipped (logged) and :meth:`activate` retries it.
        """
        _, needed = self._route(weights)
        scheduled = []
        for e in needed:
            if e.name in self._device_tier or e.name in self._host_tier or e.name in self._pending:
                continue
            to_device = self._fits_free(e.nbytes)
            if not to_device and not self._fits_host_free(e.nbytes):
                continue
            if self._cuda:
                if self._side_stream is None:
                    self._side_stream = torch.cuda.Stream(self.device)
                reserved = e.nbytes if to_device else 0
                self._pending[e.name] = (self._pool("prefetch").submit(self._read, e, to_device, True), reserved)
                self._pending_bytes += reserved
            else:
                try:
                    self._land(self._read(e, device_target=to_device))
                except StackLoadError as err:
                    logger.warning("prefetch of %s failed (activate will retry): %s", e.name, err)
                    continue
            scheduled.append(e.name)
        return scheduled

    def _fits_free(self, nbytes: int) -> bool:
        if self.budget_bytes is None:
            return True
        return self.device_bytes() + nbytes <= self.budget_bytes

    def _fits_host_free(self, nbytes: int) -> bool:
        if self.host_budget_bytes == 0:
            return False
        return self.host_budget_bytes is None or self._tier_bytes(self._host_tier) + nbytes <= self.host_budget_bytes

    def _land(self, read: _Read) -> None:
        """Insert a prefetched stack into its tier (most recently used end)."""
        if read.event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(read.event)
            read.buf.record_stream(stream)  # allocated on the side stream, used on the compute stream
        cached = self._build(read)
        self._stats.misses += 1
        self._stats.prefetched += 1
        if read.for_device:
            self._device_tier[read.entry.name] = cached
        else:
            self._make_host_room(read.entry.nbytes)
            self._host_tier[read.entry.name] = cached

    def _collect_prefetches(self, wait: bool) -> None:
        for name, (future, reserved) in list(self._pending.items()):
            if not wait and not future.done():
                continue
            del self._pending[name]
            self._pending_bytes -= reserved
            try:
                read = future.result()
            except StackLoadError as err:
                logger.warning("prefetch of %s failed (activate will retry): %s", name, err)
                continue
            self._land(read)

    def __repr__(self) -> str:
        s = self.stats()
        return (f"StackStore({self.directory}, {len(self.entries)} stacks, device={self.device}, "
                f"resident={len(self._device_tier)} ({s.resident_bytes} B), attached={len(self._attached)})")

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[StackEntry]:
        return iter(self.entries.values())
