"""The SFT trainer keeps the active stack in fp32 on quantized bases (TRL casts trainable params to bf16)."""

from __future__ import annotations

import torch

from brainstacks_hooks import BrainStacks
from brainstacks_hooks.stacks.config import StackConfig
from brainstacks_hooks.testing import make_tiny_model_dir, tiny_run_config
from brainstacks_hooks.training.trainer import build_trainer, sft_config


def test_active_stack_stays_fp32_when_the_base_reports_4bit(tmp_path):
    from brainstacks_hooks.models.loading import load_base_model

    model_dir = make_tiny_model_dir(tmp_path)
    model, tok = load_base_model(str(model_dir), dtype="float32")
    stacks = BrainStacks.attach(model, StackConfig(rank=4))
    stacks.new_stack("chat")
    with torch.no_grad():
        for _, m in stacks.active.items():
            m.B.normal_(0, 1e-3)  # values a bf16 cast would change
    before = {k: v.clone() for k, v in stacks.active.state_dict().items()}
    cfg = sft_config(tiny_run_config(model_dir, tmp_path / "out").train, str(tmp_path / "trainer"), seed=0)
    ids = tok("hello world", add_special_tokens=False)["input_ids"]
    example = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids}
    model.is_loaded_in_4bit = True  # what TRL's SFTTrainer reads before its bf16 cast of trainable parameters
    try:
        build_trainer(stacks, tok, [example], cfg)
    finally:
        del model.is_loaded_in_4bit
    for k, v in stacks.active.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k]), k
