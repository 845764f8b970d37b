"""Save/load: bit-identical round trip, strict loading, model untouched on failure."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from brainstacks_hooks import BrainStacks, FingerprintMismatch, StackConfig, StackLoadError
from brainstacks_hooks.testing import add_random_stack, logits, make_tiny_llama
from brainstacks_hooks.utils.io import sha256_file


@pytest.fixture
def saved(tmp_path, tiny_batch):
    model = make_tiny_llama()
    stacks = BrainStacks.attach(model)
    add_random_stack(stacks, "chat", 10, b_scale=0.05, router_scale=1.0, rounds=2)
    add_random_stack(stacks, "code", 20, b_scale=0.05, router_scale=1.0)
    stacks.save(tmp_path / "run")
    out = {}
    for mode in ("ungated", "prefix:chat", "isolated:code"):
        kind, _, dom = mode.partition(":")
        with stacks.using(kind, dom or None):
            out[mode] = logits(model, tiny_batch)
    return tmp_path / "run", out


def test_save_load_gives_bit_identical_logits(saved, tiny_batch):
    path, expected = saved
    model = make_tiny_llama()
    stacks = BrainStacks.load(model, path)
    assert stacks.domains == ["chat", "code"] and len(stacks.frozen_stacks) == 3
    assert all(s.frozen and not any(p.requires_grad for p in s.parameters()) for s in stacks.frozen_stacks)
    for mode, want in expected.items():
        kind, _, dom = mode.partition(":")
        with stacks.using(kind, dom or None):
            assert torch.equal(logits(model, tiny_batch), want), mode


def _assert_untouched(model, keys):
    assert not getattr(model, "_brainstacks_attached", False)
    assert set(model.state_dict()) == keys
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def _rewrite(path, mutate):
    """Rewrite a stack file through ``mutate(tensors, meta)`` and fix its checksum in the index."""
    index = json.loads((path / "brainstacks.json").read_text())
    entry = index["stacks"][0]
    f = path / entry["file"]
    from safetensors import safe_open

    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    tensors = load_file(str(f))
    mutate(tensors, meta)
    save_file(tensors, str(f), metadata=meta)
    entry["sha256"] = sha256_file(f)
    (path / "brainstacks.json").write_text(json.dumps(index))


def _missing_key(t, m):
    del t["layers.0.q_proj.A"]


def _extra_key(t, m):
    t["layers.9.q_proj.A"] = torch.zeros(1)


def _bad_shape(t, m):
    t["layers.0.q_proj.B"] = torch.zeros(4, 32, 8)


def _bad_dtype(t, m):
    t["layers.0.q_proj.B"] = t["layers.0.q_proj.B"].half()


def _bad_config(t, m):
    cfg = json.loads(m["config"])
    cfg["rank"] = 8
    m["config"] = json.dumps(cfg)


@pytest.mark.parametrize(("mutate", "match"), [
    (_missing_key, r"missing \['layers\.0\.q_proj\.A'\]"),
    (_extra_key, r"unexpected \['layers\.9\.q_proj\.A'\]"),
    (_bad_shape, r"layers\.0\.q_proj\.B has shape"),
    (_bad_dtype, r"layers\.0\.q_proj\.B has dtype"),
    (_bad_config, "rank: file 8 != attached 16"),
])
def test_bad_stack_file_raises_and_leaves_model_untouched(saved, mutate, match):
    path, _ = saved
    _rewrite(path, mutate)
    model = make_tiny_llama()
    keys = set(model.state_dict())
    with pytest.raises(StackLoadError, match=match):
        BrainStacks.load(model, path)
    _assert_untouched(model, keys)


def test_checksum_mismatch_and_missing_files(saved):
    path, _ = saved
    model = make_tiny_llama()
    keys = set(model.state_dict())
    stack_file = path / json.loads((path / "brainstacks.json").read_text())["stacks"][0]["file"]
    data = bytearray(stack_file.read_bytes())
    data[-5] ^= 0xFF
    stack_file.write_bytes(bytes(data))
    with pytest.raises(StackLoadError, match="checksum"):
        BrainStacks.load(model, path)
    stack_file.unlink()
    with pytest.raises(StackLoadError, match="not found"):
        BrainStacks.load(model, path)
    with pytest.raises(StackLoadError, match="not found"):
        BrainStacks.load(model, path / "nowhere")
    (path / "brainstacks.json").write_text("{not json")
    with pytest.raises(StackLoadError, match="not valid JSON"):
        BrainStacks.load(model, path)
    _assert_untouched(model, keys)


def test_fingerprint_mismatch_even_when_shapes_match(saved):
    path, _ = saved
    other = make_tiny_llama(rope_theta=1234.0)  # same shapes, different architecture config
    keys = set(other.state_dict())
    with pytest.raises(FingerprintMismatch, match="config hash"):
        BrainStacks.load(other, path)
    _assert_untouched(other, keys)
    stacks = BrainStacks.load(other, path, allow_fingerprint_mismatch=True)  # explicit override warns
    assert len(stacks.frozen_stacks) == 3
    wider = make_tiny_llama(intermediate_size=48)
    with pytest.raises(FingerprintMismatch, match=r"down_proj: shape \[64, 32\] != \[48, 32\]"):
        BrainStacks.load(wider, path, allow_fingerprint_mismatch=True)  # shapes differ: never allowed


def test_frozen_dtype_storage(tmp_path, tiny_batch):
    model = make_tiny_llama()
    stacks = BrainStacks.attach(model, StackConfig(frozen_dtype="bfloat16"))
    add_random_stack(stacks, "a", 10, b_scale=0.05, router_scale=1.0)
    assert stacks.frozen_stacks[0].dtype == torch.bfloat16
    with stacks.ungated():
        want = logits(model, tiny_batch)
    stacks.save(tmp_path)
    model2 = make_tiny_llama()
    again = BrainStacks.load(model2, tmp_path)
    assert again.frozen_stacks[0].dtype == torch.bfloat16
    with again.ungated():
        assert torch.equal(logits(model2, tiny_batch), want)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda ix: ix["stacks"][0].update(file="../../outside.safetensors"), "outside"),
    (lambda ix: ix["stacks"][0].update(file="/etc/passwd"), "outside"),
    (lambda ix: ix["stacks"].append(dict(ix["stacks"][0])), "listed twice"),
    (lambda ix: ix["stacks"][0].update(dtype="no_such_dtype"), "unknown dtype"),
    (lambda ix: ix["stacks"][0].pop("sha256"), "malformed stack entry"),
    (lambda ix: ix.update(format_version=999), "format version"),
    (lambda ix: ix.pop("domain_order"), "malformed index"),
])
def test_bad_index_is_rejected_by_both_loaders(saved, edit, match):
    """One index reader (`read_stack_index`) serves BrainStacks.load and the StackStore: same checks, same errors."""
    from brainstacks_hooks.inference.store import StackStore

    path, _ = saved
    index = json.loads((path / "brainstacks.json").read_text())
    edit(index)
    (path / "brainstacks.json").write_text(json.dumps(index))
    model = make_tiny_llama()
    keys = set(model.state_dict())
    with pytest.raises(StackLoadError, match=match):
        BrainStacks.load(model, path)
    _assert_untouched(model, keys)
    stacks = BrainStacks.attach(model)
    with pytest.raises(StackLoadError, match=match):
        StackStore(stacks, path)


def test_the_same_tensors_and_metadata_always_give_the_same_file(tmp_path):
    """safetensors writes metadata from a hash map in a varying order; the toolkit's files (whose sha256 is the
    identity of a stack or router) must not change with it."""
    from safetensors import safe_open

    from brainstacks_hooks.utils.io import save_safetensors_atomic

    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}
    meta = {"kind": "brainstacks_stack", "format": "pt", "domain": "chat", "round": "1", "é": "ü"}
    shas = {save_safetensors_atomic(tensors, tmp_path / f"s{i}.safetensors", metadata=meta) for i in range(16)}
    assert len(shas) == 1
    with safe_open(str(tmp_path / "s0.safetensors"), framework="pt") as f:
        assert f.metadata() == meta
        assert torch.equal(f.get_tensor("w"), tensors["w"]) and torch.equal(f.get_tensor("b"), tensors["b"])
