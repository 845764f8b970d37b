"""Every YAML config shipped in the package (brainstacks_hooks/configs) loads into its dataclass; config
arguments take a file or a shipped name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from brainstacks_hooks.config import apply_overrides, load_config
from brainstacks_hooks.configs import config_path, list_configs, resolve_config
from brainstacks_hooks.errors import ConfigError
from brainstacks_hooks.training.config import RunConfig

PACKAGE_CONFIGS = Path(__file__).resolve().parents[1] / "brainstacks_hooks" / "configs"
CONFIGS = [config_path(name) for name in list_configs()]


def test_every_yaml_in_the_package_is_listed():
    assert sorted(p.name for p in PACKAGE_CONFIGS.glob("*.yaml")) == [p.name for p in CONFIGS]
    assert {"quickstart_cpu", "quickstart_fast", "router_quickstart", "router_quickstart_fast"} <= set(list_configs())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    data = yaml.safe_load(path.read_text())
    if "domains" in data:
        cfg = load_config(RunConfig, path)
        assert cfg.domains and all(d.name for d in cfg.domains)
    elif "algorithm" in data:
        from brainstacks_hooks.rl.config import RLConfig

        cfg = load_config(RLConfig, path)
        assert path.name.startswith(f"rl_{cfg.algorithm}_") and cfg.domain
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


@pytest.mark.parametrize("name", ["quickstart_cpu", "quickstart_cpu.yaml"])
def test_a_shipped_name_resolves_with_or_without_suffix(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file of that name here
    assert resolve_config(name) == PACKAGE_CONFIGS / "quickstart_cpu.yaml"
    assert load_config(RunConfig, name).output_dir == "runs/quickstart"


def test_an_existing_file_wins_over_the_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart_cpu.yaml").write_text("output_dir: runs/mine\ndomains: [{name: chat}]\n")
    assert load_config(RunConfig, "quickstart_cpu.yaml").output_dir == "runs/mine"
    assert load_config(RunConfig, "quickstart_cpu").output_dir == "runs/quickstart"  # no such file: shipped


@pytest.mark.parametrize("arg", ["nosuch", "nosuch.yaml", "some/dir/nosuch.yaml"])
def test_an_unknown_config_names_it_and_lists_the_shipped_ones(arg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(RunConfig, arg)
    message = str(info.value)
    assert arg in message and "shipped configs: " in message
    assert all(name in message for name in list_configs())


@pytest.mark.parametrize(("override", "match"), [
    ("train.max_steps", "must look like key.sub=value"),
    ("domains.x.val_samples=3", r"domains is a list; 'x' must be an index from 0 to 1"),
    ("domains.5.val_samples=3", r"'5' must be an index from 0 to 1"),
    ("seed.x=1", "seed is 42, not a mapping"),
    ("train.max_steps=[1", "not valid YAML"),
])
def test_a_bad_override_is_a_config_error_naming_it(override, match):
    data = {"seed": 42, "domains": [{"name": "chat"}, {"name": "code"}]}
    with pytest.raises(ConfigError, match=match):
        apply_overrides(data, [override])


def test_float_fields_accept_yaml_1_1_exponents_and_reject_words():
    from brainstacks_hooks.config import load_config
    from brainstacks_hooks.errors import ConfigError
    from brainstacks_hooks.run_config import RunConfig

    cfg = load_config(RunConfig, None, ["train.learning_rate=5e-4", "train.weight_decay=0"])
    assert cfg.train.learning_rate == 5e-4 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.weight_decay == 0.0 and isinstance(cfg.train.weight_decay, float)
    with pytest.raises(ConfigError, match=r"train\.learning_rate: expected a number, got 'fast'"):
        load_config(RunConfig, None, ["train.learning_rate=fast"])
