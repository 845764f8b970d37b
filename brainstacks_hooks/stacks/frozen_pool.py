"""Grouped compute of frozen stacks from resident slots: a route switch copies nothing.

Shapes: T tokens, ``d_in``/``d_out`` the projection's features, E experts of rank r, K active experts,
N stacks in the route (the current plan), C slots in the pool.

Every frozen stack a forward needs is copied once, per projection, into a **slot** of that projection's
pool, already in the layout of the grouped compute::

    w_in  [C, E*r + E, d_in]     slot s = [A rows of the stack (E*r); its router rows (E)]
    w_out [C, E*r, d_out]        slot s = B laid out so that ``mid @ w_out[s]`` sums the experts

A route is computed from **views** of the pool: the slots of its stacks are grouped into contiguous runs and
each run is one matmul pair, exactly the grouped compute of :mod:`.moe_lora` (one rank-(n*E*r) LoRA whose middle
activations are scaled by the per-stack gates times the route weights). Switching to another route whose stacks
are already in the pool writes nothing (the old design concatenated every stack of the new route per projection
on the first forward after a switch: 1.8-2.3x a steady forward, ``benchmarks/bench_route_switch.py``).

One :class:`SlotTable` per storage dtype is shared by all projections, so the runs of a route are computed
once per plan. Slots are assigned contiguously in route order where the free slots allow it, kept while their
stack stays resident (a :class:`~brainstacks_hooks.inference.store.StackStore` keeps slots of detached but
cached stacks, so a route seen before is computed without a copy), and released when the stack is removed
for good. With a capacity (the store sets one from its budget), the least recently used slot of a stack
outside the current route is reused when the table is full.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from ..errors import StackStateError
from ..utils.logging import get_logger
from .moe_lora import MoELoRA

logger = get_logger(__name__)

#: A contiguous run of slots ``[start, stop)`` and the plan positions of its slots (``None``: positions
#: ``first .. first + n`` in order, so the route weights are a plain slice).
Run = tuple[int, int, "list[int] | None", int]


class SlotTable:
    """Which slot each frozen stack (by uid) holds; shared by the pools of every projection.

    Args:
        capacity: at most this many slots (``None``: grow as needed).
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # uid -> slot, least recently used first
        self.size = 0  # slots ever handed out (the pools' length)
        self.free: list[int] = []

    def assign(self, uids: Sequence[int]) -> list[int]:
        """Slots of ``uids`` (assigning new ones to those without), marking them most recently used.

        A route with more stacks than the capacity grows the capacity (with a warning).
        """
        if self.capacity is not None and len(uids) > self.capacity:
            # e.g. a store's route plus frozen stacks the store does not own: never fail the forward
            logger.warning("a route of %d frozen stacks exceeds the pool capacity of %d slots; growing it (these "
                           "slots are not counted in a stack store's budget)", len(uids), self.capacity)
            self.capacity = len(uids)
        for u in uids:
            if u in self.slot_of:
                self.slot_of.move_to_end(u)
        missing = [u for u in uids if u not in self.slot_of]
        if missing:
            for u, s in zip(missing, self._take(len(missing), protect=set(uids)), strict=True):
                self.slot_of[u] = s
        return [self.slot_of[u] for u in uids]

    def release(self, uid: int) -> None:
        """Free the slot of ``uid`` (no-op when it has none)."""
        slot = self.slot_of.pop(uid, None)
        if slot is not None:
            self.free.append(slot)

    def _take(self, n: int, protect: set[int]) -> list[int]:
        free = sorted(self.free)
        for i in range(len(free) - n + 1):  # a contiguous run of free slots keeps the route in one matmul pair
            if free[i + n - 1] - free[i] == n - 1:
                taken = free[i : i + n]
                self.free = free[:i] + free[i + n :]
                return taken
        if self.capacity is None or self.size + n <= self.capacity:  # append: contiguous too
            taken = list(range(self.size, self.size + n))
            self.size += n
            return taken
        taken = free[:n]
        self.free = free[n:]
        while len(taken) < n and (self.capacity is None or self.size < self.capacity):
            taken.append(self.size)
            self.size += 1
        for uid in list(self.slot_of):  # least recently used first
            if len(taken) == n:
                break
            if uid not in protect:
                taken.append(self.slot_of.pop(uid))
        if len(taken) < n:  # cannot happen: assign() checked the capacity
            raise StackStateError(f"no free slot for {n} stacks in a pool of {self.capacity}")
        return sorted(taken)

    def runs(self, slots: Sequence[int]) -> list[Run]:
        """Contiguous runs of ``slots`` (plan order) as ``(start, stop, positions, first)``.

        ``positions`` lists the plan index of each slot of the run in slot order, or is ``None`` when they
        are ``first, first + 1, ...`` (the common case: one run in route order).
        """
        order = sorted(range(len(slots)), key=lambda i: slots[i])
        runs: list[Run] = []
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and slots[order[j + 1]] == slots[order[j]] + 1:
                j += 1
            pos = order[i : j + 1]
            in_order = pos == list(range(pos[0], pos[0] + len(pos)))
            runs.append((slots[order[i]], slots[order[j]] + 1, None if in_order else pos, pos[0]))
            i = j + 1
        return runs


class FrozenPool:
    """The resident slots of one projection and their grouped compute (see the module docstring)."""

    def __init__(self, m0: MoELoRA, dtype: torch.dtype, device: torch.device, sparse: bool = False) -> None:
        self.E, self.r, self.k, self.scale = m0.num_experts, m0.rank, m0.top_k, m0.scale
        self.sparse = sparse  # B side over the chosen experts only (see _sparse_run)
        self.d_in, self.d_out = m0.in_features, m0.out_features
        with torch.inference_mode(False):  # pools outlive the call: never inference tensors
            self.w_in = torch.empty(0, self.E * self.r + self.E, self.d_in, dtype=dtype, device=device)
            self.w_out = torch.empty(0, self.E * self.r, self.d_out, dtype=dtype, device=device)
        self.holder: list[int | None] = []  # uid whose weights slot s holds
        self.modules: list[MoELoRA | None] = []
        self.synced = -1  # serial of the last plan synced
        self.writes = 0  # slots written (a route switch among resident stacks writes none)

    @property
    def device(self) -> torch.device:
        return self.w_in.device

    def sync(self, modules: Sequence[MoELoRA], uids: Sequence[int], slots: Sequence[int], length: int) -> None:
        """Make slot ``slots[i]`` hold ``modules[i]``; the pool grows to ``length`` slots if shorter."""
        if length > len(self.holder):
            self._grow(length)
        Er = self.E * self.r
        for m, u, s in zip(modules, uids, slots, strict=True):
            if self.holder[s] == u:
                continue
            # a slot write bumps the pool's version: a training graph still holding these views cannot backward
            # through them any more (only a forward that brings a new stack in writes; a route switch does not)
            with torch.inference_mode(False), torch.no_grad():
                self.w_in[s, :Er].copy_(m.A.detach().reshape(Er, self.d_in))
                self.w_in[s, Er:].copy_(m.router.detach())
                self.w_out[s].copy_(m.out_weight().detach())
            self.holder[s], self.modules[s] = u, m
            self.writes += 1

    def _grow(self, length: int) -> None:
        c = len(self.holder)
        with torch.inference_mode(False), torch.no_grad():
            w_in = self.w_in.new_empty(length, *self.w_in.shape[1:])
            w_out = self.w_out.new_empty(length, *self.w_out.shape[1:])
            w_in[:c], w_out[:c] = self.w_in, self.w_out
        self.w_in, self.w_out = w_in, w_out
        self.holder += [None] * (length - c)
        self.modules += [None] * (length - c)

    def forget(self, uid: int) -> None:
        """Drop the reference to ``uid``'s module (its slot is free for another stack)."""
        for s, u in enumerate(self.holder):
            if u == uid:
                self.holder[s], self.modules[s] = None, None

    def run_weights(self, weights: torch.Tensor, runs: Sequence[Run],
                    pos_index: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        """Per run, the route weights of its stacks times the expert scale: ``[1 or T, n, 1]`` float32.

        Args:
            weights: [N] shared route weights, or [T, N] per token (mixed-route batch), in plan order.
            pos_index: per run, its positions as an index tensor on ``weights``' device (or ``None``).
        """
        out = []
        for (start, stop, _, first), pos in zip(runs, pos_index, strict=True):
            w = weights.index_select(-1, pos) if pos is not None else weights[..., first : first + stop - start]
            out.append((w.to(torch.float32) * self.scale).view(-1, stop - start, 1))
        return out

    def __call__(self, x: torch.Tensor, runs: Sequence[Run], run_weights: Sequence[torch.Tensor],
                 track: bool = False) -> torch.Tensor:
        """Weighted sum of the route's frozen deltas.

        Args:
            x: [T, d_in].
            runs: from :meth:`SlotTable.runs` (one per contiguous block of the route's slots).
            run_weights: from :meth:`run_weights` (computed once per plan for a shared route).
        Returns:
            [T, d_out].
        """
        E, r, Er = self.E, self.r, self.E * self.r
        if x.dtype != self.w_in.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.w_in.dtype)
        out = None
        for (start, stop, _, _), w in zip(runs, run_weights, strict=True):
            n = stop - start
            h = (x @ self.w_in[start:stop].view(-1, self.d_in).t()).view(-1, n, Er + E)  # [T, n, E*r + E]
            mid, logits = h[..., :Er], h[..., Er:]  # [T, n, E*r], [T, n, E]
            if self.sparse:
                delta, top_idx = self._sparse_run(mid, logits, w, start, stop)
            else:
                vals, top_idx = logits.topk(self.k, dim=-1)  # [T, n, K]
                # gates of the K winners times the route weight and scale; exactly 0 for the other experts
                win = (torch.softmax(vals, dim=-1) * w).to(logits.dtype)  # [T, n, K]
                gates = torch.zeros_like(logits).scatter_(-1, top_idx, win)  # [T, n, E]
                mid = (mid.reshape(-1, n, E, r) * gates.unsqueeze(-1).to(mid.dtype)).reshape(-1, n * Er)
                delta = mid @ self.w_out[start:stop].view(-1, self.d_out)  # [T, d_out]
            out = delta if out is None else out + delta
            if track:
                for i, s in enumerate(range(start, stop)):
                    self.modules[s]._count(top_idx[:, i])  # type: ignore[union-attr]
        assert out is not None
        return out

    def _sparse_run(self, mid: torch.Tensor, logits: torch.Tensor, w: torch.Tensor, start: int,
                    stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """B side over the K chosen experts of each (token, stack) only: one grouped matmul, one scatter-add.

        The A side stays the fused dense matmul (it yields the router logits too). Each of the T*n*K choices
        is a row ``gate * mid[t, stack, e]`` [r]; rows are sorted by (stack, expert) and multiplied by that
        expert's B [r, d_out] with ``torch._grouped_mm``, then added into their token's output row. Equal to
        the dense path up to summation order. Returns the delta [T, d_out] and the top-k indices [T, n, K].
        """
        E, r, K = self.E, self.r, self.k
        T, n = mid.shape[0], stop - start
        vals, top_idx = logits.topk(K, dim=-1)  # [T, n, K]
        gates = torch.softmax(vals.float(), dim=-1) * w  # [T, n, K]
        expert = (top_idx + torch.arange(n, device=mid.device).view(1, n, 1) * E).view(-1)  # [T*n*K] in [0, n*E)
        order = torch.argsort(expert, stable=True)
        offs = torch.bincount(expert, minlength=n * E).cumsum(0).to(torch.int32)  # [n*E] segment ends
        rows = mid.reshape(T, n, E, r).gather(2, top_idx.unsqueeze(-1).expand(T, n, K, r))  # [T, n, K, r]
        rows = (rows * gates.unsqueeze(-1).to(rows.dtype)).view(-1, r)[order]  # [T*n*K, r], by expert
        b = self.w_out[start:stop].view(n * E, r, self.d_out).to(rows.dtype)  # a copy only under autocast
        y = torch._grouped_mm(rows, b, offs=offs)  # [T*n*K, d_out]
        out = torch.zeros(T, self.d_out, dtype=y.dtype, device=y.device)
        return out.index_add_(0, order // (n * K), y), top_idx

    def nbytes(self) -> int:
        """Bytes held by the pool's slots."""
        return self.w_in.numel() * self.w_in.element_size() + self.w_out.numel() * self.w_out.element_size()
