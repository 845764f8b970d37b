"""A 1-expert, top-1 stack of rank r is exactly PEFT's rsLoRA of rank r (the single-LoRA arm of the MoE-LoRA vs
LoRA experiment, recipes/experiments/moe_vs_lora.py, runs through the toolkit for that reason)."""

from __future__ import annotations

import copy

import torch

from brainstacks_hooks.stacks.brainstacks import BrainStacks
from brainstacks_hooks.stacks.config import StackConfig
from brainstacks_hooks.testing import make_tiny_llama, tiny_batch


def test_one_expert_stack_equals_peft_rslora_of_the_same_rank():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    base = make_tiny_llama()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=8, lora_alpha=16, use_rslora=True, lora_dropout=0.0, init_lora_weights=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    stacks = BrainStacks.attach(base, StackConfig(num_experts=1, top_k=1, rank=8, alpha=16.0, use_rslora=True,
                                                  aux_loss_coef=0.0, router_noise=False))
    stack = stacks.new_stack("lora")
    g = torch.Generator().manual_seed(0)
    matched = 0
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        parts = name.split(".")
        key = f"layers.{parts[parts.index('layers') + 1]}.{parts[-1]}"
        m = stack.module_for(key)
        with torch.no_grad():
            module.lora_B["default"].weight.normal_(0.0, 0.1, generator=g)  # PEFT starts B at zero too
            m.A[0].copy_(module.lora_A["default"].weight)  # [r, d_in]
            m.B[0].copy_(module.lora_B["default"].weight)  # [d_out, r]
        assert m.scale == module.scaling["default"]
        matched += 1
    assert matched == len(stacks.keys)
    batch = tiny_batch()
    base.eval()
    peft_model.eval()
    with torch.no_grad():
        ours = base(input_ids=batch["input_ids"]).logits
        theirs = peft_model(input_ids=batch["input_ids"]).logits
        with stacks.base_only():
            bare = base(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, bare, atol=1e-3)  # the adapters do change the output
