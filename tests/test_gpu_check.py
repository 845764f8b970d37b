"""scripts/gpu_check.py runs end to end on a CPU (the GPU parts reported as skipped) and its checks hold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_check_script_runs_on_cpu(tiny_model_dir, tmp_path):
    out = tmp_path / "report.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--model", str(tiny_model_dir),
                             "--steps", "2", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    hf = report["backends"]["hf"]
    assert "error" not in hf, hf.get("traceback")
    assert hf["hook_calls_train_forward"]["calls"] == hf["hook_calls_train_forward"]["expected"]
    for use_cache in (True, False):
        g = hf[f"hook_calls_generate_use_cache_{use_cache}"]
        assert g["calls"] >= g["expected_at_least"]
    assert hf["train_bf16"]["frozen_bit_identical"] and hf["train_bf16"]["router_grad_abs_sum"] > 0
    assert hf["bypass_guard"]["raised"]
    assert "skipped" in hf["train_fp16"] and "skipped" in hf["store_prefetch"]
    assert {"moe_lora_step_ms", "lora_r64_step_ms", "forward_5_frozen_ms"} <= set(hf["timings"])
    assert "skipped" in report["backends"]["bnb4"] and "skipped" in report["backends"]["unsloth"]
