"""``BrainStacks``: attach MoE-LoRA stacks to a causal LM with forward hooks.

One forward hook is registered on every target projection of every decoder layer, once, at
:meth:`BrainStacks.attach`. Module types and the model's own forward are untouched, so Unsloth's fused
attention and bitsandbytes ``Linear4bit`` layers keep working. What the hooks compute is switched
through state: the frozen stacks (each tagged with its domain), the active stack, the null-space bases
and the :class:`~brainstacks_hooks.stacks.modes.Mode`.

Example::

    stacks = BrainStacks.attach(model, StackConfig())
    stacks.new_stack("chat")          # trainable, zero-initialised: logits unchanged
    ...train...
    stacks.freeze_active()
    with stacks.prefix("chat"):
        loss = model(**batch).loss
    stacks.save("out/stacks")
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import ConfigError, StackBypassed, StackLoadError, StackStateError
from ..models.fingerprint import ModelFingerprint
from ..models.targets import find_target_modules, projection_features
from ..utils.io import save_safetensors_atomic
from ..utils.logging import get_logger
from .config import StackConfig
from .frozen_pool import FrozenPool, Run, SlotTable
from .modes import Mode, row_weight_matrix, select_frozen
from .null_space import fold_into_b, merge_bases
from .serialization import (
    NullSpaceEntry,
    StackIndexEntry,
    check_config_compatible,
    check_fingerprint,
    load_stack,
    null_space_filename,
    read_null_space,
    read_stack_index,
    save_stack,
    stack_filename,
    write_stack_index,
)
from .stack import Stack

logger = get_logger(__name__)

DeltaCollector = Callable[[str, torch.Tensor], None]


class _StackContainer(nn.Module):
    """Registered on the model as ``model.brainstacks`` so .to(), train()/eval(), state_dict() reach stacks."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.ModuleList()
        self.active: Stack | None = None


_PLAN_SERIALS = itertools.count()


class _PoolGroup:
    """The plan's stacks of one storage dtype: their plan positions, slots and contiguous runs."""

    def __init__(self, dtype: torch.dtype, positions: list[int], slots: list[int], runs: list[Run],
                 length: int) -> None:
        self.dtype, self.positions, self.slots, self.runs, self.length = dtype, positions, slots, runs, length
        self.whole = False  # True when the group is the whole plan (no weight selection needed)
        self._index: dict[torch.device, tuple[torch.Tensor | None, list[torch.Tensor | None]]] = {}

    def index(self, device: torch.device) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """The group's plan positions and each run's positions as index tensors on ``device``."""
        got = self._index.get(device)
        if got is None:
            sel = None if self.whole else torch.tensor(self.positions, device=device)
            runs = [None if pos is None else torch.tensor(pos, device=device) for _, _, pos, _ in self.runs]
            got = self._index[device] = (sel, runs)
        return got


class _Bound(NamedTuple):
    """One dtype group of a plan, bound to a projection's pool (see ``BrainStacks._bind``)."""

    pool: FrozenPool
    runs: list[Run]
    shared: list[torch.Tensor] | None  # per-run scaled weights of a shared route (None: mixed-route rows)
    sel: torch.Tensor | None
    run_index: list[torch.Tensor | None]


class _Plan:
    """What the hooks compute in the current mode (rebuilt when the mode or the stacks change)."""

    def __init__(self, frozen: list[Stack], weights: list[float], use_active: bool,
                 row_weights: list[list[float]] | None = None) -> None:
        self.frozen, self.weights, self.use_active = frozen, weights, use_active
        self.row_weights = row_weights  # [B][N] for a mixed-route batch, else None
        self.uids = tuple(s.uid for s in frozen)
        self.serial = next(_PLAN_SERIALS)
        self.pool_groups: list[_PoolGroup] | None = None  # filled on the first grouped forward
        self.bound: dict[str, list[_Bound]] = {}  # per projection, filled on its first grouped forward
        self._weight_tensors: dict[torch.device, torch.Tensor] = {}
        self._token_weights: dict[tuple[torch.device, int], torch.Tensor] = {}

    @property
    def empty(self) -> bool:
        return not self.frozen and not self.use_active

    @property
    def signature(self) -> tuple:
        """Equal signatures compute the same function (same stacks, weights and active flag)."""
        rows = None if self.row_weights is None else tuple(map(tuple, self.row_weights))
        return self.uids, tuple(self.weights), self.use_active, rows

    def weight_tensor(self, device: torch.device) -> torch.Tensor:
        """``[N]`` stack weights shared by every row."""
        t = self._weight_tensors.get(device)
        if t is None:
            t = self._weight_tensors[device] = torch.tensor(self.weights, dtype=torch.float32, device=device)
        return t

    def token_weights(self, device: torch.device, batch: int, n_tokens: int) -> torch.Tensor:
        """Weights per token row: ``[N]`` shared, or ``[T, N]`` for a mixed-route batch of ``batch`` rows.

        Raises:
            StackStateError: the forward's batch size differs from the number of routes.
        """
        if self.row_weights is None:
            return self.weight_tensor(device)
        if batch != len(self.row_weights):
            raise StackStateError(f"mixed-route mode has {len(self.row_weights)} routes but the forward has "
                                  f"{batch} rows")
        key = (device, n_tokens)
        t = self._token_weights.get(key)
        if t is None:
            rows = torch.tensor(self.row_weights, dtype=torch.float32, device=device)  # [B, N]
            t = self._token_weights[key] = rows.repeat_interleave(n_tokens // batch, dim=0)  # [T, N]
        return t


class BrainStacks:
    """Frozen and active MoE-LoRA stacks on a model, computed by forward hooks.

    Create with :meth:`attach` (new) or :meth:`load` (from a saved directory); never construct directly.
    """

    def __init__(self, model: nn.Module, config: StackConfig, _token: object = None) -> None:
        if _token is not _ATTACH_TOKEN:
            raise StackStateError("use BrainStacks.attach(model, config) or BrainStacks.load(model, dir)")
        if getattr(model, "_brainstacks_attached", False):
            raise StackStateError("this model already has stacks attached; call detach() on the existing BrainStacks")
        self.model = model
        self.config = config
        self.targets: dict[str, nn.Module] = find_target_modules(model, config.target_modules)
        self.keys = list(self.targets)
        self.shapes = {k: projection_features(m) for k, m in self.targets.items()}
        self.fingerprint = ModelFingerprint.from_model(model, self.targets)
        self.container = _StackContainer()
        self.domain_order: list[str] = []
        self.null_space_bases: dict[str, dict[str, torch.Tensor]] = {}
        self._null_space: dict[str, torch.Tensor] = {}
        self._mode = Mode("train")
        self._plan: _Plan | None = None
        self._pools: dict[tuple[str, torch.dtype], FrozenPool] = {}
        self._tables: dict[torch.dtype, SlotTable] = {}
        self._calls = [0] * len(self.keys)
        self._collectors: list[DeltaCollector] = []
        self._track = False
        self.aux_grad_scale = 1.0
        self.check_bypass = True
        #: most frozen stacks the grouped pools hold per projection (``None``: every stack a forward used
        #: while it stays attached; a :class:`~brainstacks_hooks.inference.store.StackStore` with a budget sets
        #: it from the budget and counts the pools in it). See :mod:`.frozen_pool`.
        self.pool_capacity: int | None = None
        self._handles: list[Any] = []
        self._requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}

    # ------------------------------------------------------------------ attach / detach
    @classmethod
    def attach(cls, model: nn.Module, config: StackConfig | None = None) -> BrainStacks:
        """Freeze the base and register one hook per target projection (no stacks yet).

        Raises:
            StackStateError: the model already has stacks attached.
            ConfigError: no target projection found.
        """
        self = cls(model, config or StackConfig(), _ATTACH_TOKEN)
        for p in model.parameters():
            p.requires_grad_(False)
        model.add_module("brainstacks", self.container)
        for i, (key, module) in enumerate(self.targets.items()):
            self._handles.append(module.register_forward_hook(self._make_hook(i, key)))
        self._handles.append(model.register_forward_pre_hook(self._reset_calls))
        self._handles.append(model.register_forward_hook(self._check_calls))
        model._brainstacks_attached = True  # type: ignore[attr-defined]
        model._brainstacks = self  # type: ignore[attr-defined]
        n_layers = len({k.split(".")[1] for k in self.keys})
        logger.info("attached hooks to %d projections (%d layers)", len(self.keys), n_layers)
        return self

    def detach(self) -> None:
        """Remove every hook and stack: the model is exactly the base again (same state_dict keys)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if "brainstacks" in self.model._modules:
            del self.model._modules["brainstacks"]
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad_before.get(n, p.requires_grad))
        for attr in ("_brainstacks_attached", "_brainstacks"):
            if hasattr(self.model, attr):
                delattr(self.model, attr)

    # ------------------------------------------------------------------ stacks
    @property
    def frozen_stacks(self) -> list[Stack]:
        """Frozen stacks in the order they were frozen or loaded."""
        return list(self.container.frozen)  # type: ignore[arg-type]

    @property
    def active(self) -> Stack | None:
        """The trainable stack, if any."""
        return self.container.active

    @property
    def domains(self) -> list[str]:
        """Domains with frozen stacks, in training order."""
        return list(self.domain_order)

    def stacks_for(self, domain: str) -> list[Stack]:
        """Frozen stacks of one domain, in round order."""
        return [s for s in self.frozen_stacks if s.domain == domain]

    def device_of(self, key: str) -> torch.device:
        """Device of the projection ``key`` (its first parameter; CPU for parameterless modules)."""
        return self._device_of(key)

    def _device_of(self, key: str) -> torch.device:
        p = next(self.targets[key].parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def new_stack(self, domain: str, round_index: int | None = None, dtype: torch.dtype = torch.float32) -> Stack:
        """Add a trainable, zero-initialised stack for ``domain`` (the model output is unchanged).

        Raises:
            StackStateError: an active stack exists (freeze or discard it first).
        """
        if self.active is not None:
            raise StackStateError(
                f"an active stack ({self.active.domain!r}) exists; freeze_active() or discard_active() first")
        if round_index is None:
            round_index = len(self.stacks_for(domain))
        devices = {self._device_of(k) for k in self.keys}
        device = devices.pop() if len(devices) == 1 else None
        stack = Stack(self.shapes, self.config, domain, round_index, dtype=dtype, device=device)
        if device is None:  # model spread over devices: each MoE-LoRA next to its projection
            for key, m in stack.items():
                m.to(self._device_of(key))
        stack.train(self.model.training)
        self.container.active = stack
        self._invalidate()
        return stack

    def freeze_active(self) -> Stack:
        """Freeze the active stack: fold the null-space projection into B, cast, (offload), append.

        Returns the frozen stack. Raises :class:`StackStateError` when there is no active stack.
        """
        stack = self._require_active()
        for key, m in stack.items():
            v = self._null_space.get(key)
            if v is not None:
                fold_into_b(m.B, v)
        dtype = self.config.frozen_torch_dtype(stack.dtype)
        stack.freeze(dtype, device="cpu" if self.config.offload_frozen else None)
        self.container.active = None
        self._append_frozen(stack)
        return stack

    def discard_active(self) -> Stack:
        """Drop the active stack without freezing it (a rejected inner-loop round)."""
        stack = self._require_active()
        self.container.active = None
        self._invalidate()
        return stack

    def add_frozen(self, stack: Stack) -> None:
        """Attach an already frozen stack (from :func:`load_stack` or a stack store)."""
        if not stack.frozen:
            raise StackStateError("add_frozen() takes frozen stacks; use new_stack() for a trainable one")
        if set(stack.keys) != set(self.keys):
            raise StackLoadError("stack targets differ from the attached projections")
        check_config_compatible(stack.config, self.config, f"stack {stack.domain!r} round {stack.round_index}")
        self._append_frozen(stack)

    def group_cache_bytes(self) -> int:
        """Bytes held by the grouped pools of frozen stacks (all projections, see :mod:`.frozen_pool`)."""
        return sum(p.nbytes() for p in self._pools.values())

    def clear_group_cache(self) -> None:
        """Drop every grouped pool (stacks are copied in again on the next forward that needs them)."""
        self._pools.clear()
        self._tables.clear()
        self._invalidate()

    def remove_frozen(self, stack: Stack, release: bool = True) -> None:
        """Detach one frozen stack (its domain stays in the training order).

        With ``release=False`` its slot in the grouped pools is kept, so attaching it again computes without
        a copy (the stack store detaches cached stacks this way on a route switch; see :meth:`release_frozen`).
        """
        idx = [i for i, s in enumerate(self.container.frozen) if s is stack]
        if not idx:
            raise StackStateError("stack is not attached")
        del self.container.frozen[idx[0]]
        if release:
            self.release_frozen(stack)
        self._invalidate()

    def release_frozen(self, stack: Stack) -> None:
        """Free the pool slots of ``stack`` (a detached stack that will not come back; no-op without slots)."""
        for table in self._tables.values():
            table.release(stack.uid)
        for pool in self._pools.values():
            pool.forget(stack.uid)

    def _append_frozen(self, stack: Stack) -> None:
        self.container.frozen.append(stack)
        if stack.domain not in self.domain_order:
            self.domain_order.append(stack.domain)
        self._invalidate()

    def _require_active(self) -> Stack:
        if self.active is None:
            raise StackStateError("no active stack; call new_stack(domain) first")
        return self.active

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters of the active stack (the only ones that train)."""
        return [p for p in self.active.parameters() if p.requires_grad] if self.active is not None else []

    def aux_loss(self) -> torch.Tensor:
        """Current load-balance loss of the active stack (already times its coefficient), detached."""
        vals = [m.last_aux for _, m in self.active.items() if m.last_aux is not None] if self.active else []
        return torch.stack(vals).sum() if vals else torch.zeros(())

    # ------------------------------------------------------------------ modes
    @property
    def mode(self) -> Mode:
        """The current mode."""
        return self._mode

    def set_mode(self, mode: Mode | str, domain: str | None = None) -> None:
        """Switch mode: ``set_mode("prefix", "chat")``, ``set_mode(Mode.routed({...}))``."""
        mode = mode if isinstance(mode, Mode) else Mode(mode, domain=domain)
        self._plan_for(mode)  # validate before switching
        self._mode = mode
        self._invalidate()

    @contextlib.contextmanager
    def using(self, mode: Mode | str, domain: str | None = None) -> Iterator[BrainStacks]:
        """Context manager: run the block in ``mode`` and restore the previous mode afterwards."""
        previous = self._mode
        self.set_mode(mode, domain)
        try:
            yield self
        finally:
            self._mode = previous
            self._invalidate()

    def train_mode(self):
        """Frozen stacks + active stack (the training condition)."""
        return self.using("train")

    def prefix(self, domain: str):
        """Stacks of every domain up to and including ``domain`` in training order."""
        return self.using("prefix", domain)

    def isolated(self, domain: str):
        """Only ``domain``'s frozen stacks."""
        return self.using("isolated", domain)

    def ungated(self):
        """All frozen stacks at weight 1."""
        return self.using("ungated")

    def routed(self, weights: Mapping[str, float]):
        """Per-domain weights by name; a domain at 0 (or absent) is neither loaded nor computed."""
        return self.using(Mode.routed(weights))

    def routed_rows(self, rows: Sequence[Mapping[str, float]]):
        """A mixed-route batch: row ``b`` of every forward in the block runs with weights ``rows[b]``.

        Equal, row by row, to running each row alone under ``routed(rows[b])`` (one forward, no per-row loop:
        the per-row weights scale the gates inside the grouped frozen compute).
        """
        return self.using(Mode.routed_rows(rows))

    def base_only(self):
        """No stacks at all."""
        return self.using("base_only")

    def reference(self):
        """Frozen stacks on, active stack off (reference policy for DPO/GRPO)."""
        return self.using("reference")

    def _plan_for(self, mode: Mode) -> _Plan:
        stacks = self.frozen_stacks
        domains = [s.domain for s in stacks]
        chosen = select_frozen(mode, self.domain_order, domains)
        rows = row_weight_matrix(mode, self.domain_order, domains, [i for i, _ in chosen])
        return _Plan([stacks[i] for i, _ in chosen], [w for _, w in chosen],
                     use_active=mode.kind == "train" and self.active is not None, row_weights=rows)

    def _invalidate(self) -> None:
        self._plan = None

    @property
    def plan(self) -> _Plan:
        """The stacks the current mode computes."""
        if self._plan is None:
            self._plan = self._plan_for(self._mode)
        return self._plan

    # ------------------------------------------------------------------ null space
    def set_null_space(self, bases: Mapping[str, torch.Tensor] | None) -> None:
        """Set the combined orthonormal bases V [d_out, k] per target key (``None`` clears them).

        The active stack's delta is projected ``delta - (delta V) V^T`` and, at :meth:`freeze_active`,
        the projection is folded into every expert's B.
        """
        self._null_space = {}
        for key, v in (bases or {}).items():
            if key not in self.shapes:
                raise ConfigError(f"null-space basis for unknown target {key!r}")
            if v.dim() != 2 or v.shape[0] != self.shapes[key][1]:
                raise ConfigError(f"{key}: basis must be [d_out={self.shapes[key][1]}, k], got {tuple(v.shape)}")
            if v.shape[1]:
                self._null_space[key] = v.detach().to(device=self._device_of(key), dtype=torch.float32)

    def add_null_space_basis(self, domain: str, bases: Mapping[str, torch.Tensor]) -> None:
        """Record the directions claimed by ``domain`` and re-merge the combined bases of all domains."""
        self.null_space_bases[domain] = {k: v.detach().float().cpu() for k, v in bases.items()}
        self._merge_null_space()

    def set_domain_order(self, order: list[str]) -> None:
        """Declare the training order of domains (used by ``prefix``); unknown attached domains go last."""
        self.domain_order = list(order) + [d for d in self.domain_order if d not in order]
        self._invalidate()

    def merge_null_space(self) -> None:
        """Re-merge :attr:`null_space_bases` of every domain into the bases the active stack is projected on."""
        self._merge_null_space()

    def _merge_null_space(self) -> None:
        merged = {}
        for key in self.keys:
            parts = [b[key] for b in self.null_space_bases.values() if key in b and b[key].numel()]
            if parts:
                merged[key] = merge_bases(parts)
        self.set_null_space(merged)

    @property
    def null_space(self) -> dict[str, torch.Tensor]:
        """The combined bases in use, per target key."""
        return dict(self._null_space)

    def null_space_capacity(self) -> dict[str, float]:
        """Claimed directions / output dimension, per target key."""
        return {k: v.shape[1] / self.shapes[k][1] for k, v in self._null_space.items()}

    # ------------------------------------------------------------------ observation
    @contextlib.contextmanager
    def collect_frozen_deltas(self, callback: DeltaCollector) -> Iterator[None]:
        """Call ``callback(key, delta [T, d_out])`` with the frozen stacks' summed delta at every hook.

        The delta is the one the forward computes anyway (no second computation).
        """
        self._collectors.append(callback)
        try:
            yield
        finally:
            self._collectors.remove(callback)

    @contextlib.contextmanager
    def track_expert_utilization(self) -> Iterator[dict[str, dict[str, list[float]]]]:
        """Count expert selections inside the block; the yielded dict is filled on exit.

        Result: ``{stack label: {target key: [share of expert e]}}`` (shares sum to 1 per target).
        """
        stacks = [*self.frozen_stacks, *([self.active] if self.active is not None else [])]
        for s in stacks:
            for _, m in s.items():
                m.expert_counts = None
        result: dict[str, dict[str, list[float]]] = {}
        self._track = True
        try:
            yield result
        finally:
            self._track = False
            for s in stacks:
                label = f"{s.domain}/r{s.round_index}" + ("" if s.frozen else "/active")
                per = {}
                for key, m in s.items():
                    if m.expert_counts is not None and m.expert_counts.sum() > 0:
                        per[key] = (m.expert_counts.float() / m.expert_counts.sum()).tolist()
                if per:
                    result[label] = per

    # ------------------------------------------------------------------ hooks
    def _reset_calls(self, module: nn.Module, args: Any) -> None:
        for i in range(len(self._calls)):
            self._calls[i] = 0

    def _check_calls(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self.check_bypass or self.plan.empty:
            return
        missed = [self.keys[i] for i, c in enumerate(self._calls) if c == 0]
        if missed:
            raise StackBypassed(
                f"{len(missed)} projection hook(s) did not fire during this forward (first: {missed[0]}). "
                "A fused kernel bypassed the projection modules (e.g. Unsloth fast decode, vLLM, fused LoRA), "
                "so the stacks had no effect. Generate through the HF path (use_cache=False under Unsloth) "
                "or disable the fast path."
            )

    def _pool_groups(self, plan: _Plan) -> list[_PoolGroup]:
        """The plan's stacks by storage dtype, with their slots (assigned once per plan)."""
        if plan.pool_groups is None:
            by_dtype: dict[torch.dtype, list[int]] = {}
            for i, s in enumerate(plan.frozen):
                by_dtype.setdefault(s.dtype, []).append(i)
            groups = []
            for dtype, positions in by_dtype.items():
                table = self._tables.get(dtype)
                if table is None or table.capacity != self.pool_capacity:
                    table = self._tables[dtype] = SlotTable(self.pool_capacity)
                    for key in [k for k in self._pools if k[1] == dtype]:
                        del self._pools[key]
                slots = table.assign([plan.frozen[i].uid for i in positions])
                length = table.capacity if table.capacity is not None else table.size
                groups.append(_PoolGroup(dtype, positions, slots, table.runs(slots), length))
            if len(groups) == 1:
                groups[0].whole = True
            plan.pool_groups = groups
        return plan.pool_groups

    def _pool(self, key: str, group: _PoolGroup, plan: _Plan, device: torch.device) -> FrozenPool:
        pool = self._pools.get((key, group.dtype))
        if pool is None or pool.device != device or pool.sparse != self.config.sparse_frozen(device):
            pool = self._pools[(key, group.dtype)] = FrozenPool(plan.frozen[group.positions[0]].module_for(key),
                                                                group.dtype, device,
                                                                self.config.sparse_frozen(device))
        if pool.synced != plan.serial:
            stacks = [plan.frozen[i] for i in group.positions]
            pool.sync([s.module_for(key) for s in stacks], [s.uid for s in stacks], group.slots, group.length)
            pool.synced = plan.serial
        return pool

    def _bind(self, key: str, plan: _Plan, x_device: torch.device) -> list[_Bound]:
        """What ``key``'s hook computes under ``plan``: per dtype group its synced pool, runs and weights."""
        bound = []
        for group in self._pool_groups(plan):
            # offloaded: the pool stays with the stacks (host RAM)
            dev = plan.frozen[group.positions[0]].module_for(key).A.device if self.config.offload_frozen \
                else x_device
            pool = self._pool(key, group, plan, dev)
            sel, run_index = group.index(dev)
            shared = None
            if plan.row_weights is None:  # a shared route: its weights are fixed for the plan
                w = plan.weight_tensor(dev)
                shared = pool.run_weights(w if sel is None else w.index_select(-1, sel), group.runs, run_index)
            bound.append(_Bound(pool, group.runs, shared, sel, run_index))
        plan.bound[key] = bound
        return bound

    def _frozen_delta(self, key: str, x: torch.Tensor, plan: _Plan, batch: int) -> torch.Tensor:
        """Weighted frozen delta ``[T, d_out]`` of ``x`` ``[T, d_in]`` (``batch`` rows of T / batch tokens)."""
        if self.config.group_frozen:
            bound = plan.bound.get(key)
            if bound is None or (not self.config.offload_frozen and bound[0].pool.device != x.device):
                bound = self._bind(key, plan, x.device)  # first forward of the plan, or the model was moved
            delta = None
            for b in bound:
                dev = b.pool.device
                weights = b.shared
                if weights is None:  # mixed-route batch: weights per token row
                    w = plan.token_weights(dev, batch, x.shape[0])  # [T, N]
                    weights = b.pool.run_weights(w if b.sel is None else w.index_select(-1, b.sel), b.runs,
                                                 b.run_index)
                d = b.pool(x if x.device == dev else x.to(dev), b.runs, weights, self._track)
                d = d if d.device == x.device else d.to(x.device)
                delta = d if delta is None else delta + d
            assert delta is not None
            return delta
        w = plan.token_weights(x.device, batch, x.shape[0])
        delta = None
        for i, stack in enumerate(plan.frozen):
            m = stack.module_for(key)
            wi = w[i] if w.dim() == 1 else w[:, i : i + 1]  # scalar or [T, 1]
            d = m(x.to(m.A.device), track=self._track).to(x.device) * wi  # [T, d_out]
            delta = d if delta is None else delta + d
        return delta

    def _make_hook(self, index: int, key: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            self._calls[index] += 1
            plan = self.plan
            if plan.empty:
                return output
            x = args[0]
            x2 = x.reshape(-1, x.shape[-1])  # [T, d_in]
            delta = None
            if plan.frozen:
                batch = x.shape[0] if x.dim() > 2 else 1
                delta = self._frozen_delta(key, x2, plan, batch)  # [T, d_out]
                for collect in self._collectors:
                    collect(key, delta)
            if plan.use_active:
                d = self.active.module_for(key)(x2, self.config.aux_loss_coef, self.aux_grad_scale, self._track,
                                                null_basis=self._null_space.get(key))
                delta = d if delta is None else delta + d
            return output + delta.view(*output.shape[:-1], -1).to(output.dtype)

        return hook

    # ------------------------------------------------------------------ save / load
    def fingerprint_dict(self) -> dict[str, Any]:
        """The base-model fingerprint as a JSON-ready dict."""
        return self.fingerprint.to_dict()

    def save_stack(self, stack: Stack, path: str | os.PathLike) -> str:
        """Save one stack to ``path`` (atomic); returns its sha256."""
        return save_stack(stack, path, self.fingerprint)

    def save(self, directory: str | os.PathLike) -> Path:
        """Save every frozen stack plus the null-space bases and an index, atomically per file.

        Layout (the one a run directory's ``stacks/`` has too): ``brainstacks.json`` (index: config,
        fingerprint, domain order, stacks and null-space files with sha256), ``<domain>-r<round>.safetensors``
        per stack and ``null_space-<domain>.safetensors`` per domain that claimed directions. The index is
        written last, so a crash mid-save leaves the previous index valid.
        """
        directory = Path(directory)
        if self.active is not None:
            logger.warning("save(): the active (unfrozen) stack is not saved; freeze it first to keep it")
        entries = []
        for i, s in enumerate(self.frozen_stacks):
            rel = stack_filename(s.domain, s.round_index)
            sha = self.save_stack(s, directory / rel)
            entries.append(StackIndexEntry(i, s.domain, s.round_index, rel, sha, s.dtype))
        null_space = []
        for d, bases in self.null_space_bases.items():
            rel = null_space_filename(d)
            null_space.append(NullSpaceEntry(d, rel, save_safetensors_atomic(bases, directory / rel)))
        write_stack_index(directory, self.config, self.fingerprint, self.domain_order, entries, null_space)
        return directory

    @classmethod
    def load(cls, model: nn.Module, directory: str | os.PathLike, config: StackConfig | None = None,
             allow_fingerprint_mismatch: bool = False) -> BrainStacks:
        """Attach hooks to ``model`` and restore every saved stack, frozen.

        Everything is read and validated before the model is touched: a failed load raises
        :class:`StackLoadError` (or :class:`FingerprintMismatch`) and leaves the model exactly as it was.
        """
        directory = Path(directory)
        index = read_stack_index(directory)
        index_path, saved_config, saved_fp = index.path, index.config, index.fingerprint
        if getattr(model, "_brainstacks_attached", False):
            raise StackStateError("this model already has stacks attached; detach() them before load()")
        config = config or saved_config
        check_config_compatible(saved_config, config, str(index_path))
        try:
            targets = find_target_modules(model, config.target_modules)
        except ConfigError as e:
            raise StackLoadError(f"{index_path}: {e}") from e
        model_fp = ModelFingerprint.from_model(model, targets)
        check_fingerprint(saved_fp, model_fp, str(index_path), allow_fingerprint_mismatch)
        shapes = {k: projection_features(m) for k, m in targets.items()}
        stacks = []
        for e in index.entries:
            stack = load_stack(directory / e.file, shapes, model_fp, config, expected_sha256=e.sha256,
                               allow_fingerprint_mismatch=allow_fingerprint_mismatch)
            if stack.domain != e.domain or stack.round_index != e.round_index:
                raise StackLoadError(f"{directory / e.file}: metadata says {stack.domain}/r{stack.round_index}, "
                                     f"index says {e.domain}/r{e.round_index}")
            stacks.append(stack)
        bases = read_null_space(directory, index, shapes)
        # validated: now touch the model
        self = cls.attach(model, config)
        devices = {self._device_of(k) for k in self.keys}
        for stack in stacks:
            if not config.offload_frozen and len(devices) == 1:
                stack.to(next(iter(devices)))
            self._append_frozen(stack)
        self.domain_order = index.domain_order + [d for d in self.domain_order if d not in index.domain_order]
        for d, b in bases.items():
            self.null_space_bases[d] = b
        if bases:
            self._merge_null_space()
        self._invalidate()
        return self


_ATTACH_TOKEN = object()
