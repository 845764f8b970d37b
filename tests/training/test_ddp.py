"""Several processes through the HF Trainer: a 2-process CPU ``gloo`` DDP run of a few SFT steps trains the same
active stack (within float tolerance) as one process with the same global batch.

The comparison is exact in arithmetic, so the settings remove what legitimately differs between the two: the
router noise (each rank draws its own), the load-balance loss (a batch statistic: two halves are not the whole)
and per-example token counts (every example has the same number of labelled tokens)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(argv: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_two_process_gloo_ddp_equals_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    child = tmp_path / "child.py"
    child.write_text(_CHILD)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    out1 = _run([sys.executable, str(child), str(single), "4", str(tiny_model_dir)], env)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}"]
    out2 = _run([*torchrun, str(child), str(ddp), "2", str(tiny_model_dir)], env)
    assert "world 1 steps 3" in out1 and "world 2 steps 3" in out2
    a, b = load_file(single / "active.safetensors"), load_file(ddp / "active.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    b_keys = [k for k in a if k.split(".")[-1] == "B"]
    assert b_keys and any(a[k].abs().max() > 0 for k in b_keys)  # B starts at zero: the stack did train
