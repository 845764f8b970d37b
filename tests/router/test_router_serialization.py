"""save_router / load_router: bit-identical round trip, strict failures, fingerprint check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from brainstacks_hooks.errors import ConfigError, FingerprintMismatch, StackLoadError
from brainstacks_hooks.router.config import FeatureRecipe, RouterConfig
from brainstacks_hooks.router.model import MetaRouter
from brainstacks_hooks.router.serialization import (
    ROUTER_META_FILE,
    ROUTER_WEIGHTS_FILE,
    load_router,
    save_router,
)

FP = {"model": "tiny", "config_hash": "abc", "targets": {"layers.0.q_proj": [8, 8]}, "revision": None}


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, MetaRouter]:
    torch.manual_seed(0)
    router = MetaRouter(12, ["chat", "code", "math"], hidden=16).eval()
    with torch.no_grad():
        router.log_temperature.fill_(0.4)
    cfg = RouterConfig(hidden=16, seq_len=64)
    save_router(
        router, cfg, tmp_path / "r", feature_recipe=cfg.feature_recipe().to_dict(), base_fingerprint=FP
    )
    return tmp_path / "r", router


def test_round_trip_is_bit_identical(saved):
    path, router = saved
    loaded, meta = load_router(path, expected_fingerprint=json.loads(json.dumps(FP)))
    feats, mask = torch.randn(4, 5, 12), torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 5, [1] + [0] * 4])
    assert torch.equal(loaded.predict(feats, mask), router.predict(feats, mask))
    assert loaded.domains == ["chat", "code", "math"] and not loaded.training
    assert meta["feature_recipe"] == FeatureRecipe(seq_len=64).to_dict()
    assert meta["chat_floor"] == 0.2 and meta["gate_threshold"] == 0.12 and meta["chat_domain"] == "chat"
    assert meta["base_fingerprint"] == FP
    assert RouterConfig.from_dict(meta["router_config"]).seq_len == 64


def test_fingerprint_mismatch_names_keys(saved):
    path, _ = saved
    other = dict(FP, config_hash="xyz", targets={"layers.0.q_proj": [8, 16]})
    with pytest.raises(FingerprintMismatch, match="config_hash") as err:
        load_router(path, expected_fingerprint=other)
    assert "targets.layers.0.q_proj" in str(err.value)
    load_router(path)  # no expected fingerprint: no check


def test_recipe_seq_len_must_match_config(tmp_path):
    router = MetaRouter(4, ["a"], hidden=4)
    with pytest.raises(ConfigError):
        save_router(
            router, RouterConfig(seq_len=256), tmp_path, feature_recipe={"seq_len": 96}, base_fingerprint={}
        )


def _rewrite_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write new weights and update the checksum, so only the key/shape checks can catch the change."""
    from brainstacks_hooks.utils.io import sha256_file

    save_file(tensors, str(path / ROUTER_WEIGHTS_FILE))
    meta = json.loads((path / ROUTER_META_FILE).read_text())
    meta["sha256"] = sha256_file(path / ROUTER_WEIGHTS_FILE)
    (path / ROUTER_META_FILE).write_text(json.dumps(meta))


def test_missing_tensor_raises(saved):
    path, _ = saved
    t = load_file(str(path / ROUTER_WEIGHTS_FILE))
    del t["head_bias"]
    _rewrite_weights(path, t)
    with pytest.raises(StackLoadError, match="missing"):
        load_router(path)


def test_extra_tensor_raises(saved):
    path, _ = saved
    t = load_file(str(path / ROUTER_WEIGHTS_FILE))
    t["surprise"] = torch.zeros(2)
    _rewrite_weights(path, t)
    with pytest.raises(StackLoadError, match="unexpected"):
        load_router(path)


def test_shape_mismatch_raises(saved):
    path, _ = saved
    t = load_file(str(path / ROUTER_WEIGHTS_FILE))
    t["domain_queries"] = torch.zeros(4, 16)
    _rewrite_weights(path, t)
    with pytest.raises(StackLoadError, match="shape"):
        load_router(path)


def test_checksum_mismatch_raises(saved):
    path, _ = saved
    t = load_file(str(path / ROUTER_WEIGHTS_FILE))
    t["head_bias"] = t["head_bias"] + 1
    save_file(t, str(path / ROUTER_WEIGHTS_FILE))  # checksum in router.json not updated
    with pytest.raises(StackLoadError, match="checksum"):
        load_router(path)


def test_missing_and_corrupt_files_raise(saved, tmp_path):
    path, _ = saved
    with pytest.raises(StackLoadError):
        load_router(tmp_path / "nowhere")
    (path / ROUTER_META_FILE).write_text("{not json")
    with pytest.raises(StackLoadError):
        load_router(path)


def test_bad_metadata_raises(saved):
    path, _ = saved
    meta = json.loads((path / ROUTER_META_FILE).read_text())
    (path / ROUTER_META_FILE).write_text(json.dumps(dict(meta, format_version=99)))
    with pytest.raises(StackLoadError, match="format version"):
        load_router(path)
    bad = {k: v for k, v in meta.items() if k != "feature_recipe"}
    (path / ROUTER_META_FILE).write_text(json.dumps(bad))
    with pytest.raises(StackLoadError, match="feature_recipe"):
        load_router(path)
    (path / ROUTER_META_FILE).write_text(json.dumps(dict(meta, feature_recipe={"seq_len": 0})))
    with pytest.raises(StackLoadError, match="feature_recipe"):
        load_router(path)


def test_missing_weights_file_raises(saved):
    path, _ = saved
    (path / ROUTER_WEIGHTS_FILE).unlink()
    with pytest.raises(StackLoadError, match="not found"):
        load_router(path)
