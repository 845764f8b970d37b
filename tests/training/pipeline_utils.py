"""A tiny on-disk model with the real SmolLM2 tokenizer, and a small run config, for pipeline tests."""

from __future__ import annotations

from pathlib import Path

import torch

from brainstacks_hooks.config import from_dict
from brainstacks_hooks.training.config import RunConfig


def make_tiny_model_dir(root: Path) -> Path:
    """Save a 2-layer random Llama whose vocabulary matches the embedded tokenizer (no download)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from brainstacks_hooks.models.embedded import embedded_model_path

    path = root / "tiny-llama"
    if (path / "config.json").is_file():
        return path
    tok = AutoTokenizer.from_pretrained(embedded_model_path())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_run_config(model_dir: Path, out: Path, domains=("chat", "code"), **train) -> RunConfig:
    """Fast settings: 2 domains, a few steps, 16 train / 8 val rows, 128 tokens."""
    t = dict(max_steps=4, batch_size=4, gradient_accumulation_steps=1, learning_rate=5e-3, warmup_steps=0,
             max_length=128, eval_steps=2, logging_steps=2, eval_batch_size=8, bf16=False)
    t.update(train)
    return from_dict(RunConfig, {
        "output_dir": str(out),
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "stack": {"rank": 4},
        "train": t,
        "inner": {"max_inner_rounds": 2, "min_loss_delta": 0.0001},
        "null_space": {"num_samples": 8, "directions_per_domain": 8, "max_rows": 256},
        "domains": [{"name": d, "train_samples": 16, "val_samples": 8} for d in domains],
    })
