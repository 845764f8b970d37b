"""Several processes through the HF Trainer: a 2-process CPU ``gloo`` DDP run of a few SFT steps trains the same
active stack (within float tolerance) as one process with the same global batch; so does the whole SFT recipe
(``brainstacks train`` under ``torchrun``), with the run directory written once, by the main process.

The comparison is exact in arithmetic, so the settings remove what legitimately differs between the two: the
router noise (each rank draws its own), the load-balance loss (a batch statistic: two halves are not the whole)
and per-example token counts (every example has the same number of labelled tokens)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from brainstacks_hooks.testing import SFT_CHILD, run_script

pytestmark = pytest.mark.slow

_CHILD = r"""
import os, sys
import torch
from safetensors.torch import save_file
from brainstacks_hooks.run_config import TrainArgs
from brainstacks_hooks.stacks.brainstacks import BrainStacks
from brainstacks_hooks.stacks.config import StackConfig
from brainstacks_hooks.models.loading import load_base_model
from brainstacks_hooks.training.trainer import build_trainer, sft_config

out, per_device, model_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(1)
model, tok = load_base_model(model_dir, dtype="float32")
stacks = BrainStacks.attach(model, StackConfig(rank=4, aux_loss_coef=0.0, router_noise=False, router_init_std=0.5))
torch.manual_seed(0)
stacks.new_stack("a")
g = torch.Generator().manual_seed(0)
examples = []
for _ in range(16):
    ids = torch.randint(3, 96, (12,), generator=g).tolist()
    examples.append({"input_ids": ids, "attention_mask": [1] * 12, "labels": [-100] * 4 + ids[4:]})
args = TrainArgs(max_steps=3, batch_size=per_device, gradient_accumulation_steps=1, learning_rate=1e-2,
                 warmup_steps=0, weight_decay=0.0, lr_scheduler_type="constant", max_length=32, logging_steps=1,
                 bf16=False, use_cpu=True)
cfg = sft_config(args, out + "/trainer", seed=0)
trainer = build_trainer(stacks, tok, examples, cfg)
trainer.train()
if int(os.environ.get("RANK", "0")) == 0:
    state = {k: v.detach().contiguous() for k, v in stacks.active.state_dict().items()}
    save_file(state, out + "/active.safetensors")
    print("world", int(os.environ.get("WORLD_SIZE", "1")), "steps", trainer.state.global_step)
"""


def test_two_process_gloo_ddp_equals_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    child = tmp_path / "child.py"
    child.write_text(_CHILD)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    out1 = run_script(child, single, "4", tiny_model_dir)
    out2 = run_script(child, ddp, "2", tiny_model_dir, nproc=2)
    assert "world 1 steps 3" in out1 and "world 2 steps 3" in out2
    a, b = load_file(single / "active.safetensors"), load_file(ddp / "active.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    b_keys = [k for k in a if k.split(".")[-1] == "B"]
    assert b_keys and any(a[k].abs().max() > 0 for k in b_keys)  # B starts at zero: the stack did train




def _rounds(manifest: dict) -> dict:
    return {d: [(r["round"], r["status"], r["file"]) for r in manifest["domains"][d]["rounds"]]
            for d in manifest["domain_order"]}


def test_sft_recipe_under_torchrun_writes_the_run_once_and_equals_one_process(tmp_path, tiny_model_dir, data_dir):
    """``brainstacks train`` with 2 gloo processes: the run completes, the main process alone writes the run
    directory (each stack file exactly once), both processes end with the same manifest and bit-identical
    stacks, and the run equals (domains, rounds, accepted flags; stacks within float tolerance) one process
    with the same global batch."""
    from safetensors.torch import load_file

    from brainstacks_hooks.config import to_dict
    from brainstacks_hooks.run_dir import RunDir
    from brainstacks_hooks.stacks.config import StackConfig
    from brainstacks_hooks.testing import tiny_run_config

    # 3 steps of 4 rows stay inside each domain's first epoch (15 rows after cleaning): a last, shorter batch would
    # differ under DDP, where accelerate fills it up with rows from the start of the epoch (``even_batches``)
    # (eval_batch_size 2: the validation batches are spread over both processes)
    config = tiny_run_config(tiny_model_dir, tmp_path / "unused", batch_size=4, max_steps=3, eval_batch_size=2)
    config.stack = StackConfig(rank=4, aux_loss_coef=0.0, router_noise=False, router_init_std=0.5)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(json.dumps(to_dict(config)))  # JSON is YAML
    child = tmp_path / "train_child.py"
    child.write_text(SFT_CHILD)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    run_script(child, single, config_file, "4")
    out = run_script(child, ddp, config_file, "2", nproc=2)
    assert out.count("zero forgetting:") == 1  # the summary table is printed by the main process only

    one = json.loads((single / "rank0.json").read_text())
    rank0, rank1 = (json.loads((ddp / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (one["world"], rank0["world"], rank1["world"]) == (1, 2, 2)
    # every process ends with the main process's manifest and the same stacks and null-space bases
    assert rank1["manifest"] == rank0["manifest"]
    assert rank1["stacks"] == rank0["stacks"] and rank1["bases"] == rank0["bases"]
    # the main process wrote the run directory, each stack file exactly once; the other process wrote nothing
    run_path = str(ddp / "run")
    assert not [w for w in rank1["writes"] if w.startswith(run_path)]
    written = [os.path.relpath(w, run_path) for w in rank0["writes"] if w.startswith(run_path)]
    tensor_files = [w for w in written if w.startswith("stacks/") and w.endswith(".safetensors")]
    assert tensor_files and len(tensor_files) == len(set(tensor_files))  # stacks and null-space bases
    stack_files = [w for w in tensor_files if not os.path.basename(w).startswith("null_space-")]
    assert {"manifest.json", "stacks/brainstacks.json", "forgetting.json", "rows/sft_train.jsonl"} <= set(written)
    # a valid finished run, equal in its decisions to one process with the same global batch
    run = RunDir.open(ddp / "run", require_finished=True)
    run.verify_stacks()
    assert len(run.open_stacks().frozen_stacks) == len(stack_files)  # strict load through the index
    assert rank0["manifest"] == run.manifest.to_dict()
    reference = RunDir.open(single / "run", require_finished=True)
    assert _rounds(run.manifest.to_dict()) == _rounds(reference.manifest.to_dict())
    assert sorted(stack_files) == sorted(r.file for d in run.manifest.domain_order
                                         for r in run.manifest.accepted_rounds(d))
    assert {w for w in tensor_files if w not in stack_files} == {
        run.manifest.domain(d).null_space.file for d in run.manifest.domain_order}
    for d in run.manifest.domain_order:  # the same losses, to float noise (measured: ~1e-7)
        for mine, theirs in zip(run.manifest.domain(d).rounds, reference.manifest.domain(d).rounds):
            for name in ("loss_before", "best_val_loss", "frozen_val_loss"):
                a, b = getattr(theirs, name), getattr(mine, name)
                assert (a is None) == (b is None) and (a is None or abs(a - b) < 1e-5), (d, mine.round, name, a, b)
    # the stacks within float tolerance: looser than the one-trainer test above (atol 1e-6), as each round trains
    # on stacks and null-space bases (an SVD) that already differ in their last bits, and Adam turns tiny gradient
    # differences of near-zero gradients into whole steps (measured: up to 8e-5 on weights of up to 1.8)
    for rel in stack_files:  # same file names in both runs (the rounds are equal)
        a, b = load_file(single / "run" / rel), load_file(ddp / "run" / rel)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=3e-4, msg=lambda m, k=k, f=rel: f"{f} {k}: {m}")


_HELPERS_CHILD = r"""
import json, os, sys
import torch
from brainstacks_hooks.errors import RunDirError
from brainstacks_hooks.loss import completion_nll
from brainstacks_hooks.testing import make_tiny_llama
from brainstacks_hooks.utils import distributed

torch.set_num_threads(1)
assert distributed.launched_distributed() and distributed.init_distributed(cpu=True)
rank, out = distributed.rank(), {}
out["result"] = distributed.on_main_process(lambda: "written by 0")

def fail():
    raise RunDirError("bad run dir")

try:
    distributed.on_main_process(fail)
except RunDirError as e:
    out["error"] = str(e)
out["broadcast"] = distributed.broadcast_object(rank + 10)
out["mapped"] = distributed.map_sharded(lambda x: [x * x, distributed.rank()], list(range(5)))

def fail_on_3(x):
    if x == 3:
        raise RunDirError(f"item {x}")
    return x

try:
    distributed.map_sharded(fail_on_3, list(range(5)))
except RunDirError as e:
    out["map_error"] = str(e)
g = torch.Generator().manual_seed(0)
examples = []
for n in (5, 9, 7, 12, 6):  # 5 examples in batches of 2: 3 batches, the last one short
    ids = torch.randint(3, 96, (n,), generator=g).tolist()
    examples.append({"input_ids": ids, "attention_mask": [1] * n, "labels": [-100] * 2 + ids[2:]})
model = make_tiny_llama()
sums, counts = completion_nll(model, examples, 0, batch_size=2, shard=True)
ref_sums, ref_counts = completion_nll(model, examples, 0, batch_size=2)
out["sharded_equals_whole"] = torch.equal(sums, ref_sums) and torch.equal(counts, ref_counts)
out["n"] = len(sums)
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump(out, f)
"""


def test_distributed_helpers_under_two_gloo_processes(tmp_path):
    """``on_main_process`` runs on rank 0 only and raises its error on every rank; ``map_sharded`` deals items out
    and gathers them in order; sharded evaluation gives every rank exactly the per-example numbers of one process
    evaluating every batch, in order."""
    child = tmp_path / "helpers_child.py"
    child.write_text(_HELPERS_CHILD)
    run_script(child, tmp_path, nproc=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["result"], r1["result"]) == ("written by 0", None)
    assert r0["error"] == r1["error"] == "bad run dir"
    assert r0["broadcast"] == r1["broadcast"] == 10
    # map_sharded: item i computed by rank i % 2, gathered in order on both; an error of one rank raised on both
    assert r0["mapped"] == r1["mapped"] == [[0, 0], [1, 1], [4, 0], [9, 1], [16, 0]]
    assert r0["map_error"] == r1["map_error"] == "item 3"
    assert r0["sharded_equals_whole"] and r1["sharded_equals_whole"] and r0["n"] == r1["n"] == 5
