"""apply_gating: strict threshold, chat floor, gap flag, gated-off domains absent."""

from __future__ import annotations

import pytest
import torch

from brainstacks_hooks.router.gating import apply_gating, route_features, subset_route
from brainstacks_hooks.router.model import MetaRouter
from brainstacks_hooks.testing import CharTokenizer

FLOOR, THR = 0.20, 0.12


def test_threshold_is_strict_and_weights_are_continuous():
    route = apply_gating({"chat": 0.9, "code": 0.12, "math": 0.1201, "medical": 0.0}, FLOOR, "chat", THR)
    assert route.gated_on == ["chat", "math"]
    assert route.weights == {"chat": 0.9, "math": pytest.approx(0.1201)}
    assert "code" not in route.weights and "medical" not in route.weights  # exactly absent
    assert route.scores["code"] == 0.12 and not route.gap


def test_chat_floor_raises_chat_and_keeps_raw_score():
    route = apply_gating({"chat": 0.05, "math": 0.7}, FLOOR, "chat", THR)
    assert route.weights == {"chat": FLOOR, "math": 0.7}
    assert route.scores["chat"] == 0.05
    # A chat score above the floor is kept as is.
    assert apply_gating({"chat": 0.6, "math": 0.0}, FLOOR, "chat", THR).weights == {"chat": 0.6}


def test_gap_uses_raw_scores_before_the_floor():
    route = apply_gating({"chat": 0.01, "code": 0.12, "math": 0.0}, FLOOR, "chat", THR)
    assert route.gap
    assert route.weights == {"chat": FLOOR}  # chat still runs at the floor
    assert not apply_gating({"chat": 0.13, "code": 0.0}, FLOOR, "chat", THR).gap


def test_no_chat_domain_means_no_floor():
    route = apply_gating({"code": 0.05, "math": 0.05}, FLOOR, "chat", THR)
    assert route.weights == {} and route.gated_on == [] and route.gap
    assert apply_gating({"chat": 0.0, "x": 0.0}, FLOOR, None, THR).weights == {}


def test_floor_not_above_threshold_does_not_turn_chat_on():
    assert apply_gating({"chat": 0.0, "math": 0.5}, 0.1, "chat", THR).weights == {"math": 0.5}
    assert apply_gating({"chat": 0.0, "math": 0.5}, 0.12, "chat", THR).weights == {"math": 0.5}


def test_invalid_scores_raise():
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        apply_gating({"a": float("nan")}, FLOOR, "chat", THR)
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        apply_gating({"a": -0.1}, FLOOR, "chat", THR)


def test_subset_route_is_the_oracle_view_of_gating():
    domains = ["chat", "code", "math"]
    assert subset_route([], domains, FLOOR, "chat", THR).weights == {"chat": FLOOR}
    assert subset_route(["math"], domains, FLOOR, "chat", THR).weights == {"chat": FLOOR, "math": 1.0}
    assert subset_route(["chat"], domains, FLOOR, "chat", THR).weights == {"chat": 1.0}
    assert subset_route(["code"], ["code", "math"], FLOOR, "chat", THR).weights == {"code": 1.0}
    with pytest.raises(ValueError, match="unknown domains in subset"):
        subset_route(["nope"], domains, FLOOR, "chat", THR)


def test_route_features_uses_router_probabilities():
    torch.manual_seed(0)
    router = MetaRouter(8, ["chat", "math"], hidden=8).eval()
    feats = torch.randn(3, 4, 8)
    routes = route_features(router, feats, None, FLOOR, "chat", THR)
    probs = router.predict(feats)
    assert len(routes) == 3
    for route, p in zip(routes, probs):
        expected = apply_gating({"chat": p[0].item(), "math": p[1].item()}, FLOOR, "chat", THR)
        assert route.weights == expected.weights and route.gap == expected.gap
        assert "router_ms" in route.timings


def test_route_prompts_uses_the_stored_recipe_and_gating(tiny_llama, tmp_path):
    from brainstacks_hooks.router.config import FeatureRecipe, RouterConfig
    from brainstacks_hooks.router.features import compute_features
    from brainstacks_hooks.router.gating import route_prompts
    from brainstacks_hooks.router.serialization import load_router, save_router

    torch.manual_seed(0)
    cfg = RouterConfig(hidden=8, seq_len=6, chat_floor=0.3, gate_threshold=0.4)
    router = MetaRouter(32, ["chat", "math"], hidden=8)
    save_router(router, cfg, tmp_path, feature_recipe=cfg.feature_recipe(), base_fingerprint={"m": 1})
    loaded, meta = load_router(tmp_path)
    prompts = ["What is 2 + 2? Please explain in detail.", "hello"]
    routes = route_prompts(tiny_llama, CharTokenizer(), loaded, meta, prompts)
    feats, mask = compute_features(
        tiny_llama, CharTokenizer(), prompts, FeatureRecipe(seq_len=6), progress=False
    )
    assert feats.shape[1] == 6  # the stored seq_len, not a default
    expected = route_features(loaded, feats, mask, 0.3, "chat", 0.4)
    assert [r.weights for r in routes] == [r.weights for r in expected]
    assert all("features_ms" in r.timings and "router_ms" in r.timings for r in routes)
