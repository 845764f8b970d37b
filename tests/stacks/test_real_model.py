"""Stacks on the embedded SmolLM2 (fp32 and bitsandbytes NF4 on CPU) with real chat rows."""

from __future__ import annotations

import pytest
import torch

from brainstacks_hooks import BrainStacks, StackConfig
from brainstacks_hooks.data.formatting import CompletionCollator, encode_example
from brainstacks_hooks.data.sources import load_domain_rows
from brainstacks_hooks.utils.import_utils import is_bitsandbytes_available

pytestmark = pytest.mark.slow


def _chat_batch(tok, data_dir, n=4):
    rows, _ = load_domain_rows("chat", "train", data_dir=data_dir, n=40, seed=0)
    exs = [e for e in (encode_example(tok, r["instruction"], r["input"], r["output"], 96) for r in rows) if e][:n]
    return CompletionCollator(tok.pad_token_id)(exs)


def test_few_steps_of_a_new_stack_lower_the_loss_on_real_chat_rows(smollm2, data_dir):
    model, tok = smollm2
    batch = _chat_batch(tok, data_dir)
    stacks = BrainStacks.attach(model, StackConfig(rank=8))
    try:
        stacks.new_stack("chat")
        with torch.no_grad():
            before = model(**batch).loss.item()
        model.train()
        opt = torch.optim.AdamW(stacks.trainable_parameters(), lr=2e-3)
        for _ in range(6):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            after = model(**batch).loss.item()
        assert after < before - 0.05, (before, after)
    finally:
        stacks.detach()


@pytest.mark.bnb
@pytest.mark.skipif(not is_bitsandbytes_available(), reason="bitsandbytes not installed")
def test_hooks_on_linear4bit_identity_training_and_trainer(data_dir):
    import bitsandbytes as bnb

    from brainstacks_hooks.models.loading import load_base_model
    from brainstacks_hooks.training.config import TrainArgs
    from brainstacks_hooks.training.trainer import build_trainer, sft_config

    model, tok = load_base_model("smollm2-135m-instruct", backend="bnb4")
    model.eval()
    batch = _chat_batch(tok, data_dir, n=2)
    with torch.no_grad():
        base = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    stacks = BrainStacks.attach(model, StackConfig(rank=4))
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in stacks.targets.values())
    assert stacks.shapes["layers.0.gate_proj"] == (576, 1536)  # read from the module, not the packed weight
    stacks.new_stack("chat")
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, base)
    model.train()
    model(**batch).loss.backward()
    assert stacks.active.module_for("layers.3.q_proj").B.grad.abs().sum() > 0
    model.zero_grad()
    examples = [{"input_ids": r[m].tolist(), "attention_mask": [1] * int(m.sum()), "labels": lab[m].tolist()}
                for r, m, lab in zip(batch["input_ids"], batch["attention_mask"].bool(), batch["labels"])]
    args = TrainArgs(max_steps=1, batch_size=2, gradient_accumulation_steps=1, bf16=False, max_length=96)
    trainer = build_trainer(stacks, tok, examples, sft_config(args, "/tmp/bs_bnb_trainer", 0))
    trainer.train()  # a purely quantized model trains through the narrowly scoped validator guard
    assert trainer.state.global_step == 1
