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

from brainstacks_hooks.data.formatting import encode_rows
from brainstacks_hooks.errors import RunDirError, StackLoadError, TrainingError
from brainstacks_hooks.loss import evaluate_loss
from brainstacks_hooks.run_dir import SFT_TRAIN, SFT_VAL, RunDir
from brainstacks_hooks.stacks.brainstacks import BrainStacks
from brainstacks_hooks.testing import tiny_run_config
from brainstacks_hooks.training.outer_loop import run_sft

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
    assert chat.status == "done" and chat.final_prefix_loss is not None
    assert run.stacks.stacks_for("code"), "the later domain must have trained a stack"
    with run.stacks.prefix("chat"):
        again = evaluate_loss(run.stacks.model, run.data.val["chat"], run.tokenizer.pad_token_id, 8, False)
    assert abs(again - chat.final_prefix_loss) <= 1e-5
    summary = run.manifest.forgetting_summary
    assert summary["max_prefix_drift"] <= 1e-5
    assert set(run.manifest.forgetting[-1]["losses"]["chat"]) == {"prefix", "isolated", "ungated"}
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
    m = json.loads((finished_run.run_dir / "manifest.json").read_text())
    for name in ("chat", "code"):
        for r in m["domains"][name]["rounds"]:
            assert {"round", "status", "loss_before", "best_val_loss", "steps", "wall_time_s", "seed"} <= set(r)
            if r["status"] == "accepted":
                assert (finished_run.run_dir / r["file"]).is_file() and len(r["sha256"]) == 64
    assert m["format_version"] == 2
    assert (finished_run.run_dir / "stacks" / "brainstacks.json").is_file()


def test_each_stack_is_written_once_and_the_index_reads_the_manifest_files(finished_run):
    run = RunDir.open(finished_run.run_dir)
    accepted = [(d, r) for d in run.manifest.domain_order for r in run.manifest.accepted_rounds(d)]
    files = sorted(p.relative_to(run.path).as_posix() for p in run.path.rglob("*.safetensors"))
    stack_files = [f for f in files if not Path(f).name.startswith("null_space-")]
    assert stack_files == sorted(r.file for _, r in accepted)  # one file per accepted stack, nothing else
    index = run.stack_index()
    assert [(e.domain, e.round_index, e.sha256) for e in index.entries] == [(d, r.round, r.sha256) for d, r in accepted]
    assert all((run.stacks_dir / e.file).resolve() == (run.path / r.file).resolve()
               for e, (_, r) in zip(index.entries, accepted))


def test_rows_are_recorded_and_match_what_sft_encoded(finished_run):
    run = RunDir.open(finished_run.run_dir)
    max_length = run.run_config().train.max_length
    for phase, encoded in ((SFT_TRAIN, finished_run.data.train), (SFT_VAL, finished_run.data.val)):
        rows = run.rows_by_domain(phase)
        for d in ("chat", "code"):
            assert all({"instruction", "input", "output", "domain"} <= set(r) for r in rows[d])
            again, _ = encode_rows(finished_run.tokenizer, rows[d], max_length)
            assert again == encoded[d]  # later phases get exactly SFT's examples back from the recorded rows


def test_load_restores_every_null_space_basis_including_the_last_domain(finished_run):
    run = RunDir.open(finished_run.run_dir)
    assert run.manifest.domain("code").null_space is not None  # the last domain's directions are saved too
    model, _ = run.load_base()
    stacks = BrainStacks.load(model, run.stacks_dir)
    assert set(stacks.null_space_bases) == {"chat", "code"}
    for d in ("chat", "code"):
        for key, v in finished_run.stacks.null_space_bases[d].items():
            assert torch.equal(stacks.null_space_bases[d][key], v)
    stacks.new_stack("math")  # a new domain after loading is projected against chat and code
    merged = stacks.null_space
    for d in ("chat", "code"):
        for key, u in stacks.null_space_bases[d].items():
            v = merged[key]  # [d_out, k]: must span every domain's directions
            residual = u - v @ (v.T @ u)
            assert residual.norm() <= 1e-4 * max(1.0, u.norm().item()), (d, key)
    stacks.detach()


def test_a_domain_whose_first_round_learns_nothing_stops_with_a_clear_error(model_dir, tmp_path, data_dir):
    cfg = tiny_run_config(model_dir, tmp_path / "out", domains=("chat",), learning_rate=0.0)
    with pytest.raises(TrainingError, match=r"'chat'.*first round did not lower"):
        run_sft(cfg)
    run = RunDir.open(tmp_path / "out")
    assert run.manifest.domain("chat").status == "failed"
    assert [r.status for r in run.manifest.domain("chat").rounds] == ["rejected"]
    assert not list((tmp_path / "out" / "stacks").glob("chat-*.safetensors"))


def test_a_first_round_below_min_loss_delta_is_kept_with_a_note(model_dir, tmp_path, data_dir):
    cfg = tiny_run_config(model_dir, tmp_path / "out", domains=("chat",))
    cfg.inner.min_loss_delta = 100.0  # no round can reach it
    run = run_sft(cfg)
    rounds = run.manifest.domain("chat").rounds
    assert [r.status for r in rounds] == ["accepted", "rejected"]
    assert rounds[0].note and "below min_loss_delta" in rounds[0].note
    assert len(run.stacks.stacks_for("chat")) == 1


def test_another_config_in_the_same_output_dir_is_refused(finished_run, model_dir):
    cfg = tiny_run_config(model_dir, finished_run.run_dir, domains=("chat", "math"))
    with pytest.raises(RunDirError, match="different model, stack config, seed, domain list"):
        run_sft(cfg)


_CHILD = """
from pathlib import Path
from brainstacks_hooks.testing import tiny_run_config
from brainstacks_hooks.training.outer_loop import run_sft
run_sft(tiny_run_config(Path({model!r}), Path({out!r}), domains=("chat", "code", "math")))
"""


def test_resume_after_kill_mid_run(model_dir, tmp_path, data_dir):
    out = tmp_path / "out"
    code = _CHILD.format(model=str(model_dir), out=str(out))
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
    stack_files = [p for p in out.rglob("*.safetensors") if not p.name.startswith("null_space-")]
    assert len(stack_files) == accepted  # each stack once: an interrupted round left nothing behind


def test_missing_stack_file_is_a_clear_error(finished_run, model_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished_run.run_dir, copy)
    first = finished_run.manifest.accepted_rounds("chat")[0].file
    (copy / first).unlink()
    cfg = tiny_run_config(model_dir, copy)
    with pytest.raises(StackLoadError, match="missing"):
        run_sft(cfg)
