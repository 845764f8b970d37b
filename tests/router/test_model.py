"""MetaRouter: shapes, exact masking, temperature clamp, sigmoid independence."""

from __future__ import annotations

import pytest
import torch

from brainstacks_hooks.errors import ConfigError
from brainstacks_hooks.router.model import MetaRouter, masked_attention_pool

DOMAINS = ["chat", "code", "math"]


def _router(**kw) -> MetaRouter:
    torch.manual_seed(0)
    return MetaRouter(token_dim=24, domains=DOMAINS, hidden=16, **kw).eval()


def test_forward_and_predict_shapes():
    router = _router()
    feats = torch.randn(5, 7, 24)
    mask = torch.ones(5, 7, dtype=torch.long)
    logits = router(feats, mask)
    assert logits.shape == (5, 3)
    probs = router.predict(feats, mask)
    assert probs.shape == (5, 3)
    assert torch.allclose(probs, torch.sigmoid(logits))
    scores = router.predict_scores(feats, mask)
    assert len(scores) == 5 and list(scores[0]) == DOMAINS


def test_fp16_features_are_accepted():
    router = _router()
    feats = torch.randn(2, 4, 24)
    assert torch.allclose(router(feats.half()), router(feats.half().float()))


def test_padding_does_not_change_logits():
    router = _router()
    feats = torch.randn(3, 6, 24)
    lengths = torch.tensor([6, 3, 1])
    mask = (torch.arange(6)[None, :] < lengths[:, None]).long()  # [3, 6]
    # Garbage (even huge values) in padded positions and extra padding columns must not matter.
    dirty = feats.clone()
    dirty[mask == 0] = 1e4
    padded = torch.cat([dirty, torch.full((3, 5, 24), -7e3)], dim=1)  # [3, 11, 24]
    padded_mask = torch.cat([mask, torch.zeros(3, 5, dtype=torch.long)], dim=1)
    ref = router(feats, mask)
    assert torch.allclose(router(dirty, mask), ref, atol=1e-6)
    assert torch.allclose(router(padded, padded_mask), ref, atol=1e-6)
    # Each row alone, unpadded, gives the same logits as in the padded batch.
    for i, n in enumerate(lengths.tolist()):
        alone = router(feats[i : i + 1, :n], None)
        assert torch.allclose(alone, ref[i : i + 1], atol=1e-5)


def test_all_padding_row_is_finite():
    router = _router()
    logits = router(torch.randn(2, 4, 24), torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]))
    assert torch.isfinite(logits).all()


def test_attention_pool_weights_sum_to_one_and_scaling():
    torch.manual_seed(1)
    tokens = torch.randn(2, 5, 8)
    queries = torch.randn(3, 8)
    mask = torch.ones(2, 5)
    out = masked_attention_pool(tokens, queries, mask)
    manual = torch.softmax(torch.einsum("bsh,qh->bqs", tokens, queries) / 8**0.5, dim=-1) @ tokens
    assert torch.allclose(out, manual, atol=1e-6)


def test_temperature_is_clamped():
    router = _router(temp_clamp=(0.3, 3.0))
    assert router.temperature().item() == pytest.approx(1.0)
    with torch.no_grad():
        router.log_temperature.fill_(10.0)
    assert router.temperature().item() == pytest.approx(3.0)
    with torch.no_grad():
        router.log_temperature.fill_(-10.0)
    assert router.temperature().item() == pytest.approx(0.3)
    feats = torch.randn(2, 3, 24)
    with torch.no_grad():
        router.log_temperature.fill_(0.0)
        base = router(feats)
        router.log_temperature.fill_(10.0)
        assert torch.allclose(router(feats), base / 3.0, atol=1e-6)


def test_predict_restores_training_mode_and_is_deterministic():
    router = _router(dropout=0.5).train()
    feats = torch.randn(4, 3, 24)
    a, b = router.predict(feats), router.predict(feats)
    assert torch.equal(a, b)
    assert router.training


def test_loss_margin_penalty():
    router = _router()
    logits = torch.zeros(2, 3)  # sigmoid 0.5: maximal penalty 0.3
    total, bce, pen = router.loss(logits, torch.ones(2, 3), margin_coef=0.05, margin=0.3)
    assert pen.item() == pytest.approx(0.05 * 0.3)
    assert total.item() == pytest.approx(bce.item() + pen.item())
    confident = torch.full((2, 3), 10.0)
    assert router.loss(confident, torch.ones(2, 3), 0.05, 0.3)[2].item() == 0.0


def test_bad_inputs():
    with pytest.raises(ConfigError, match="at least one domain"):
        MetaRouter(8, [])
    with pytest.raises(ConfigError, match="duplicate domain names"):
        MetaRouter(8, ["a", "a"])
    router = _router()
    with pytest.raises(ValueError, match="features must be"):
        router(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="attention_mask must be"):
        router(torch.randn(2, 3, 24), torch.ones(2, 4))


def test_parameter_count_matches_reference_scale():
    shared = MetaRouter(token_dim=3840, domains=["a", "b", "c", "d", "e"], per_domain_head=False)
    assert sum(p.numel() for p in shared.parameters()) == 2_761_730  # the reference router's count (paper: "~2M")
    router = MetaRouter(token_dim=3840, domains=["a", "b", "c", "d", "e"])  # one head per domain: 4 more heads
    assert sum(p.numel() for p in router.parameters()) == 2_761_730 + 4 * (512 + 1)
