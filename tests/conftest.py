"""Shared fixtures: thin wrappers around :mod:`brainstacks_hooks.testing`, the data dir and the embedded SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from brainstacks_hooks import testing

REPO = Path(__file__).resolve().parents[1]
_DEFAULT_DATA = REPO.parent / "shared" / "data"
if "BRAINSTACKS_DATA_DIR" not in os.environ and _DEFAULT_DATA.is_dir():
    os.environ["BRAINSTACKS_DATA_DIR"] = str(_DEFAULT_DATA)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_llama():
    """A fresh :func:`brainstacks_hooks.testing.make_tiny_llama` (seed 0)."""
    return testing.make_tiny_llama()


@pytest.fixture
def add_random_stack():
    """:func:`brainstacks_hooks.testing.add_random_stack`: append a random frozen stack."""
    return testing.add_random_stack


@pytest.fixture
def tiny_batch():
    """:func:`brainstacks_hooks.testing.tiny_batch`: 2 x 12 random tokens, labels = inputs."""
    return testing.tiny_batch()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = os.environ.get("BRAINSTACKS_DATA_DIR")
    if not d or not Path(d).is_dir():
        pytest.fail(f"BRAINSTACKS_DATA_DIR={d!r} is not the shared data directory; set it (make test does) to the "
                    "folder with <domain>/{train,val}.jsonl and eval/")
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
    """:func:`brainstacks_hooks.testing.make_tiny_model_dir`: the tiny Llama saved with the SmolLM2 tokenizer."""
    return testing.make_tiny_model_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_sft_run(tiny_model_dir, tmp_path_factory, data_dir):
    """A finished tiny SFT run (chat, code) on the shared data, shared by several test modules."""
    from brainstacks_hooks.training.outer_loop import run_sft

    return run_sft(testing.tiny_run_config(tiny_model_dir, tmp_path_factory.mktemp("run") / "out"))
