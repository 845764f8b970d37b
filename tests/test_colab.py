"""The Colab notebook runs top to bottom: on CPU, with the embedded SmolLM2, tiny settings and the data dir."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab" / "brainstacks_colab.ipynb"

pytestmark = pytest.mark.slow


def test_colab_notebook_executes_end_to_end(tmp_path, data_dir, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    run_dir = tmp_path / "run"
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("BRAINSTACKS_DATA_DIR", str(data_dir))
    monkeypatch.setenv("BRAINSTACKS_NOTEBOOK_CONFIG", "quickstart_fast")
    monkeypatch.setenv("BRAINSTACKS_NOTEBOOK_RUN_DIR", str(run_dir))
    monkeypatch.setenv("BRAINSTACKS_NOTEBOOK_SFT_OVERRIDES", " ".join(
        # 3 steps at 5e-4 without warmup: enough for every domain's first round to lower its loss (a domain
        # that learns nothing now stops the run instead of silently ending with no stack)
        ["train.max_steps=3", "train.eval_steps=3", "train.warmup_steps=0", "train.learning_rate=5e-4",
         "train.max_length=96", "router_rows.train_per_domain=4", "router_rows.test_per_domain=4"]
        + [f"domains.{i}.{k}" for i in range(3) for k in ("train_samples=8", "val_samples=3")]))
    monkeypatch.setenv("BRAINSTACKS_NOTEBOOK_ROUTER_OVERRIDES", "oracle_rows_per_domain=2 label_rows_per_domain=4 "
                       "test_rows_per_domain=3 test_oracle_rows_per_domain=2 mixed_pairs=1 test_mixed_pairs=1 "
                       "timing_prompts=1 generation_prompts=0 router.epochs=2 router.oracle_max_length=96")
    monkeypatch.setenv("BRAINSTACKS_NOTEBOOK_NEW_TOKENS", "4")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()

    def text(cell) -> str:
        return "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/plain", ""))
                       for o in cell.get("outputs", []))

    outputs = [text(c) for c in nb.cells if c.cell_type == "code"]
    # Shell cells report failures only in their output: check what each step must have produced.
    assert (run_dir / "manifest.json").is_file() and (run_dir / "forgetting.png").is_file()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert all(manifest["domains"][d]["status"] == "done" for d in ("chat", "code", "math"))
    assert (run_dir / "router" / "router.json").is_file()
    assert "max_prefix_drift" in outputs[2]
    assert "### A patient must take 500 mg" in outputs[4] and "[ routed]" in outputs[4]
    route = json.loads(outputs[5][outputs[5].index("{"):])
    assert set(route["weights"]) <= {"chat", "code", "math"}
