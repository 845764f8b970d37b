"""Null-space collection conditions: ``isolated`` (a domain's own stacks) vs ``aggregate`` (every frozen stack up to
the domain, the paper's condition); the default keeps the run's config key as runs recorded before the field."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from brainstacks_hooks.errors import ConfigError
from brainstacks_hooks.run_config import NullSpaceConfig
from brainstacks_hooks.run_dir import config_key
from brainstacks_hooks.training.null_space import collect_domain_basis

pytestmark = pytest.mark.slow


def _bases(run, domain, collection):
    cfg = dataclasses.replace(run.run.run_config().null_space, collection=collection)
    torch.manual_seed(0)  # torch.svd_lowrank draws its random projection from the global generator
    return collect_domain_basis(run.stacks, domain, run.data.val[domain], run.tokenizer.pad_token_id, cfg, 8, False)


def test_aggregate_collection_sees_every_earlier_stack(tiny_sft_run):
    first, second = tiny_sft_run.manifest.domain_order[:2]
    iso, agg = _bases(tiny_sft_run, first, "isolated"), _bases(tiny_sft_run, first, "aggregate")
    for k in iso:  # the first domain's prefix is its own stacks: the same directions
        torch.testing.assert_close(agg[k], iso[k])
    iso, agg = _bases(tiny_sft_run, second, "isolated"), _bases(tiny_sft_run, second, "aggregate")
    # later: the summed delta of both domains spans other directions (projector distance > 0)
    dist = max(float((iso[k] @ iso[k].T - agg[k] @ agg[k].T).norm()) for k in iso)
    assert dist > 1e-3


def test_collection_is_validated_and_the_default_keeps_old_config_keys(tiny_sft_run):
    with pytest.raises(ConfigError, match="collection"):
        NullSpaceConfig(collection="sum")
    cfg = tiny_sft_run.run.run_config()
    assert "collection" not in config_key(cfg)["null_space"]
    agg = dataclasses.replace(cfg, null_space=dataclasses.replace(cfg.null_space, collection="aggregate"))
    assert config_key(agg)["null_space"]["collection"] == "aggregate"
