"""Every YAML config shipped in recipes/configs loads into its dataclass."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from brainstacks_hooks.config import load_config
from brainstacks_hooks.errors import ConfigError
from brainstacks_hooks.training.config import RunConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "recipes" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    data = yaml.safe_load(path.read_text())
    if "domains" in data:
        cfg = load_config(RunConfig, path)
        assert cfg.domains and all(d.name for d in cfg.domains)
    else:
        from brainstacks_hooks.router.pipeline import RouterPipelineConfig

        load_config(RouterPipelineConfig, path)


def test_unknown_key_suggests_the_closest(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("trian: {max_steps: 3}\n")
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_config(RunConfig, p)


def test_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("domains: [{name: chat}, {name: code}]\n")
    cfg = load_config(RunConfig, p, ["train.max_steps=7", "domains.1.val_samples=3", "stack.rank=8"])
    assert cfg.train.max_steps == 7 and cfg.domains[1].val_samples == 3 and cfg.stack.rank == 8
