"""Router features: recipe arithmetic, base-only under stacks, truncation, and the disk cache."""

from __future__ import annotations

import json

import pytest
import torch

from brainstacks_hooks import BrainStacks, StackConfig
from brainstacks_hooks.errors import StackLoadError
from brainstacks_hooks.router.config import FeatureRecipe
from brainstacks_hooks.router.features import (
    FeatureCache,
    base_fingerprint,
    compute_features,
    encode_prompts,
    prompt_key,
)
from brainstacks_hooks.testing import CharTokenizer

PROMPTS = ["Write a function", ("Add the numbers", "2 and 3"), {"instruction": "hi"}]
FP_A = {"model": "tiny", "config_hash": "A"}
FP_B = {"model": "tiny", "config_hash": "B"}


def _count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda m, a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_features_follow_the_recipe(tiny_llama):
    tok, recipe = CharTokenizer(), FeatureRecipe(seq_len=64)
    feats, mask = compute_features(tiny_llama, tok, PROMPTS, recipe, batch_size=2, progress=False)
    ids = encode_prompts(tok, PROMPTS, recipe)
    lengths = [len(x) for x in ids]
    assert feats.dtype == torch.float16 and feats.shape == (3, max(lengths), 32)
    assert mask.sum(dim=1).tolist() == lengths
    for i, n in enumerate(lengths):
        with torch.no_grad():
            hs = tiny_llama(input_ids=torch.tensor([ids[i]]), output_hidden_states=True).hidden_states
        expected = 0.45 * hs[len(hs) // 2][0] + 0.55 * hs[-1][0]  # [n, D]
        assert torch.allclose(feats[i, :n].float(), expected, atol=2e-3, rtol=1e-2)
        assert (feats[i, n:] == 0).all()


def test_prompts_are_truncated_to_seq_len(tiny_llama):
    recipe = FeatureRecipe(seq_len=8)
    feats, mask = compute_features(tiny_llama, CharTokenizer(), ["x" * 50], recipe, progress=False)
    assert feats.shape[1] == 8 and mask.sum() == 8


def test_features_are_base_only_with_stacks_attached(tiny_llama, add_random_stack):
    tok, recipe = CharTokenizer(), FeatureRecipe(seq_len=64)
    bare, _ = compute_features(tiny_llama, tok, PROMPTS, recipe, progress=False)
    bs = BrainStacks.attach(tiny_llama, StackConfig())
    add_random_stack(bs, "chat", 1)
    with_stacks, _ = compute_features(bs, tok, PROMPTS, recipe, progress=False)
    assert torch.equal(bare, with_stacks)
    # Passing the bare model that has stacks attached is also base-only, whatever the current mode.
    with bs.ungated():
        via_model, _ = compute_features(tiny_llama, tok, PROMPTS, recipe, progress=False)
    assert torch.equal(bare, via_model)
    # Sanity: the stack does change the model outside base_only.
    ids = torch.tensor([encode_prompts(tok, PROMPTS[:1], recipe)[0]])
    with torch.no_grad(), bs.ungated():
        on = bs.model(input_ids=ids).logits
    with torch.no_grad(), bs.base_only():
        off = bs.model(input_ids=ids).logits
    assert not torch.allclose(on, off)
    assert base_fingerprint(bs) == bs.fingerprint_dict()


def test_cache_hit_miss_and_invalidation(tiny_llama, tmp_path):
    tok, recipe = CharTokenizer(), FeatureRecipe(seq_len=64)
    forwards = _count_forwards(tiny_llama)
    cache = FeatureCache(tmp_path)
    f1, m1 = cache.get_or_compute(tiny_llama, tok, PROMPTS, recipe, fingerprint=FP_A, progress=False)
    assert cache.misses == 3 and cache.hits == 0 and forwards[0] > 0
    ref, _ = compute_features(tiny_llama, tok, PROMPTS, recipe, progress=False)
    assert torch.equal(f1, ref)

    # Hit: no forward pass at all, identical tensors.
    n = forwards[0]
    keys = [prompt_key(x) for x in encode_prompts(tok, PROMPTS, recipe)]
    assert cache.lookup(keys, FP_A, recipe) == [True, True, True]
    assert cache.lookup(keys, FP_B, recipe) == [False, False, False]
    f2, m2 = cache.get_or_compute(tiny_llama, tok, PROMPTS, recipe, fingerprint=FP_A, progress=False)
    assert forwards[0] == n and cache.hits == 3
    assert torch.equal(f1, f2) and torch.equal(m1, m2)

    # A new prompt: only it is computed; order follows the request.
    more = [PROMPTS[2], "a brand new prompt", PROMPTS[0]]
    f3, m3 = cache.get_or_compute(tiny_llama, tok, more, recipe, fingerprint=FP_A, progress=False)
    assert forwards[0] == n + 1 and cache.misses == 4
    assert torch.equal(f3[0, : int(m3[0].sum())], f1[2, : int(m1[2].sum())])

    # A different base fingerprint (or recipe) is a miss.
    cache.get_or_compute(tiny_llama, tok, PROMPTS, recipe, fingerprint=FP_B, progress=False)
    assert cache.misses == 7
    cache.get_or_compute(
        tiny_llama,
        tok,
        PROMPTS,
        FeatureRecipe(seq_len=64, mid_weight=0.5, last_weight=0.5),
        fingerprint=FP_A,
        progress=False,
    )
    assert cache.misses == 10
    assert len(list(tmp_path.glob("fp-*"))) == 3
    assert len(cache.prune(FP_A, recipe)) == 2 and len(list(tmp_path.glob("fp-*"))) == 1


def test_corrupt_cache_chunk_raises(tiny_llama, tmp_path):
    tok, recipe = CharTokenizer(), FeatureRecipe(seq_len=64)
    cache = FeatureCache(tmp_path)
    cache.get_or_compute(tiny_llama, tok, PROMPTS, recipe, fingerprint=FP_A, progress=False)
    ns = cache.namespace(FP_A, recipe)
    chunk = next(ns.glob("chunk-*.safetensors"))
    chunk.write_bytes(chunk.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(StackLoadError, match="checksum"):
        cache.get_or_compute(tiny_llama, tok, PROMPTS, recipe, fingerprint=FP_A, progress=False)
    index = json.loads((ns / "index.json").read_text())
    (ns / "index.json").write_text(json.dumps(dict(index, recipe_hash="other")))
    with pytest.raises(StackLoadError):
        cache.lookup(["x"], FP_A, recipe)
