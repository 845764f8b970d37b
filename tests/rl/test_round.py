"""RL refinement rounds of a finished (tiny) SFT run: manifest records, acceptance, frozen stacks untouched,
resume (also after kill -9), held-out rows disjoint from training rows, the CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from brainstacks_hooks.config import from_dict
from brainstacks_hooks.errors import ConfigError, RunDirError
from brainstacks_hooks.rl.config import RLConfig
from brainstacks_hooks.rl.round import BEFORE_FILE, PAIRS_FILE, run_rl, summary_table
from brainstacks_hooks.run_dir import RunDir
from brainstacks_hooks.stacks.brainstacks import BrainStacks

pytestmark = pytest.mark.slow

GRPO = {"algorithm": "grpo", "domain": "code", "rewards": ["brainstacks_hooks.testing:length_reward"],
        "max_sft_val_loss_increase": None,
        "trainer": {"max_steps": 2, "per_device_train_batch_size": 2, "num_generations": 2,
                    "max_completion_length": 6, "learning_rate": 5e-3, "logging_steps": 1},
        "data": {"train_rows": 4, "eval_source": "sft_val", "eval_rows": 4},
        "eval": {"max_new_tokens": 6, "batch_size": 4, "sft_val_rows": 4}}
DPO = {"algorithm": "dpo", "domain": "chat", "max_sft_val_loss_increase": None,
       "trainer": {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 5e-3, "max_length": 128},
       "data": {"train_rows": 4, "eval_rows": 4}, "pairs": {"max_new_tokens": 6, "batch_size": 4},
       "eval": {"batch_size": 4, "sft_val_rows": 4}}


def _config(run_dir: Path, base: dict, **kw) -> RLConfig:
    d = json.loads(json.dumps(base))
    d["run_dir"] = str(run_dir)
    d.update(kw)
    return from_dict(RLConfig, d)


@pytest.fixture
def run_copy(tiny_sft_run, tmp_path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(tiny_sft_run.run_dir, dest, ignore=shutil.ignore_patterns("trainer"))
    return dest


def _stack_bytes(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (run_dir / "stacks").glob("*.safetensors")}


def test_grpo_round_is_recorded_like_an_sft_round_and_resume_skips_it(run_copy):
    before_files = _stack_bytes(run_copy)
    n_sft = len(RunDir.open(run_copy).stack_identity())
    (res,) = run_rl(_config(run_copy, GRPO, min_improvement=-1.0), progress=False)  # accept whatever happened
    rec = res.record
    run = RunDir.open(run_copy)
    (rl,) = [r for r in run.manifest.domain("code").rounds if r.kind == "grpo"]
    assert rl.round == max(r.round for r in run.manifest.domain("code").rounds if r.kind == "sft") + 1
    assert rl.status == rec.status == "accepted" and rl.steps == 2 and rl.file and rl.sha256
    assert rl.rl["before"]["score"]["n"] == 4 and rl.rl["eval_source"] == "sft_val"
    assert math.isclose(rl.improvement, rl.rl["after"]["score"]["mean"] - rl.rl["before"]["score"]["mean"])
    assert rl.rl["before"]["sft_val_loss"] == rl.loss_before and rl.rl["frozen_stacks_unchanged"]
    after_files = _stack_bytes(run_copy)
    assert {k: after_files[k] for k in before_files} == before_files  # earlier stacks byte-identical
    assert set(after_files) - set(before_files) == {Path(rl.file).name}
    assert len(run.stack_identity()) == n_sft + 1
    assert "grpo" in summary_table(run.manifest)
    # the saved run loads with the RL stack, and its reference (SFT policy) is the run without it
    model, _ = run.load_base()
    stacks = BrainStacks.load(model, run.stacks_dir)
    assert [(s.domain, s.round_index) for s in stacks.stacks_for("code")][-1] == ("code", rl.round)
    # rerunning the same command: the round is recorded, nothing is trained
    assert run_rl(_config(run_copy, GRPO, min_improvement=-1.0), progress=False) == []
    assert len([r for r in RunDir.open(run_copy).manifest.domain("code").rounds if r.kind == "grpo"]) == 1


def test_a_round_that_does_not_improve_is_rejected_and_ends_the_rounds(run_copy):
    files = _stack_bytes(run_copy)
    (res,) = run_rl(_config(run_copy, GRPO, min_improvement=1e9, rounds=2), progress=False)
    assert res.record.status == "rejected" and res.record.file is None and "discarded" in res.record.note
    assert _stack_bytes(run_copy) == files
    assert run_rl(_config(run_copy, GRPO, min_improvement=1e9, rounds=2), progress=False) == []


def test_a_round_that_raises_the_sft_validation_loss_too_much_is_rejected(run_copy):
    (res,) = run_rl(_config(run_copy, GRPO, min_improvement=-1.0, max_sft_val_loss_increase=-1.0), progress=False)
    assert res.record.status == "rejected" and "SFT validation loss rose" in res.record.note
    assert res.record.loss_before is not None and res.record.best_val_loss is not None


def test_dpo_round_pairs_labelled_reference_is_the_sft_policy(run_copy):
    (res,) = run_rl(_config(run_copy, DPO, min_improvement=-1.0), progress=False)
    before = res.before
    assert abs(before["loss"] - math.log(2)) < 1e-4  # zero-init active stack: policy == reference (SFT policy)
    assert before["rewards/margins"] == 0.0
    assert 0.0 <= before["reference_free_accuracy"]["mean"] <= 1.0
    pairs = json.loads((RunDir.open(run_copy).rl_round_dir("chat", res.record.round) / PAIRS_FILE).read_text())
    assert {p["pair_source"] for p in pairs["train"]["pairs"]} == {"chosen=reference_answer;rejected=model_sample"}
    train_ids = {p["id"] for p in pairs["train"]["pairs"]}
    assert train_ids and not train_ids & {p["id"] for p in pairs["eval"]["pairs"]}
    assert res.record.kind == "dpo" and res.record.rl["pair_source"].startswith("chosen=reference_answer")


def test_overlapping_rows_unknown_domain_and_unfinished_domain_are_clear_errors(run_copy):
    with pytest.raises(ConfigError, match="also training rows"):
        run_rl(_config(run_copy, GRPO, data={"train_source": "sft_val", "eval_source": "sft_val"}), progress=False)
    with pytest.raises(RunDirError, match="no domain 'law'"):
        run_rl(_config(run_copy, GRPO, domain="law"), progress=False)
    with pytest.raises(ConfigError, match="not one of"):
        _config(run_copy, GRPO, algorithm="ppo")


_CHILD = """
import json, sys
from brainstacks_hooks.config import from_dict
from brainstacks_hooks.rl.config import RLConfig
from brainstacks_hooks.rl.round import run_rl
run_rl(from_dict(RLConfig, json.loads(sys.argv[1])), progress=False)
"""


def test_resume_after_kill_mid_round(run_copy):
    cfg = json.loads(json.dumps(GRPO))
    cfg.update(run_dir=str(run_copy), min_improvement=-1.0)
    cfg["trainer"]["max_steps"] = 6
    argv = [sys.executable, "-c", _CHILD, json.dumps(cfg)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = RunDir.open(run_copy).rl_round_dir("code", 2) / BEFORE_FILE
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not marker.is_file():
        time.sleep(0.1)
    killed = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed and marker.is_file(), proc.stderr.read().decode()[-3000:]
    assert not [r for r in RunDir.open(run_copy).manifest.domain("code").rounds if r.kind == "grpo"]

    result = subprocess.run(argv, env=env, capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    m = RunDir.open(run_copy).manifest
    rl = [r for r in m.domain("code").rounds if r.kind == "grpo"]
    assert len(rl) == 1 and rl[0].round == 2 and rl[0].steps == 6
    accepted = sum(1 for d in m.domain_order for r in m.domain(d).rounds if r.accepted)
    stack_files = [p for p in (run_copy / "stacks").glob("*.safetensors") if not p.name.startswith("null_space-")]
    assert len(stack_files) == accepted
    RunDir.open(run_copy).verify_stacks()


def test_cli_rl_runs_and_checks_the_algorithm(run_copy, tmp_path, capsys):
    import yaml

    from brainstacks_hooks.cli.main import main

    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump({**GRPO, "run_dir": str(run_copy), "min_improvement": -1.0}))
    assert main(["-q", "rl", "grpo", str(path), "trainer.max_steps=1"]) == 0
    out = capsys.readouterr().out
    assert "grpo" in out and "accepted" in out
    assert main(["rl", "dpo", str(path)]) == 2
    assert "grpo config" in capsys.readouterr().err


def test_rl_inside_the_curriculum_runs_before_the_next_domain(tiny_model_dir, tmp_path, data_dir):
    """The paper's order: chat SFT -> chat GRPO -> chat null space -> code; zero forgetting still holds."""
    import yaml

    from brainstacks_hooks.rl.round import refine_domain
    from brainstacks_hooks.testing import tiny_run_config
    from brainstacks_hooks.training.outer_loop import run_sft

    rl_yaml = tmp_path / "grpo_chat.yaml"
    rl_yaml.write_text(yaml.safe_dump({**GRPO, "domain": "chat", "min_improvement": -1.0}))
    config = tiny_run_config(tiny_model_dir, tmp_path / "out")
    config.domains[0].rl = [str(rl_yaml)]
    run = run_sft(config, refine=refine_domain)
    chat = run.manifest.domain("chat")
    kinds = [r.kind for r in chat.accepted_rounds()]
    assert kinds[-1] == "grpo" and set(kinds[:-1]) == {"sft"}
    rl_round = chat.accepted_rounds()[-1].round
    assert rl_round in [s.round_index for s in run.stacks.stacks_for("chat")]
    # chat's final prefix loss is its policy with the RL stack, and later domains did not move it
    assert run.stacks.stacks_for("code") and run.manifest.forgetting_summary["max_prefix_drift"] <= 1e-5
    # rerun: everything done, nothing new
    again = run_sft(config, refine=refine_domain)
    assert [r.round for r in again.manifest.domain("chat").rounds] == [r.round for r in chat.rounds]
