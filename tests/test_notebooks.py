"""Every Colab notebook runs top to bottom in CPU smoke mode (embedded SmolLM2, local data, tiny settings), in
order on one run directory, and the committed notebooks are what ``colab/build_notebooks.py`` writes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"
sys.path.insert(0, str(COLAB))
import build_notebooks  # noqa: E402

NAMES = list(build_notebooks.NOTEBOOKS)


def test_committed_notebooks_are_built_from_the_one_source():
    import nbformat

    for name in NAMES:
        committed = nbformat.read(COLAB / name, as_version=4)
        nbformat.validate(committed)
        assert committed == build_notebooks.build(name), f"{name} differs: run python colab/build_notebooks.py"
    assert sorted(p.name for p in COLAB.glob("*.ipynb")) == sorted(NAMES)


def test_install_cell_refuses_without_a_source_and_never_guesses_a_url():
    for name in NAMES:
        install = json.loads((COLAB / name).read_text())["cells"][1]
        src = "".join(install["source"])
        assert 'BRAINSTACKS_SOURCE = ""' in src and "github.com/brainstacks" not in src
        assert "set BRAINSTACKS_SOURCE" in src


@pytest.mark.slow
def test_every_notebook_runs_in_smoke_mode(tmp_path, data_dir, monkeypatch):
    import nbclient
    import nbformat

    run_dir = tmp_path / "run"
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("BRAINSTACKS_DATA_DIR", str(data_dir))
    monkeypatch.setenv("BRAINSTACKS_SMOKE", "1")
    monkeypatch.setenv("BRAINSTACKS_NOTEBOOK_RUN_DIR", str(run_dir))
    outputs = {}
    for name in NAMES:
        nb = nbformat.read(COLAB / name, as_version=4)
        nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
        outputs[name] = "\n".join("".join(o.get("text", "") + "".join(o.get("data", {}).get("text/plain", ""))
                                          for o in c.get("outputs", [])) for c in nb.cells if c.cell_type == "code")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert all(manifest["domains"][d]["status"] == "done" for d in ("chat", "code", "math"))
    assert manifest["sessions"] >= 2  # 02 resumed the run 01 trained
    kinds = {r["kind"] for d in manifest["domains"].values() for r in d["rounds"]}
    assert {"sft", "grpo", "dpo"} <= kinds
    assert "max_prefix_drift" in outputs["01_quickstart.ipynb"]
    assert "route {" in outputs["01_quickstart.ipynb"] and "gap" in outputs["01_quickstart.ipynb"]
    assert '"top1"' in outputs["03_router.ipynb"]
    assert "grpo" in outputs["04_rl_dpo_grpo.ipynb"] and "dpo" in outputs["04_rl_dpo_grpo.ipynb"]
    assert "loaded" in outputs["05_superposition_inference.ipynb"]
    for mode in ("base", "routed"):
        assert (run_dir / "eval" / mode / "results.json").is_file()
    report = (run_dir / "report" / "report.md").read_text()
    assert "## Benchmarks" in report and "bs_arc_easy" in report and "## RL refinement" in report
