"""The wheel ships the YAML configs, and an installed (non-editable) copy finds them without the clone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "brainstacks_hooks" / "configs"

pytestmark = pytest.mark.slow

#: Run in the installed copy: where the package, the quickstart's configs and `brainstacks configs` come from.
PROBE = """
import json, subprocess, sys
import brainstacks_hooks
from brainstacks_hooks.config import load_config
from brainstacks_hooks.configs import list_configs
from brainstacks_hooks.quickstart import quickstart_configs
from brainstacks_hooks.router.pipeline import RouterPipelineConfig
from brainstacks_hooks.training.config import RunConfig

paths = [*quickstart_configs(False), *quickstart_configs(True)]
domains = [[d.name for d in load_config(RunConfig, p).domains] for p in paths[0::2]]
routers = [load_config(RouterPipelineConfig, p).run_dir for p in paths[1::2]]
cli = subprocess.run([sys.executable, "-m", "brainstacks_hooks.cli.main", "configs"], capture_output=True,
                     text=True, check=True).stdout
print(json.dumps({"package": brainstacks_hooks.__file__, "paths": [str(p) for p in paths], "names": list_configs(),
                  "domains": domains, "routers": routers, "cli": cli}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (so the build leaves no build/ or egg-info in the clone)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT / "brainstacks_hooks", src / "brainstacks_hooks",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    dist = tmp / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(dist), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = dist.glob("brainstacks_hooks-*.whl")
    return whl


def test_wheel_contains_every_yaml_of_the_package(wheel):
    yamls = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "brainstacks_hooks").rglob("*.yaml"))
    assert "brainstacks_hooks/configs/quickstart_cpu.yaml" in yamls
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert sorted(n for n in names if n.endswith(".yaml")) == yamls
    assert "brainstacks_hooks/configs/__init__.py" in names


def test_installed_quickstart_resolves_its_configs_from_the_installed_package(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    elsewhere = tmp_path / "elsewhere"  # cwd outside the clone, so neither '' nor the clone is on sys.path
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the clone's editable-install finder
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])

    installed = (site / "brainstacks_hooks").resolve()
    assert Path(out["package"]).resolve().is_relative_to(installed), out["package"]  # not the clone's copy
    assert [Path(p).name for p in out["paths"]] == ["quickstart_cpu.yaml", "router_quickstart.yaml",
                                                   "quickstart_fast.yaml", "router_quickstart_fast.yaml"]
    for p in out["paths"]:
        assert Path(p).resolve().is_relative_to(installed / "configs") and Path(p).is_file(), p
    assert out["names"] == sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert out["domains"] == [["chat", "code", "math"], ["chat", "code", "math"]]
    assert out["routers"] == ["runs/quickstart", "runs/quickstart_fast"]
    assert [line.split()[0] for line in out["cli"].splitlines()] == out["names"]
