"""``brainstacks router`` under ``torchrun`` with 2 gloo processes equals one process, and writes ``router/`` once.

The oracle, the features and the loss table are sharded by batch and gathered in order; the main process alone
writes the caches, the router and the report, and trains the router the other process receives. Both runs start
from copies of one finished tiny SFT run, in child processes with one thread each, so the per-batch arithmetic is
the same in both (float tolerance 1e-5 all the same)."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import pytest
import torch

from brainstacks_hooks.testing import RECORD_REPLACES, run_script

pytestmark = pytest.mark.slow

#: ``brainstacks router RUN_DIR --config YAML`` in a process that records every file it replaces (each atomic write
#: ends in ``os.replace``) and what ``prepare_router_inputs`` and ``train_router_for_run`` hand back on this rank.
_CHILD = RECORD_REPLACES + r"""
import json, os, sys
import torch
out, run_dir, config = sys.argv[1], sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
from safetensors.torch import save_file
import brainstacks_hooks.router.pipeline as pipeline
import brainstacks_hooks.router.mode_losses as mode_losses
import brainstacks_hooks.router.oracle as oracle
from brainstacks_hooks.cli.main import main

seen, calls = {}, {"oracle_batches": 0, "loss_forwards": 0}
search, nll = oracle._search_batch, mode_losses.example_nll

def counting_search(*args, **kwargs):
    calls["oracle_batches"] += 1
    return search(*args, **kwargs)

def counting_nll(*args, **kwargs):
    calls["loss_forwards"] += 1
    return nll(*args, **kwargs)

oracle._search_batch, mode_losses.example_nll = counting_search, counting_nll
prepare, train = pipeline.prepare_router_inputs, pipeline.train_router_for_run

def recording_prepare(*args, **kwargs):
    seen["inputs"] = prepare(*args, **kwargs)
    return seen["inputs"]

def recording_train(*args, **kwargs):
    result = train(*args, **kwargs)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    inputs = seen["inputs"]
    tensors = {"features": inputs.data.features, "mask": inputs.data.attention_mask, "targets": inputs.data.targets,
               "test_features": inputs.test_features, "test_oracle_features": inputs.test_oracle_features,
               **{f"router.{k}": v.detach().cpu() for k, v in result.router.state_dict().items()}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, f"rank{rank}.safetensors"))
    records = {r.example_id: {"losses": r.losses, "base_loss": r.base_loss, "route": r.route, "target": r.target}
               for r in inputs.oracle.records}
    report = {k: v for k, v in result.report.items() if k not in ("timing", "total_s")}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"world": world, "writes": writes, "calls": calls, "records": records, "report": report,
                   "timing": result.report["timing"], "prompts": result.train_prompts}, f)
    return result

pipeline.prepare_router_inputs, pipeline.train_router_for_run = recording_prepare, recording_train
sys.exit(main(["-q", "router", run_dir, "--config", config]))
"""


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * max(1.0, abs(a))


def test_router_pipeline_under_torchrun_equals_one_process_and_writes_once(tmp_path, tiny_model_dir, data_dir):
    from safetensors.torch import load_file

    from brainstacks_hooks.router.config import RouterConfig
    from brainstacks_hooks.router.pipeline import RouterPipelineConfig
    from brainstacks_hooks.testing import tiny_run_config
    from brainstacks_hooks.training.outer_loop import run_sft

    # the smallest SFT run that accepts a stack per domain (as tests/router/test_pipeline.py), on the CPU (gloo)
    cfg = tiny_run_config(tiny_model_dir, tmp_path / "sft", max_steps=2, eval_steps=1, learning_rate=2e-2,
                          use_cpu=True)
    cfg.inner.max_inner_rounds = 1
    cfg.null_space.enabled = False
    for dom in cfg.domains:
        dom.train_samples, dom.val_samples = 8, 4
    sft = run_sft(cfg)
    assert sft.stacks.stacks_for("chat") and sft.stacks.stacks_for("code"), "both domains need a stack"
    # batches of 4, so every pass has several batches to deal out, and rounds where the second process gets none
    router = RouterConfig(epochs=2, hidden=16, seq_len=128, oracle_max_length=128, oracle_batch_size=4,
                          feature_batch_size=4)
    pcfg = RouterPipelineConfig(router=router, label_rows_per_domain=4, test_oracle_rows_per_domain=3, mixed_pairs=2,
                                test_mixed_pairs=2, timing_prompts=1, generation_prompts=1, generation_tokens=2,
                                progress=False).to_dict()
    pcfg.pop("run_dir")
    config_file = tmp_path / "router.yaml"
    config_file.write_text(json.dumps(pcfg))  # JSON is YAML
    child = tmp_path / "router_child.py"
    child.write_text(_CHILD)
    runs = {}
    for name in ("single", "ddp"):
        (tmp_path / name).mkdir()
        runs[name] = shutil.copytree(sft.run_dir, tmp_path / name / "run")
    out1 = run_script(child, tmp_path / "single", runs["single"], config_file)
    out2 = run_script(child, tmp_path / "ddp", runs["ddp"], config_file, nproc=2)
    assert out1.count("   report: ") == 1 and out2.count("   report: ") == 1  # printed by the main process only

    one = json.loads((tmp_path / "single" / "rank0.json").read_text())
    rank0, rank1 = (json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (one["world"], rank0["world"], rank1["world"]) == (1, 2, 2)

    # the work was split: each process ran its share of the oracle batches and of the loss-table forwards
    for key in ("oracle_batches", "loss_forwards"):
        shares = (rank0["calls"][key], rank1["calls"][key])
        assert min(shares) > 0 and sum(shares) == one["calls"][key], (key, shares, one["calls"][key])

    # the main process wrote every file once, the same files one process writes; the other process wrote nothing
    def written(state: dict, run) -> Counter:
        return Counter(os.path.relpath(w, run) for w in state["writes"] if w.startswith(str(run)))

    assert not written(rank1, runs["ddp"])
    assert written(rank0, runs["ddp"]) == written(one, runs["single"])
    files = written(rank0, runs["ddp"])
    for rel in ("router/router.json", "router/router.safetensors", "router/report.json", "router/val_routes.json",
                "rows/router.json"):
        assert files[rel] == 1, (rel, files)
    assert any(w.startswith("router/oracle_cache/") for w in files)
    assert any(w.startswith("router/feature_cache/") for w in files)

    # both processes hold the same features, targets and router: identical to each other, and to one process
    t1, t0, t_one = (load_file(tmp_path / d / f"rank{r}.safetensors") for d, r in (("ddp", 1), ("ddp", 0),
                                                                                    ("single", 0)))
    assert t0.keys() == t1.keys() == t_one.keys()
    for k in t0:
        assert torch.equal(t0[k], t1[k]), k
        torch.testing.assert_close(t0[k].float(), t_one[k].float(), rtol=1e-5, atol=1e-5,
                                   msg=lambda m, k=k: f"{k}: {m}")
    assert rank0["records"] == rank1["records"] and rank0["prompts"] == rank1["prompts"] == one["prompts"]
    assert rank0["records"].keys() == one["records"].keys() and len(one["records"]) >= 20
    for eid, rec in one["records"].items():
        mine = rank0["records"][eid]
        assert mine["route"] == rec["route"] and mine["target"] == rec["target"], eid
        assert mine["losses"].keys() == rec["losses"].keys()
        assert all(_close(mine["losses"][k], v) for k, v in rec["losses"].items()), eid
        assert _close(mine["base_loss"], rec["base_loss"])

    # the same report on every process (the main process's timings), equal to one process's
    assert rank0["report"] == rank1["report"] and rank0["timing"] == rank1["timing"]
    assert rank0["timing"]["features_ms_per_prompt"] and rank0["timing"]["oracle_computed"] == len(one["records"])
    for d, row in one["report"]["val_losses"].items():
        theirs = rank0["report"]["val_losses"][d]
        assert row["n_examples"] == theirs["n_examples"] and row["n_tokens"] == theirs["n_tokens"]
        for mode in ("prefix", "isolated", "ungated", "routed", "base", "oracle_cross_fitted"):
            assert _close(theirs[mode], row[mode]), (d, mode)
    for key in ("held_out", "validation", "data", "oracle"):
        assert rank0["report"][key].keys() == one["report"][key].keys()
    on_disk = json.loads((runs["ddp"] / "router" / "report.json").read_text())
    assert {k: v for k, v in on_disk.items() if k not in ("timing", "total_s")} == rank0["report"]
