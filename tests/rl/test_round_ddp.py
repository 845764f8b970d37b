"""``brainstacks rl`` under ``torchrun`` with 2 gloo processes: TRL trains DDP, the main process samples the pairs,
measures and writes the run once, every process ends with the same stacks and manifest; a DPO round equals one
process with the same global batch.

As in ``tests/training/test_ddp.py`` the run's stacks have no router noise and no load-balance loss (each process
would draw its own noise, and the load balance is a batch statistic), so the comparison is exact in arithmetic.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from brainstacks_hooks.testing import RECORD_REPLACES, run_script

pytestmark = pytest.mark.slow

#: ``brainstacks rl ALGO CONFIG`` recording every file it replaces and, per process, the manifest and the stacks.
_CHILD = RECORD_REPLACES + r"""
import hashlib, json, os, sys
import torch
out, algo, config, run_dir, per_device = sys.argv[1:6]
torch.set_num_threads(1)
import brainstacks_hooks.rl.round as rl_round
from brainstacks_hooks.cli.main import main

held = {}
run_round = rl_round._run_round

def recording_run_round(run, config, k, progress, loaded):
    result = run_round(run, config, k, progress, loaded)
    held["stacks"] = {f"{s.domain}-r{s.round_index}": {n: t.detach().cpu().tolist() for n, t in s.tensors().items()}
                      for s in loaded[0].frozen_stacks}
    held["record"] = {"status": result.record.status, "steps": result.record.steps,
                      "stop_reason": result.record.stop_reason, "history": result.record.eval_history}
    held["before"], held["after"] = result.before, result.after
    held["manifest"] = run.manifest.to_dict()
    return result

rl_round._run_round = recording_run_round
code = main(["-q", "rl", algo, config, f"run_dir={run_dir}", f"trainer.per_device_train_batch_size={per_device}"])
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"world": world, "writes": writes, **held}, f)
sys.exit(code)
"""

DPO = {"algorithm": "dpo", "domain": "chat", "min_improvement": -1.0, "max_sft_val_loss_increase": None,
       "guard_eval_steps": 1,  # the guard's held-out score (TRL's evaluation: a collective) at every step
       "trainer": {"max_steps": 2, "learning_rate": 5e-3, "max_length": 128, "logging_steps": 1,
                   "lr_scheduler_type": "constant", "warmup_steps": 0, "per_device_eval_batch_size": 2},
       "data": {"train_rows": 8, "eval_rows": 4}, "pairs": {"max_new_tokens": 6, "batch_size": 4},
       "eval": {"batch_size": 4, "sft_val_rows": 4}}
GRPO = {"algorithm": "grpo", "domain": "code", "rewards": ["brainstacks_hooks.testing:length_reward"],
        "min_improvement": -1.0, "max_sft_val_loss_increase": None, "guard_eval_steps": 1, "guard_eval_rows": 2,
        "trainer": {"max_steps": 2, "num_generations": 2, "max_completion_length": 6, "learning_rate": 5e-3,
                    "logging_steps": 1},
        "data": {"train_rows": 4, "eval_source": "sft_val", "eval_rows": 4},
        "eval": {"max_new_tokens": 6, "batch_size": 4, "sft_val_rows": 4}}


@pytest.fixture(scope="module")
def ddp_sft_run(tiny_model_dir, tmp_path_factory, data_dir):
    """A finished tiny SFT run (chat, code) whose stacks have no router noise and no load-balance loss."""
    from brainstacks_hooks.stacks.config import StackConfig
    from brainstacks_hooks.testing import tiny_run_config
    from brainstacks_hooks.training.outer_loop import run_sft

    cfg = tiny_run_config(tiny_model_dir, tmp_path_factory.mktemp("rl_ddp") / "sft", max_steps=2, eval_steps=1,
                          learning_rate=2e-2)
    cfg.stack = StackConfig(rank=4, aux_loss_coef=0.0, router_noise=False, router_init_std=0.5)
    cfg.inner.max_inner_rounds = 1
    cfg.null_space.enabled = False
    return run_sft(cfg).run_dir


def _launch(tmp_path, name, run_dir, algo, config, per_device, nproc):
    import shutil

    root = tmp_path / name
    root.mkdir()
    run = shutil.copytree(run_dir, root / "run")
    config_file = root / "rl.yaml"
    config_file.write_text(json.dumps(config))  # JSON is YAML
    child = root / "child.py"
    child.write_text(_CHILD)
    stdout = run_script(child, root, algo, config_file, run, str(per_device), nproc=nproc)
    states = [json.loads((root / f"rank{r}.json").read_text()) for r in range(nproc)]
    return run, stdout, states


def _written(state, run) -> Counter:
    return Counter(os.path.relpath(w, run) for w in state["writes"] if w.startswith(str(run)))


def _same_on_every_process(states, run):
    first = states[0]
    assert first["world"] == len(states) and all(s["world"] == len(states) for s in states)
    for other in states[1:]:
        assert other["manifest"] == first["manifest"] and other["record"] == first["record"]
        assert other["stacks"] == first["stacks"]  # bit-identical: DDP keeps the replicas equal
        assert other["before"] == first["before"] and other["after"] == first["after"]
        assert not _written(other, run)  # only the main process writes the run


def _close(a, b, tol=1e-4):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(a - b) <= tol * max(1.0, abs(a))
    return a == b


def test_dpo_round_under_torchrun_equals_one_process_and_writes_once(tmp_path, ddp_sft_run):
    run1, _, (one,) = _launch(tmp_path, "single", ddp_sft_run, "dpo", DPO, 4, 1)
    run2, out2, states = _launch(tmp_path, "ddp", ddp_sft_run, "dpo", DPO, 2, 2)
    _same_on_every_process(states, run2)
    assert out2.count("manifest: ") == 1  # the summary is printed by the main process only
    main = states[0]
    assert _written(main, run2) == _written(one, run1)  # the same files as one process, each once
    assert main["record"]["status"] == one["record"]["status"] == "accepted"
    assert main["record"]["steps"] == one["record"]["steps"] == 2
    assert [h["decision"] for h in main["record"]["history"]] == [h["decision"] for h in one["record"]["history"]]
    assert len(main["record"]["history"]) == 2  # the guard scored both steps on every process
    for key in ("before", "after"):
        assert _close(main[key], one[key]), (key, main[key], one[key])
    new = [Path(f).stem for f in _written(one, run1) if f.startswith("stacks/chat-r")]  # the RL round's stack
    assert len(new) == 1 and new[0] in one["stacks"] and main["stacks"].keys() == one["stacks"].keys()
    for k in one["stacks"]:  # Adam's first steps normalise tiny gradients: a 1e-7 sum-order difference can grow
        for name, t in one["stacks"][k].items():
            torch.testing.assert_close(torch.tensor(main["stacks"][k][name]), torch.tensor(t), rtol=1e-3, atol=1e-5)
    trained = torch.tensor(one["stacks"][new[0]][next(n for n in one["stacks"][new[0]] if n.endswith(".B"))])
    assert trained.abs().max() > 0  # B starts at zero: the RL stack did train


def test_grpo_round_under_torchrun_runs_ddp_and_writes_once(tmp_path, ddp_sft_run):
    run, out, states = _launch(tmp_path, "grpo", ddp_sft_run, "grpo", GRPO, 2, 2)
    _same_on_every_process(states, run)
    assert out.count("manifest: ") == 1
    main = states[0]
    assert main["record"]["status"] == "accepted" and main["record"]["steps"] == 2
    files = _written(main, run)
    assert files["manifest.json"] >= 1 and any(f.startswith("stacks/code-r") for f in files)
    assert any(f.endswith("metrics_before.json") for f in files) and any(f.endswith("samples.json") for f in files)


def test_rl_inside_the_curriculum_under_torchrun_equals_one_process(tmp_path, tiny_model_dir, data_dir):
    """``brainstacks train`` with a DPO round in chat's ``rl:`` list (chat SFT -> chat DPO -> chat null space ->
    code), 2 gloo processes against one with the same global batches: same rounds and decisions, stacks within
    float tolerance, every process ending alike, the run written by the main process alone."""
    from brainstacks_hooks.config import to_dict
    from brainstacks_hooks.run_dir import RunDir
    from brainstacks_hooks.stacks.config import StackConfig
    from brainstacks_hooks.testing import SFT_CHILD, tiny_run_config

    config = tiny_run_config(tiny_model_dir, tmp_path / "unused", batch_size=4, max_steps=3, eval_batch_size=2)
    config.stack = StackConfig(rank=4, aux_loss_coef=0.0, router_noise=False, router_init_std=0.5)
    config.inner.max_inner_rounds = 1
    child = tmp_path / "train_child.py"
    child.write_text(SFT_CHILD)
    runs = {}
    for name, per_device, nproc in (("single", 4, 1), ("ddp", 2, 2)):
        root = tmp_path / name
        root.mkdir()
        rl_yaml = root / "dpo_chat.yaml"
        dpo = json.loads(json.dumps(DPO))
        dpo["trainer"]["per_device_train_batch_size"] = per_device
        rl_yaml.write_text(json.dumps(dpo))
        config.domains[0].rl = [str(rl_yaml)]
        config_file = root / "config.yaml"
        config_file.write_text(json.dumps(to_dict(config)))  # JSON is YAML
        out = run_script(child, root, config_file, str(per_device), nproc=nproc)
        assert out.count("zero forgetting:") == 1  # the summary, by the main process only
        runs[name] = [json.loads((root / f"rank{r}.json").read_text()) for r in range(nproc)]
    (one,), (rank0, rank1) = runs["single"], runs["ddp"]
    assert rank1["manifest"] == rank0["manifest"] and rank1["stacks"] == rank0["stacks"]
    assert not _written(rank1, tmp_path / "ddp" / "run")
    assert _written(rank0, tmp_path / "ddp" / "run") == _written(one, tmp_path / "single" / "run")

    def rounds(state):
        m = state["manifest"]
        return {d: [(r["round"], r["kind"], r["status"]) for r in m["domains"][d]["rounds"]] for d in m["domain_order"]}

    assert rounds(rank0) == rounds(one)
    assert [k for _, k, s in rounds(one)["chat"] if s == "accepted"][-1] == "dpo"  # the RL round came before code
    from safetensors.torch import load_file

    ddp_run = RunDir.open(tmp_path / "ddp" / "run", require_finished=True)
    ref = RunDir.open(tmp_path / "single" / "run", require_finished=True)
    ddp_run.verify_stacks()
    for d in ref.manifest.domain_order:
        for r in ref.manifest.accepted_rounds(d):
            a, b = load_file(ref.path / r.file), load_file(ddp_run.path / r.file)
            for k in a:  # as tests/training/test_ddp.py: each round trains on stacks that differ in their last bits
                torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=3e-4,
                                           msg=lambda m, k=k, f=r.file: f"{f}/{k}: {m}")
