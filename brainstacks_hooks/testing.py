"""Test utilities: tiny random models, random stacks and a character tokenizer (no download).

Importable like ``transformers.testing_utils``; the test suite's fixtures (``tests/conftest.py``) are thin
wrappers around these functions, and tests import them from here rather than from ``conftest`` or
helper files next to the tests. Nothing here is used by the library itself; heavy imports are local.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RECORD_REPLACES",
    "SFT_CHILD",
    "TINY_LLAMA_CONFIG",
    "CharTokenizer",
    "add_random_stack",
    "logits",
    "make_tiny_llama",
    "make_tiny_model_dir",
    "run_script",
    "save_random_router",
    "tiny_batch",
    "tiny_run_config",
]

#: The tiny Llama of the tests: 2 layers, hidden 32, 4 heads (2 KV heads), vocabulary 96.
TINY_LLAMA_CONFIG: dict[str, Any] = dict(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
)


def make_tiny_llama(seed: int = 0, **overrides: Any):
    """A random ``LlamaForCausalLM`` built from :data:`TINY_LLAMA_CONFIG` updated with ``overrides``, in eval mode.

    The weights depend only on ``seed`` (``torch.manual_seed(seed)`` right before construction).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {**TINY_LLAMA_CONFIG, **overrides}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.eval()
    return model


def add_random_stack(stacks, domain: str, seed: int, a_scale: float = 0.2, b_scale: float = 0.2, *,
                     router_scale: float | None = None, rounds: int = 1, freeze: bool = True) -> None:
    """Append ``rounds`` stacks for ``domain`` with seeded random weights (non-zero B, so they change the output).

    Round ``r`` draws from ``torch.Generator().manual_seed(seed + r)``, module by module: A ~ N(0, a_scale^2),
    B ~ N(0, b_scale^2) and, when ``router_scale`` is given, router ~ N(0, router_scale^2) (otherwise the
    router keeps its initialisation). Each stack is frozen, except with ``freeze=False``, which leaves the last
    one active (for a test that trains or inspects an active stack).
    """
    for r in range(rounds):
        stacks.new_stack(domain)
        g = torch.Generator().manual_seed(seed + r)
        with torch.no_grad():
            for _, m in stacks.active.items():
                m.A.copy_(torch.randn(m.A.shape, generator=g) * a_scale)
                m.B.copy_(torch.randn(m.B.shape, generator=g) * b_scale)
                if router_scale is not None:
                    m.router.copy_(torch.randn(m.router.shape, generator=g) * router_scale)
        if freeze or r < rounds - 1:
            stacks.freeze_active()


def tiny_batch(seed: int = 1, batch: int = 2, length: int = 12, vocab_size: int = 96) -> dict[str, torch.Tensor]:
    """A random causal-LM batch (``input_ids``, ``attention_mask`` of ones, ``labels`` = ``input_ids``)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits on ``batch`` without gradients."""
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


class CharTokenizer:
    """Character-level stand-in for a HF tokenizer: no chat template (the fallback prompt format), no BOS."""

    pad_token_id, eos_token_id, bos_token_id = 0, 2, None
    chat_template = None
    all_special_ids = [0, 2]
    name_or_path = "char"

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [3 + ord(c) % 90 for c in text]}

    def __len__(self) -> int:
        return 96


def make_tiny_model_dir(root: str | Path) -> Path:
    """Save the tiny Llama, with the vocabulary and tokenizer of the embedded SmolLM2, under ``root/tiny-llama``.

    Reuses the folder when it already holds a model. No download beyond the embedded model's own first use.
    """
    from transformers import AutoTokenizer

    from .models.embedded import embedded_model_path

    path = Path(root) / "tiny-llama"
    if (path / "config.json").is_file():
        return path
    tok = AutoTokenizer.from_pretrained(embedded_model_path())
    model = make_tiny_llama(vocab_size=len(tok), max_position_embeddings=256, tie_word_embeddings=True,
                            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_run_config(model_dir: str | Path, out: str | Path, domains=("chat", "code"), **train: Any):
    """A fast SFT :class:`~brainstacks_hooks.run_config.RunConfig` on the tiny model of ``model_dir``.

    Two domains by default, a few steps, 16 train / 8 val rows, 128 tokens; ``train`` overrides ``TrainArgs``.
    """
    from .config import from_dict
    from .run_config import RunConfig

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
        "router_rows": {"train_per_domain": 6, "test_per_domain": 6},
    })


def save_random_router(run_dir: str | Path, stacks: Any, *, seed: int = 0, hidden: int = 16,
                       weight_std: float | None = None) -> None:
    """Save an untrained :class:`~brainstacks_hooks.router.model.MetaRouter` into ``run_dir/router``, bound to the
    run's stacks (``stacks``: a :class:`BrainStacks` attached to the run's base model, for its fingerprint).

    ``weight_std``: redraw every router parameter from N(0, std) (scores spread over (0, 1): routes that differ
    from prompt to prompt); ``None`` keeps the initialisation (scores near 0.5).
    """
    from .router.config import RouterConfig
    from .router.model import MetaRouter
    from .router.serialization import save_router
    from .run_dir import RunDir

    torch.manual_seed(seed)
    router = MetaRouter(token_dim=stacks.model.config.hidden_size, domains=stacks.domains, hidden=hidden).eval()
    if weight_std is not None:
        with torch.no_grad():
            for p in router.parameters():
                p.normal_(0.0, weight_std)
    cfg = RouterConfig()
    save_router(router, cfg, Path(run_dir) / "router", feature_recipe=cfg.feature_recipe(),
                base_fingerprint=stacks.fingerprint_dict(), stacks=RunDir.open(run_dir).stack_index().identity())


class ModelLoad(AssertionError):
    """Raised when anything tries to load a model while :func:`forbid_model_loads` is in force."""


def forbid_model_loads(monkeypatch) -> None:
    """Any model load from here on raises (TRL's reload goes through ``<Architecture>.from_pretrained``)."""
    import transformers
    import trl.trainer.dpo_trainer as dpo_mod
    import trl.trainer.grpo_trainer as grpo_mod
    from transformers.modeling_utils import PreTrainedModel

    def boom(*args, **kwargs):
        raise ModelLoad(f"a model load was attempted: {args[:2]}")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(lambda cls, *a, **k: boom(*a, **k)))
    for mod in (dpo_mod, grpo_mod):
        if hasattr(mod, "create_model_from_path"):
            monkeypatch.setattr(mod, "create_model_from_path", boom)


@contextlib.contextmanager
def nan_loss_at_step(trainer: Any, step: int) -> Iterator[None]:
    """Make an RL trainer's loss NaN at ``global_step == step`` inside the block.

    Patches ``compute_loss`` of the TRL parent (``Stack*Trainer -> _StackRLMixin -> trl.*Trainer``), so the
    toolkit's own ``compute_loss`` (which feeds the guard) sees the poisoned value.
    """
    import pytest

    base = type(trainer).__mro__[2]
    parent = base.compute_loss

    def poisoned(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = parent(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        return out * float("nan") if self.state.global_step == step else out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(base, "compute_loss", poisoned)
        yield


def length_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """A reward with a spread on any model (the completion's length in characters / 100): GRPO plumbing tests
    reference it as ``brainstacks_hooks.testing:length_reward``."""
    return [len(c if isinstance(c, str) else str(c)) / 100.0 for c in completions]


#: Start of a child script (see :func:`run_script`) that records the destination of every ``os.replace`` in the
#: list ``writes``: each atomic write of the toolkit ends in one, so a test can count who wrote which file.
RECORD_REPLACES = r"""
import os
writes, _replace = [], os.replace

def recording_replace(src, dst, *args, **kwargs):
    writes.append(os.path.abspath(os.fspath(dst)))
    return _replace(src, dst, *args, **kwargs)

os.replace = recording_replace
"""


#: ``brainstacks train CONFIG`` (child script arguments: ``OUT CONFIG PER_DEVICE [OVERRIDE ...]``) in a process
#: that records every file it replaces (each atomic write ends in ``os.replace``) and, when ``run_sft``
#: returns, what it holds: manifest, digests of its stacks and bases, in ``OUT/rank<r>.json``.
SFT_CHILD = RECORD_REPLACES + r"""
import hashlib, json, os, sys
import torch
out, config, per_device, extra = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
torch.set_num_threads(1)
import brainstacks_hooks.training.outer_loop as outer_loop
from brainstacks_hooks.cli.main import main

def digest(tensors):
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode() + tensors[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

run_sft = outer_loop.run_sft

def recording_run_sft(*args, **kwargs):
    result = run_sft(*args, **kwargs)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    state = {"world": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
             "manifest": result.manifest.to_dict(), "writes": writes,
             "stacks": {f"{s.domain}-r{s.round_index}": digest(s.state_dict()) for s in result.stacks.frozen_stacks},
             "bases": {d: digest(b) for d, b in result.stacks.null_space_bases.items()}}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(state, f)
    return result

outer_loop.run_sft = recording_run_sft
sys.exit(main(["train", config, f"output_dir={out}/run", f"train.batch_size={per_device}", *extra]))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script: str | Path, *args: str, nproc: int = 1, timeout: int = 600) -> str:
    """Run a Python script in a fresh process (``nproc > 1``: under ``torchrun`` with that many gloo processes on
    this machine); returns its stdout, asserting it exited 0 (the tail of its stderr in the message).

    The child gets one intra-op thread each and none of the caller's ``torch.distributed`` variables.
    """
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                     f"--master_port={_free_port()}"]
    result = subprocess.run([*launcher, str(script), *map(str, args)], env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout
