"""Shared fixtures: tiny random Llama models, the real data dir and the embedded SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
_DEFAULT_DATA = REPO.parent / "shared" / "data"
if "BRAINSTACKS_DATA_DIR" not in os.environ and _DEFAULT_DATA.is_dir():
    os.environ["BRAINSTACKS_DATA_DIR"] = str(_DEFAULT_DATA)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def make_tiny_llama(seed: int = 0, **overrides):
    """A 2-layer random Llama built from a config (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.eval()
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


def _add_random_stack(stacks, domain: str, seed: int, a_scale: float = 0.2, b_scale: float = 0.2) -> None:
    """New stack for ``domain`` with seeded random A and B (non-zero, so it changes the output), frozen."""
    stacks.new_stack(domain)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in stacks.active.items():
            m.A.copy_(torch.randn(m.A.shape, generator=g) * a_scale)
            m.B.copy_(torch.randn(m.B.shape, generator=g) * b_scale)
    stacks.freeze_active()


@pytest.fixture
def add_random_stack():
    """``add_random_stack(stacks, domain, seed, a_scale=0.2, b_scale=0.2)``: append a random frozen stack."""
    return _add_random_stack


@pytest.fixture
def tiny_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = os.environ.get("BRAINSTACKS_DATA_DIR")
    if not d or not Path(d).is_dir():
        pytest.skip("no BRAINSTACKS_DATA_DIR with the shared data")
    return Path(d)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (model, tokenizer), loaded once per session."""
    from brainstacks_hooks.models.loading import load_base_model

    model, tok = load_base_model("smollm2-135m-instruct", dtype="float32")
    model.eval()
    return model, tok


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random Llama saved with the real SmolLM2 tokenizer."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "training"))
    from pipeline_utils import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_sft_run(tiny_model_dir, tmp_path_factory, data_dir):
    """A finished tiny SFT run (chat, code) on the shared data, shared by several test modules."""
    from pipeline_utils import tiny_run_config

    from brainstacks_hooks.training.outer_loop import run_sft

    return run_sft(tiny_run_config(tiny_model_dir, tmp_path_factory.mktemp("run") / "out"))
