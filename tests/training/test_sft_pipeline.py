"""SFT pipeline on a tiny model and the real shared data: acceptance, zero forgetting, null space, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pipeline_utils import tiny_run_config

from brainstacks_hooks.training.outer_loop import run_sft
from brainstacks_hooks.training.validation import evaluate_loss

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def finished_run(tiny_sft_run):
    return tiny_sft_run


def test_zero_forgetting_prefix_loss_reproduced_after_a_later_domain(finished_run):
    run = finished_run
    chat = run.manifest.domain("chat")
    assert chat["status"] == "done" and chat["final_prefix_loss"] is not None
    assert run.stacks.stacks_for("code"), "the later domain must have trained a stack"
    with run.stacks.prefix("chat"):
        again = evaluate_loss(run.stacks.model, run.data.val["chat"], run.tokenizer.pad_token_id, 8, False)
    assert abs(again - chat["final_prefix_loss"]) <= 1e-5
    summary = run.manifest.data["forgetting_summary"]
    assert summary["max_prefix_drift"] <= 1e-5
    assert set(run.manifest.data["forgetting"][-1]["losses"]["chat"]) == {"prefix", "isolated", "ungated"}
    assert (run.run_dir / "forgetting.png").is_file()


def test_code_stacks_orthogonal_to_chat_basis_after_folding(finished_run):
    stacks = finished_run.stacks
    chat_basis = stacks.null_space_bases["chat"]
    for stack in stacks.stacks_for("code"):
        for key, m in stack.items():
            v = chat_basis[key].to(m.B.dtype)
            b = m.B.detach()  # [E, d_out, r]
            rel = (torch.einsum("ok,eor->ekr", v, b).norm() / b.norm().clamp_min(1e-30)).item()
            assert rel < 1e-4, (key, rel)


def test_manifest_records_rounds_with_checksums(finished_run):
    m = finished_run.manifest.data
    for name in ("chat", "code"):
        for r in m["domains"][name]["rounds"]:
            assert {"round", "status", "loss_before", "best_val_loss", "steps", "wall_time_s", "seed"} <= set(r)
            if r["status"] == "accepted":
                assert (finished_run.run_dir / r["file"]).is_file() and len(r["sha256"]) == 64
    assert m["domains"]["chat"]["data"]["val_ids_hash"]
    assert (finished_run.run_dir / "stacks" / "brainstacks.json").is_file()


def test_acceptance_discards_a_non_improving_round(model_dir, tmp_path, data_dir):
    cfg = tiny_run_config(model_dir, tmp_path / "out", domains=("chat",), learning_rate=0.0)
    run = run_sft(cfg)
    rounds = run.manifest.domain("chat")["rounds"]
    assert [r["status"] for r in rounds] == ["rejected"]
    assert run.stacks.frozen_stacks == [] and run.stacks.active is None


_CHILD = """
import sys
from brainstacks_hooks.training.outer_loop import run_sft
sys.path.insert(0, {tests!r})
from pipeline_utils import tiny_run_config
from pathlib import Path
run_sft(tiny_run_config(Path({model!r}), Path({out!r}), domains=("chat", "code", "math")))
"""


def test_resume_after_kill_mid_run(model_dir, tmp_path, data_dir):
    out = tmp_path / "out"
    code = _CHILD.format(tests=str(Path(__file__).parent), model=str(model_dir), out=str(out))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "manifest.json"
    deadline = time.time() + 600
    killed_state = None
    while time.time() < deadline and proc.poll() is None:
        if manifest.is_file():
            try:
                m = json.loads(manifest.read_text())
            except json.JSONDecodeError:
                m = {}
            code_rounds = m.get("domains", {}).get("code", {}).get("rounds", [])
            if code_rounds:  # the second domain finished its first round: kill mid-run
                os.kill(proc.pid, signal.SIGKILL)
                killed_state = m
                break
        time.sleep(0.2)
    proc.wait()
    assert killed_state is not None, proc.stderr.read().decode()[-3000:]
    chat_files = {r["file"]: r["sha256"] for r in killed_state["domains"]["chat"]["rounds"] if r["file"]}
    before = {f: (out / f).read_bytes() for f in chat_files}

    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=900)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    m = json.loads(manifest.read_text())
    assert all(m["domains"][d]["status"] == "done" for d in ("chat", "code", "math"))
    assert m["sessions"] == 2
    for f, data in before.items():
        assert (out / f).read_bytes() == data  # finished stacks reused byte-identical
    for d in ("chat", "code", "math"):
        rounds = [r["round"] for r in m["domains"][d]["rounds"]]
        assert rounds == sorted(set(rounds))  # no duplicates
    index = json.loads((out / "stacks" / "brainstacks.json").read_text())
    accepted = sum(1 for d in m["domains"].values() for r in d["rounds"] if r["status"] == "accepted")
    assert len(index["stacks"]) == accepted


def test_missing_stack_file_is_a_clear_error(finished_run, model_dir, tmp_path):
    import shutil

    from brainstacks_hooks.errors import StackLoadError

    copy = tmp_path / "copy"
    shutil.copytree(finished_run.run_dir, copy)
    first = finished_run.manifest.accepted_rounds("chat")[0]["file"]
    (copy / first).unlink()
    cfg = tiny_run_config(model_dir, copy)
    with pytest.raises(StackLoadError, match="missing"):
        run_sft(cfg)
