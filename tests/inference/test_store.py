"""StackStore: gated loading, LRU cache under a byte budget, checksums, bit-identical results."""

from __future__ import annotations

import builtins
import io
import json
import os
import random
from pathlib import Path

import pytest
import torch

from brainstacks_hooks import BrainStacks, ConfigError, StackLoadError, StackStateError
from brainstacks_hooks.inference import StackBudgetError, StackStore
from brainstacks_hooks.testing import add_random_stack, logits, make_tiny_llama

DOMAINS = ["chat", "code", "math"]


def _save(path: Path, domains: list[str], rounds: int = 1) -> Path:
    model = make_tiny_llama()
    stacks = BrainStacks.attach(model)
    for i, d in enumerate(domains):
        add_random_stack(stacks, d, (i + 1) * 10, b_scale=0.05, router_scale=1.0, rounds=rounds)
    stacks.save(path)
    return path


@pytest.fixture
def saved(tmp_path) -> Path:
    """chat (2 rounds), code (2 rounds), math (2 rounds)."""
    return _save(tmp_path / "run", DOMAINS, rounds=2)


@pytest.fixture
def many(tmp_path) -> Path:
    """12 one-stack domains."""
    return _save(tmp_path / "many", [f"d{i:02d}" for i in range(12)])


def _store(path: Path, **kwargs) -> tuple[torch.nn.Module, BrainStacks, StackStore]:
    model = make_tiny_llama()
    stacks = BrainStacks.attach(model)
    return model, stacks, StackStore(stacks, path, **kwargs)


def _reference(path: Path, weights: dict[str, float], batch) -> torch.Tensor:
    model = make_tiny_llama()
    stacks = BrainStacks.load(model, path)
    with stacks.routed(weights):
        return logits(model, batch)


def _one_stack_bytes(path: Path) -> int:
    """Parameter bytes of one stack of ``path`` (every stack of these directories has the same size)."""
    return next(iter(_store(path)[2])).nbytes


def _group_bytes(path: Path) -> int:
    """Bytes of the hooks' grouped copy of one stack (counted in the budget while its route is active)."""
    store = _store(path)[2]
    entry = next(iter(store))
    return store.route_nbytes({entry.domain: 1.0}) // len(store.stacks_of(entry.domain)) - entry.nbytes


def test_only_gated_on_stacks_are_loaded_and_attached(saved):
    _, stacks, store = _store(saved)
    assert stacks.domains == DOMAINS  # index domain order registered up front
    report = store.activate({"chat": 0.7, "code": 0.0})
    assert report.loaded == ("chat/r0", "chat/r1") and report.attached == ("chat/r0", "chat/r1")
    assert [s.domain for s in stacks.frozen_stacks] == ["chat", "chat"]
    assert store.resident == ["chat/r0", "chat/r1"]
    assert stacks.mode.weights == (("chat", 0.7),)
    s = store.stats()
    assert s.misses == 2 and s.hits == 0 and s.verified == 2
    assert s.resident_bytes == sum(st.nbytes() for st in stacks.frozen_stacks)
    report = store.activate({"math": 1.0})  # chat detached (stays cached), math loaded
    assert [s.domain for s in stacks.frozen_stacks] == ["math", "math"]
    assert report.loaded == ("math/r0", "math/r1") and store.attached == ["math/r0", "math/r1"]
    store.activate({})
    assert stacks.frozen_stacks == [] and store.attached == []


def test_cache_hit_reads_nothing(saved, tiny_batch):
    model, _, store = _store(saved)
    store.activate({"chat": 1.0, "math": 0.5})
    first = logits(model, tiny_batch)
    read = store.stats().bytes_read
    report = store.activate({"chat": 1.0, "math": 0.5})
    assert report.loaded == () and report.bytes_read == 0 and len(report.hits) == 4
    assert store.stats().bytes_read == read and store.stats().hits == 4
    assert torch.equal(logits(model, tiny_batch), first)


def test_budget_never_exceeded(many):
    one, group = _one_stack_bytes(many), _group_bytes(many)
    budget = 3 * (one + group) + one // 2
    model, stacks, store = _store(many, budget_bytes=budget)
    assert stacks.pool_capacity == store.pool_slots == 3  # pool slots for as many stacks as the budget holds
    rng = random.Random(0)
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    for _ in range(60):
        route = {d: rng.uniform(0.1, 1.0) for d in rng.sample(store.domains, rng.randint(1, 3))}
        store.activate(route)
        logits(model, batch)  # builds the grouped copy of the route
        held = store.stats().resident_bytes + stacks.group_cache_bytes()
        assert held <= store.device_bytes() <= budget  # stacks and grouped copy, all inside the budget
        assert sorted(s.domain for s in stacks.frozen_stacks) == sorted(route)
    assert store.stats().evictions > 0
    before = (store.attached, store.resident)
    with pytest.raises(StackBudgetError, match="grouped copy"):
        store.activate({d: 1.0 for d in store.domains[:4]})
    assert (store.attached, store.resident) == before  # a refused route changes nothing


def test_changing_the_budget_replans_the_pool_slots(many):
    one, group = _one_stack_bytes(many), _group_bytes(many)
    model, stacks, store = _store(many, budget_bytes=2 * (one + group))
    assert store.pool_slots == stacks.pool_capacity == 2
    route = {d: 1.0 for d in store.domains[:4]}
    with pytest.raises(StackBudgetError):
        store.activate(route)
    store.budget_bytes = None  # unlimited: no slot limit either
    assert store.pool_slots is None and stacks.pool_capacity is None and store.device_bytes() >= 0
    store.activate(route)
    logits(model, {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)})
    assert len(stacks.frozen_stacks) == 4
    store.budget_bytes = 5 * (one + group)
    assert store.pool_slots == stacks.pool_capacity == 5
    with pytest.raises(ConfigError, match="budget_bytes must be"):
        store.budget_bytes = -1


def test_frozen_stacks_the_store_does_not_own_still_compute(many, tiny_batch):
    one, group = _one_stack_bytes(many), _group_bytes(many)
    model = make_tiny_llama()
    stacks = BrainStacks.attach(model)
    add_random_stack(stacks, "own", 5)  # a frozen stack of this session, not in the store
    store = StackStore(stacks, many, budget_bytes=one + group)  # pool capacity: one slot
    assert store.pool_slots == 1
    store.activate({"d00": 1.0}, set_mode=False)
    with stacks.ungated():  # two frozen stacks in the plan: the capacity grows instead of failing the forward
        out = logits(model, tiny_batch)
    assert torch.isfinite(out).all() and len(stacks.frozen_stacks) == 2


def test_eviction_is_lru(many):
    one, group = _one_stack_bytes(many), _group_bytes(many)
    _, _, store = _store(many, budget_bytes=3 * one + 2 * group)  # 3 stacks + the copy of a 2-stack route
    for d in ("d00", "d01", "d02"):
        store.activate({d: 1.0})
    store.activate({"d00": 1.0})  # hit: d00 becomes most recently used
    assert store.resident == ["d01/r0", "d02/r0", "d00/r0"]
    assert store.activate({"d03": 1.0}).evicted == ("d01/r0",)
    assert store.activate({"d04": 1.0, "d00": 1.0}).evicted == ("d02/r0",)
    assert store.resident == ["d03/r0", "d00/r0", "d04/r0"]
    assert store.stats().evictions == 2


def test_logits_and_generation_identical_from_cache_disk_and_full_load(saved, tiny_batch):
    weights = {"chat": 0.7, "math": 0.3}
    want = _reference(saved, weights, tiny_batch)
    two = 2 * _one_stack_bytes(saved)
    model, stacks, store = _store(saved, budget_bytes=2 * two + 4 * _group_bytes(saved))  # room for two domains
    assert store.activate(weights).loaded  # from disk
    from_disk = logits(model, tiny_batch)
    gen_args = dict(input_ids=tiny_batch["input_ids"][:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    gen_disk = model.generate(**gen_args)
    store.activate({"code": 1.0, "math": 0.2})  # evicts chat
    assert store.activate(weights).loaded == ("chat/r0", "chat/r1")  # chat from disk again, math from cache
    mixed = logits(model, tiny_batch)
    assert store.activate(weights).loaded == ()  # all cached
    cached = logits(model, tiny_batch)
    gen_cached = model.generate(**gen_args)
    assert torch.equal(from_disk, want) and torch.equal(mixed, want) and torch.equal(cached, want)
    assert torch.equal(gen_disk, gen_cached)
    ref_model = make_tiny_llama()
    ref = BrainStacks.load(ref_model, saved)
    with ref.routed(weights):
        assert torch.equal(ref_model.generate(**gen_args), gen_cached)
    with store.routed({"code": 1.0}) as report:  # context form: previous mode restored afterwards
        assert report.attached == ("code/r0", "code/r1")
        assert torch.equal(logits(model, tiny_batch), _reference(saved, {"code": 1.0}, tiny_batch))
    assert stacks.mode.weights == (("chat", 0.7), ("math", 0.3))


def test_corrupt_file_names_it_and_store_keeps_serving(saved, tiny_batch):
    index = json.loads((saved / "brainstacks.json").read_text())
    bad = next(e for e in index["stacks"] if e["domain"] == "code")
    path = saved / bad["file"]
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(8)  # flip tensor bytes; the header stays valid
    path.write_bytes(bytes(data))
    model, stacks, store = _store(saved)
    store.activate({"chat": 1.0})
    with pytest.raises(StackLoadError) as err:
        store.activate({"chat": 1.0, "code": 1.0})
    assert path.name in str(err.value) and "'code'" in str(err.value) and "checksum" in str(err.value)
    assert store.attached == [] and stacks.frozen_stacks == []  # never a partial route
    store.activate({"math": 1.0})
    assert torch.equal(logits(model, tiny_batch), _reference_skip_code(saved, {"math": 1.0}, tiny_batch))
    assert store.activate({"chat": 1.0}).loaded == ()  # the cache survived the failure


def _reference_skip_code(path: Path, weights: dict[str, float], batch) -> torch.Tensor:
    """Reference logits without BrainStacks.load (which refuses the directory once a file is corrupt)."""
    model, _, store = _store(path)
    store.activate(weights)
    return logits(model, batch)


def test_file_changed_after_verification_is_rechecked(saved):
    _, _, store = _store(saved)
    store.activate({"chat": 1.0})
    store.clear()
    assert store.activate({"chat": 1.0}).loaded and store.stats().verified == 2  # unchanged: not re-hashed
    store.clear()
    path = store.stacks_of("chat")[0].path
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StackLoadError, match="checksum"):
        store.activate({"chat": 1.0})


def test_mismatched_file_is_refused(saved):
    index = json.loads((saved / "brainstacks.json").read_text())
    chat = next(e for e in index["stacks"] if e["domain"] == "chat")
    code = next(e for e in index["stacks"] if e["domain"] == "code")
    chat["file"], chat["sha256"] = code["file"], code["sha256"]  # chat/r0 points at a code stack
    (saved / "brainstacks.json").write_text(json.dumps(index))
    _, _, store = _store(saved)
    with pytest.raises(StackLoadError, match="index says chat/r0"):
        store.activate({"chat": 1.0})
    store.activate({"math": 1.0})


def test_missing_file_fails_only_its_domain(saved):
    _, _, store = _store(saved)
    store.stacks_of("code")[1].path.unlink()
    with pytest.raises(StackLoadError, match="code/r1"):
        store.activate({"code": 1.0})
    assert store.activate({"chat": 1.0, "math": 1.0}).attached == ("chat/r0", "chat/r1", "math/r0", "math/r1")


def test_routing_by_name_whatever_the_index_order(saved, tiny_batch):
    index = json.loads((saved / "brainstacks.json").read_text())
    shuffled = saved.parent / "shuffled"
    shuffled.mkdir()
    for f in saved.glob("*.safetensors"):
        (shuffled / f.name).symlink_to(f)
    index["stacks"] = list(reversed(index["stacks"]))
    (shuffled / "brainstacks.json").write_text(json.dumps(index))
    model, stacks, store = _store(shuffled)
    assert stacks.domains == DOMAINS
    for weights in ({"code": 1.0}, {"math": 0.4}, {"chat": 0.7, "code": 0.2}):
        report = store.activate(weights)
        assert {n.split("/")[0] for n in report.attached} == set(weights)
        got = logits(model, tiny_batch)
        assert torch.equal(got, _reference(shuffled, weights, tiny_batch))  # same index, same order
        # the original index attaches in another order: same stacks, only the float summation order differs
        assert torch.allclose(got, _reference(saved, weights, tiny_batch), rtol=0, atol=1e-4)


def test_host_tier_promotes_without_disk_read(many, tiny_batch):
    one = _one_stack_bytes(many)
    model, _, store = _store(many, budget_bytes=one + _group_bytes(many), host_budget_bytes=2 * one)
    store.activate({"d00": 1.0})
    want = logits(model, tiny_batch)
    store.activate({"d01": 1.0})
    store.activate({"d02": 1.0})
    assert store.host_resident == ["d00/r0", "d01/r0"]
    read = store.stats().bytes_read
    report = store.activate({"d00": 1.0})
    assert report.host_hits == ("d00/r0",) and store.stats().bytes_read == read
    assert torch.equal(logits(model, tiny_batch), want)
    store.activate({"d03": 1.0})  # d00 back to host, host tier drops its LRU (d01)
    assert store.host_resident == ["d02/r0", "d00/r0"] and store.stats().host_evictions == 1


def test_prefetch_on_cpu_loads_without_attaching(saved):
    _, stacks, store = _store(saved)
    assert store.prefetch({"code": 1.0}) == ["code/r0", "code/r1"]
    assert stacks.frozen_stacks == [] and store.resident == ["code/r0", "code/r1"]
    report = store.activate({"code": 1.0})
    assert report.loaded == () and report.hits == ("code/r0", "code/r1")
    assert store.stats().prefetched == 2


def test_index_read_once(saved, monkeypatch):
    opened = []  # every open() of the index file, whoever reads it
    real_open = io.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and os.path.basename(os.fsdecode(file)) == "brainstacks.json":
            opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)  # pathlib's read_text / open
    _, stacks, store = _store(saved)
    assert len(opened) == 1  # the constructor read it once
    monkeypatch.setattr(Path, "iterdir", lambda self: pytest.fail("activate rescanned a directory"))
    (saved / "brainstacks.json").unlink()  # activate works without it: nothing reads it again
    store.activate({"code": 1.0})
    assert [s.domain for s in stacks.frozen_stacks] == ["code", "code"]
    store.activate({"chat": 1.0, "math": 0.5})
    assert sorted({s.domain for s in stacks.frozen_stacks}) == ["chat", "math"]
    assert len(opened) == 1 and store.stats().misses == 6


def test_invalid_routes(saved):
    _, stacks, store = _store(saved)
    with pytest.raises(ConfigError, match="unknown domains"):
        store.activate({"legal": 1.0})
    with pytest.raises(ConfigError, match=">= 0"):
        store.activate({"chat": -0.1})
    with pytest.raises(ConfigError, match=">= 0"):
        store.activate({"chat": float("nan")})
    assert stacks.frozen_stacks == [] and store.stats().misses == 0


def test_refuses_stacks_already_holding_store_domains(saved):
    model = make_tiny_llama()
    stacks = BrainStacks.load(model, saved)
    with pytest.raises(StackStateError, match="already holds"):
        StackStore(stacks, saved)


@pytest.mark.parametrize("mutation", ["shape", "missing_key"])
def test_strict_tensor_checks_with_a_valid_checksum(saved, mutation):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from brainstacks_hooks.utils.io import sha256_file

    index = json.loads((saved / "brainstacks.json").read_text())
    entry = next(e for e in index["stacks"] if e["domain"] == "math")
    path = saved / entry["file"]
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    if mutation == "shape":
        tensors[key] = tensors[key][..., :-1].contiguous()
    else:
        del tensors[key]
    save_file(tensors, str(path), metadata=meta)
    entry["sha256"] = sha256_file(path)
    (saved / "brainstacks.json").write_text(json.dumps(index))
    _, _, store = _store(saved)
    with pytest.raises(StackLoadError, match=key.replace(".", r"\.")) as err:
        store.activate({"math": 1.0})
    assert "'math'" in str(err.value) and path.name in str(err.value)
    store.activate({"chat": 1.0})


def test_default_budget_is_bounded_and_documented(saved):
    from brainstacks_hooks.inference.records import default_budget_bytes

    _, _, store = _store(saved)
    assert store.budget_bytes == pytest.approx(default_budget_bytes("cpu"), rel=0.2)
    assert 0 < store.budget_bytes < os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert _store(saved, budget_bytes=None)[2].budget_bytes is None  # unlimited only when asked for
    with pytest.raises(ConfigError, match="budget_bytes"):
        _store(saved, budget_bytes="lots")


def _offload_store(saved, device: str):
    from brainstacks_hooks.stacks.config import StackConfig

    model = make_tiny_llama().to(device)
    stacks = BrainStacks.attach(model, StackConfig(offload_frozen=True))
    return model, stacks, StackStore(stacks, saved, budget_bytes=None)


def test_offload_frozen_counts_no_grouped_copy_on_the_device(saved, tiny_batch):
    model, _, store = _offload_store(saved, "cpu")
    assert store.route_nbytes({"chat": 1.0}) == 2 * _one_stack_bytes(saved)  # nothing grouped on the device
    store.activate({"chat": 1.0})
    assert torch.equal(logits(model, tiny_batch), _reference(saved, {"chat": 1.0}, tiny_batch))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_offload_frozen_keeps_stacks_and_grouped_copies_in_host_ram(saved, tiny_batch):
    model, stacks, store = _offload_store(saved, "cuda")
    store.activate({"chat": 1.0})
    logits(model, {k: v.cuda() for k, v in tiny_batch.items()})
    groups = list(stacks._pools.values())
    assert groups and all(g.w_in.device.type == "cpu" for g in groups)
    assert all(p.device.type == "cpu" for s in stacks.frozen_stacks for p in s.parameters())
