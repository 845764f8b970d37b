"""Resident pool slots of frozen stacks: a route switch copies nothing and computes what the per-stack path does."""

from __future__ import annotations

import pytest
import torch

from brainstacks_hooks import BrainStacks
from brainstacks_hooks.errors import ConfigError
from brainstacks_hooks.stacks.config import StackConfig
from brainstacks_hooks.stacks.frozen_pool import FrozenPool, SlotTable
from brainstacks_hooks.stacks.moe_lora import MoELoRA
from brainstacks_hooks.testing import add_random_stack, make_tiny_llama

DOMAINS = ("chat", "code", "math", "med")
# fragmenting on purpose: {chat, math} first gets slots 0-3, {code} 4-5, then routes whose slots are out of
# route order (math before code), split in two runs, or a permutation
ROUTES = [{"chat": 1.0, "math": 0.5}, {"code": 0.8}, {"chat": 0.3, "code": 1.0, "math": 0.7},
          {"math": 1.0, "med": 0.4}, {"med": 0.6, "chat": 0.9}, {d: 0.5 for d in DOMAINS}, {"code": 1.0, "chat": 0.2}]


def _pair(seed: int = 0) -> tuple[BrainStacks, BrainStacks]:
    """Two models with the same stacks: grouped from pool slots, and one module per stack (the reference)."""
    out = []
    for group in (True, False):
        stacks = BrainStacks.attach(make_tiny_llama(seed), StackConfig(group_frozen=group))
        for i, d in enumerate(DOMAINS):
            add_random_stack(stacks, d, 10 * (i + 1), rounds=2)
        out.append(stacks)
    return out[0], out[1]


def _logits(stacks: BrainStacks, route: dict[str, float], ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), stacks.routed(route):
        out = stacks.model(input_ids=ids).logits
        stacks.last_groups = stacks.plan.pool_groups  # type: ignore[attr-defined]
        return out


def _writes(stacks: BrainStacks) -> int:
    return sum(p.writes for p in stacks._pools.values())


def test_slot_table_assigns_contiguously_reuses_and_evicts_lru():
    t = SlotTable()
    assert t.assign([10, 11]) == [0, 1] and t.assign([12]) == [2]
    assert t.runs([0, 1, 2]) == [(0, 3, None, 0)]
    assert t.runs([2, 0]) == [(0, 1, None, 1), (2, 3, None, 0)]  # two runs (in slot order), each in order
    assert t.runs([1, 0]) == [(0, 2, [1, 0], 1)]  # one run, slots out of plan order
    t.release(10)
    t.release(11)
    assert t.assign([13, 14]) == [0, 1]  # the free run is reused
    t.release(13)
    assert t.assign([15, 16]) == [3, 4]  # a single free slot does not split a new route: appended
    small = SlotTable(capacity=3)
    small.assign([1, 2])
    small.assign([3])
    small.assign([2])  # 2 becomes most recently used: 1 is the least
    assert small.assign([4]) == [0] and 1 not in small.slot_of
    assert sorted(small.assign([5, 6, 7, 8])) == [0, 1, 2, 3] and small.capacity == 4  # grows, never fails


def test_pool_equals_per_stack_compute_on_fragmented_and_permuted_slots():
    grouped, ref = _pair()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    for route in ROUTES:
        got, want = _logits(grouped, route, ids), _logits(ref, route, ids)
        assert torch.allclose(got, want, rtol=0, atol=1e-5), (route, (got - want).abs().max())
    groups = grouped.last_groups  # the last route {chat, code}: slots 0-1 and 4-5, two runs
    assert groups is not None and len(groups[0].runs) == 2
    with torch.no_grad(), grouped.ungated():  # all eight stacks, mixed-route rows as well
        assert torch.allclose(grouped.model(input_ids=ids).logits, ref_ungated(ref, ids), rtol=0, atol=1e-5)
    rows = [ROUTES[2], ROUTES[4]]
    with torch.no_grad(), grouped.routed_rows(rows):
        mixed = grouped.model(input_ids=ids).logits
    for b, route in enumerate(rows):
        assert torch.allclose(mixed[b], _logits(ref, route, ids[b : b + 1])[0], rtol=0, atol=1e-5)


def ref_ungated(ref: BrainStacks, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), ref.ungated():
        return ref.model(input_ids=ids).logits


def test_a_switch_between_seen_routes_copies_nothing():
    grouped, _ = _pair()
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(1))
    first = {}
    for route in ROUTES:
        first[str(route)] = _logits(grouped, route, ids)
    writes = _writes(grouped)
    assert writes == len(grouped.frozen_stacks) * len(grouped.keys)  # each stack copied once per projection
    for route in reversed(ROUTES):  # every switch now finds its stacks in the pool
        assert torch.equal(_logits(grouped, route, ids), first[str(route)])
    assert _writes(grouped) == writes


def test_removed_stacks_free_their_slots_and_mixed_dtypes_are_pooled_apart():
    stacks = BrainStacks.attach(make_tiny_llama(), StackConfig())
    add_random_stack(stacks, "chat", 1)
    add_random_stack(stacks, "code", 2)
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), stacks.ungated():
        stacks.model(input_ids=ids)
    code = stacks.stacks_for("code")[0]
    stacks.remove_frozen(code)  # released: the pools drop the stack
    assert all(code.uid not in p.holder for p in stacks._pools.values())
    assert code.uid not in next(iter(stacks._tables.values())).slot_of
    half = stacks.stacks_for("chat")[0]
    twin = BrainStacks.attach(make_tiny_llama(), StackConfig(group_frozen=False))
    add_random_stack(twin, "chat", 1)
    add_random_stack(stacks, "math", 3, router_scale=0.3)  # seeded router: the global RNG differs here
    add_random_stack(twin, "math", 3, router_scale=0.3)
    for s in (stacks.stacks_for("math")[0], twin.stacks_for("math")[0]):
        s.to(torch.bfloat16)
    assert half.dtype == torch.float32
    route = {"chat": 1.0, "math": 0.5}
    got, want = _logits(stacks, route, ids), _logits(twin, route, ids)
    assert len(stacks.last_groups) == 2  # one pool group per storage dtype
    assert torch.allclose(got, want, rtol=0, atol=1e-3)


def test_sparse_experts_equal_dense_on_random_stacks():
    torch.manual_seed(0)
    cfg = StackConfig()
    modules = [MoELoRA(64, 48, cfg).eval() for _ in range(5)]  # eval: no router noise in the reference
    for m in modules:
        torch.nn.init.normal_(m.B, std=0.2)
        torch.nn.init.normal_(m.router, std=0.5)  # spread logits: distinct top-k choices per token
    pools = {}
    for sparse in (False, True):
        pool = pools[sparse] = FrozenPool(modules[0], torch.float32, torch.device("cpu"), sparse=sparse)
        pool.sync(modules, [1, 2, 3, 4, 5], [3, 4, 0, 1, 2], 5)
    table = SlotTable()
    runs = table.runs([3, 4, 0, 1, 2])  # two runs, the route's stacks out of slot order
    for T in (1, 7, 50):
        x = torch.randn(T, 64)
        for weights in (torch.tensor([1.0, 0.5, 0.0, 0.3, 2.0]), torch.rand(T, 5)):  # shared, per token
            pos = [None if p is None else torch.tensor(p) for _, _, p, _ in runs]
            dense, sparse = (pools[s](x, runs, pools[s].run_weights(weights, runs, pos)) for s in (False, True))
            per_stack = sum(m(x) * (weights[..., i : i + 1] if weights.dim() == 2 else weights[i])
                            for i, m in enumerate(modules))
            assert torch.allclose(dense, per_stack, rtol=0, atol=1e-5), (dense - per_stack).abs().max()
            assert torch.allclose(sparse, dense, rtol=0, atol=1e-5), (sparse - dense).abs().max()
    # through the model, routes and a mixed-route batch
    ids = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(3))
    out = {}
    for compute in ("dense", "sparse"):
        stacks = BrainStacks.attach(make_tiny_llama(), StackConfig(frozen_compute=compute))
        for i, d in enumerate(DOMAINS):
            add_random_stack(stacks, d, 10 * (i + 1), rounds=2)
        out[compute] = [_logits(stacks, route, ids) for route in ROUTES]
        with torch.no_grad(), stacks.routed_rows([ROUTES[0], ROUTES[3], ROUTES[5]]):
            out[compute].append(stacks.model(input_ids=ids).logits)
        assert all(p.sparse == (compute == "sparse") for p in stacks._pools.values())
    for dense, sparse in zip(out["dense"], out["sparse"], strict=True):
        assert torch.allclose(dense, sparse, rtol=0, atol=1e-5), (dense - sparse).abs().max()
    with pytest.raises(ConfigError, match="frozen_compute must be one of"):
        StackConfig(frozen_compute="fast")


def test_pools_made_under_inference_mode_serve_training_and_new_stacks_later():
    stacks = BrainStacks.attach(make_tiny_llama(), StackConfig())
    add_random_stack(stacks, "chat", 1)
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode(), stacks.ungated():
        stacks.model(input_ids=ids)  # pools allocated and written here
    add_random_stack(stacks, "code", 2)
    with torch.no_grad(), stacks.ungated():
        stacks.model(input_ids=ids)  # a new stack written into the pools outside inference mode
    stacks.new_stack("math")
    stacks.model.train()
    with stacks.train_mode():
        loss = stacks.model(input_ids=ids, labels=ids).loss  # frozen pools on the autograd path
    loss.backward()
    assert all(p.grad is not None for p in stacks.trainable_parameters() if p.shape[-1] != 1)
