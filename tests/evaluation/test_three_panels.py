"""The three-panel experiment (paper 5.3) on a tiny finished run with a random router: the recipe writes
``experiments/three_panels.{json,md,png}`` with the expected structure, and ``brainstacks report`` shows them."""

from __future__ import annotations

import json
import math
import runpy
import shutil
from pathlib import Path

import pytest

from brainstacks_hooks.errors import ConfigError
from brainstacks_hooks.evaluation.report import write_report
from brainstacks_hooks.evaluation.three_panels import PANELS, three_panels
from brainstacks_hooks.inference.routed_model import RoutedModel
from brainstacks_hooks.testing import save_random_router
from brainstacks_hooks.utils.io import atomic_write_json

pytestmark = pytest.mark.slow

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "experiments" / "three_panels.py"
PROMPTS = ["Write a Python function that reverses a string.", "What is 12 * 7?"]


@pytest.fixture
def run_dir(tiny_sft_run, tmp_path):
    """A copy of the tiny run (chat, code) with a random, untrained router saved beside it."""
    out = tmp_path / "run"
    shutil.copytree(tiny_sft_run.run_dir, out, ignore=shutil.ignore_patterns("trainer"))
    save_random_router(out, tiny_sft_run.stacks)
    return out


def test_the_recipe_writes_json_md_and_png_and_the_report_shows_them(run_dir, capsys):
    before = write_report(run_dir, measure_utilization=False).read_text()
    assert f"python recipes/experiments/three_panels.py {run_dir}" in before  # not measured: the command
    main = runpy.run_path(str(RECIPE))["main"]
    assert main([str(run_dir), "--prompts", *PROMPTS, "--new-tokens", "4", "--rows", "2"]) == 0
    printed = capsys.readouterr().out

    out = run_dir / "experiments"
    assert sorted(p.name for p in out.iterdir()) == ["three_panels.json", "three_panels.md", "three_panels.png"]
    rec = json.loads((out / "three_panels.json").read_text())
    assert rec["panels"] == list(PANELS) == ["prefix", "ungated", "routed"]
    assert rec["files"] == {"json": "three_panels.json", "md": "three_panels.md", "png": "three_panels.png"}
    lp = rec["losses"]
    assert lp["source"] == "recomputed" and lp["rows"] == "router_test" and lp["rows_per_domain"] == 2
    assert list(lp["domains"]) == ["chat", "code"]
    for v in lp["domains"].values():
        assert 1 <= v["n_examples"] <= 2 and v["n_tokens"] > 0
        assert all(math.isfinite(v[m]) and v[m] > 0 for m in ("base", *PANELS))
    chat = lp["domains"]["chat"]
    assert chat["prefix"] == chat["isolated"]  # the first domain's prefix is its own stacks
    gp = rec["generations"]
    assert gp["modes"] == {"prefix": "prefix:chat", "ungated": "ungated", "routed": "routed"}
    assert gp["new_tokens"] == 4 and [g["prompt"] for g in gp["prompts"]] == PROMPTS
    for g in gp["prompts"]:
        assert set(g["outputs"]) == set(PANELS) and all(isinstance(t, str) for t in g["outputs"].values())
        assert all(0 <= n <= 4 for n in g["new_tokens"].values())
        assert set(g["route"]) == {"weights", "gated_on", "gap"} and set(g["route"]["weights"]) <= {"chat", "code"}
    assert set(rec["wall_time_s"]) == {"load", "losses", "generation", "total"}
    png = (out / "three_panels.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = (out / "three_panels.md").read_text()
    assert md.startswith("# Three panels (paper 5.3)") and "![three panels](three_panels.png)" in md
    assert "| domain | n | base | prefix | ungated | routed | routed - ungated |" in printed
    assert "| chat | " in printed and "- `prefix:chat`:\n\n  ~~~text\n" in printed and PROMPTS[0] in printed

    text = write_report(run_dir, measure_utilization=False).read_text()
    section = text.split("## Three panels", 1)[1].split("\n## ", 1)[0]
    assert "| code | " in section and "![three panels](../experiments/three_panels.png)" in section
    assert "- `routed`: " in section and "~~~" not in section and "Not measured yet" not in section


def test_losses_come_from_the_router_report_when_it_has_them_and_user_errors(run_dir, capsys):
    table = {d: {"n_examples": 3, "n_tokens": 30, "base": 2.0, "prefix": 1.5, "isolated": 1.6, "ungated": 1.8,
                 "routed": 1.4, "oracle": 1.3} for d in ("chat", "code")}
    rm = RoutedModel.from_run(run_dir, budget_bytes=None)
    with pytest.raises(ConfigError, match="no loss table"):
        three_panels(run_dir, PROMPTS[:1], new_tokens=2, losses="report", rm=rm)
    with pytest.raises(ConfigError, match="unknown prefix domain 'nosuch'"):
        three_panels(run_dir, PROMPTS[:1], new_tokens=2, prefix_domain="nosuch", rm=rm)
    atomic_write_json(run_dir / "router" / "report.json", {"val_losses": table, "losses_bf16": False})
    rec = three_panels(run_dir, PROMPTS[:1], new_tokens=2, prefix_domain="code", rm=rm)
    assert rec["losses"]["source"] == "router_report" and rec["losses"]["file"] == "router/report.json"
    assert rec["losses"]["domains"]["code"] == {k: v for k, v in table["code"].items() if k != "oracle"}
    assert rec["generations"]["modes"]["prefix"] == "prefix:code"

    main = runpy.run_path(str(RECIPE))["main"]
    capsys.readouterr()  # the model loads above wrote progress bars
    assert main([str(run_dir), "--losses", "report", "--prefix-domain", "nosuch", "--new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err == "error: unknown prefix domain 'nosuch'; the run's domains: chat, code\n"  # before any load
    assert not (run_dir / "experiments").exists()  # nothing written on an error
