"""``brainstacks report``: one Markdown report with its plots from any stage of a run, rerunnable."""

from __future__ import annotations

import math
import shutil

import pytest

from brainstacks_hooks.evaluation.report import REPORT_SUBDIR, UTILIZATION_FILE, expert_utilization, write_report
from brainstacks_hooks.run_dir import RunDir
from brainstacks_hooks.utils.io import read_json

pytestmark = pytest.mark.slow


@pytest.fixture
def run_copy(tiny_sft_run, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(tiny_sft_run.run_dir, dest, ignore=shutil.ignore_patterns("trainer"))
    return dest


def test_report_of_an_sft_run_names_what_is_missing_and_reruns(run_copy):
    path = write_report(run_copy, utilization_rows=2)
    text = path.read_text()
    out = run_copy / REPORT_SUBDIR
    for section in ("## SFT and RL rounds", "## Forgetting", "## Routing", "## Benchmarks", "## Three panels",
                    "## Expert utilisation"):
        assert section in text
    assert "No router yet" in text and "No evaluation yet" in text and "No RL rounds" in text
    assert f"Not measured yet (`python recipes/experiments/three_panels.py {run_copy}`)" in text
    for png in ("loss_curves.png", "forgetting.png", "expert_utilization.png"):
        assert (out / png).stat().st_size > 1000
    m = RunDir.open(run_copy).manifest
    for d in m.domain_order:  # every round of the manifest is a row of the rounds table
        for r in m.domain(d).rounds:
            assert f"| {d} | {r.round} | {r.kind} | {r.status} |" in text
    cached = (out / UTILIZATION_FILE).read_bytes()
    assert write_report(run_copy, utilization_rows=2).read_text() == text  # rerun: same report, cache reused
    assert (out / UTILIZATION_FILE).read_bytes() == cached


def test_expert_utilization_shares_per_projection(run_copy):
    util = expert_utilization(RunDir.open(run_copy), rows_per_domain=2)
    assert set(util["domains"]) == {"chat", "code"}
    for per_key in util["domains"].values():
        assert len(per_key) == 7 * 2  # 7 projections x 2 layers of the tiny model
        for shares in per_key.values():
            assert len(shares) == 4 and math.isclose(sum(shares), 1.0, rel_tol=1e-5)
            assert max(shares) <= 0.5 + 1e-6  # top-2 of 4: one expert takes at most half of the selections


def test_report_reads_eval_results_with_delta_to_base(run_copy):
    import json

    for mode, acc in (("base", 0.25), ("routed", 0.5)):
        d = run_copy / "eval" / mode
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"metrics": {"bs_arc_easy": {"acc": {"value": acc,
                                                    "stderr": 0.1}}}, "limit": 4,
                                                    "wall_time_s": {"load": 1.0, "evaluate": 2.0}}))
    text = write_report(run_copy, measure_utilization=False).read_text()
    assert "| bs_arc_easy | acc | 0.250 ± 0.100 | 0.500 ± 0.100 (+0.250) |" in text
    assert "routed: limit 4, 3 s" in text
    assert read_json(run_copy / "manifest.json")  # the report never rewrites the run's records
