"""The unsloth backend's plumbing on the embedded SmolLM2, through Unsloth's CPU backend.

Runs in the Unsloth environment only (``make test-unsloth``: ``.venv-unsloth``, the ``unsloth`` extra with
torchvision removed); elsewhere the module is skipped at import. On a CPU-only machine Unsloth 2026.10 falls
back to stock transformers (``unsloth_zoo.cpu.FastCPUModel``: bf16 weights, chunked cross-entropy, its own
``generate`` wrapper and TRL trainer defaults), so these tests cover loading, attaching, training and the
bypass guard on that path, not Unsloth's GPU kernels or fast decode (see research/unsloth_hooks.md). On a
GPU the same tests run against the real FastLlamaModel path; the generation test then accepts either a
hook-firing decode or a :class:`StackBypassed`, but never silently ignored stacks.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from types import MethodType, SimpleNamespace

import pytest

unsloth = pytest.importorskip("unsloth")  # first, so Unsloth patches transformers/TRL before they are used

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from brainstacks_hooks import BrainStacks, StackConfig  # noqa: E402
from brainstacks_hooks.data.formatting import CompletionCollator, encode_example  # noqa: E402
from brainstacks_hooks.data.sources import load_domain_rows  # noqa: E402
from brainstacks_hooks.errors import BackendUnavailable, ConfigError, StackBypassed  # noqa: E402
from brainstacks_hooks.models.backend_unsloth import (  # noqa: E402
    ENV_UNSLOTH_CPU,
    UNSLOTH_BACKEND_FLAG,
    check_unsloth_usable,
)
from brainstacks_hooks.models.loading import load_base_model  # noqa: E402
from brainstacks_hooks.testing import add_random_stack  # noqa: E402

pytestmark = [pytest.mark.unsloth, pytest.mark.slow]

ON_CPU = not torch.cuda.is_available()
N_LAYERS, N_PROJ = 30, 7  # SmolLM2-135M: 30 decoder layers x 7 projections
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def unsloth_model():
    """The embedded SmolLM2 loaded with ``backend="unsloth"`` once (CPU backend allowed explicitly)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("UNSLOTH_DECODE_CUDA_GRAPHS", raising=False)
        model, tok = load_base_model("smollm2-135m-instruct", backend="unsloth", allow_cpu=True, max_seq_length=256)
        decode_graphs = os.environ.get("UNSLOTH_DECODE_CUDA_GRAPHS")
    model.eval()
    return SimpleNamespace(model=model, tok=tok, decode_graphs=decode_graphs)


@contextlib.contextmanager
def attached(model, **config):
    stacks = BrainStacks.attach(model, StackConfig(rank=4, **config))
    try:
        yield stacks
    finally:
        stacks.detach()
        model.eval()


@contextlib.contextmanager
def count_calls(stacks):
    """Count projection hook calls per key, and top-level forwards (``counts["__model__"]``)."""
    counts: Counter = Counter()
    handles = [m.register_forward_hook(lambda mod, a, o, k=k: counts.update([k])) for k, m in stacks.targets.items()]
    handles.append(stacks.model.register_forward_pre_hook(lambda mod, a: counts.update(["__model__"])))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def _prompt(model, tok):
    return {k: v.to(model.device) for k, v in tok([PROMPT], return_tensors="pt").items()}


def _chat_examples(tok, data_dir, n=2, max_length=48):
    rows, _ = load_domain_rows("chat", "train", data_dir=data_dir, n=20, seed=0)
    exs = (encode_example(tok, r["instruction"], r["input"], r["output"], max_length) for r in rows)
    return [e for e in exs if e][:n]


def _snapshot(stack):
    return {n: p.detach().clone() for n, p in stack.named_parameters()}


def _changed(stack, before):
    return {n for n, p in stack.named_parameters() if not torch.equal(p.detach(), before[n])}


def _generate(model, tok, **kw):
    return model.generate(**_prompt(model, tok), max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id,
                          output_scores=True, return_dict_in_generate=True, **kw)


def test_loads_through_unsloth_with_the_backend_guards(unsloth_model, monkeypatch):
    model = unsloth_model.model
    assert model._brainstacks_backend == UNSLOTH_BACKEND_FLAG
    assert model._brainstacks_source["backend"] == "unsloth"
    assert unsloth_model.decode_graphs == "0"  # set before importing Unsloth's model code
    assert not hasattr(model, "peft_config") and not any("lora_" in n for n, _ in model.named_modules())
    assert "generate" in vars(model)  # Unsloth's own generate, bound on the instance
    if ON_CPU:
        assert unsloth.DEVICE_TYPE == "cpu" and model.device.type == "cpu"
        assert vars(model).get("_unsloth_cpu_chunked_ce") is True  # the CPU backend's training forward
        # Without the explicit request the default one-line error stands, raised before any import.
        monkeypatch.delenv(ENV_UNSLOTH_CPU, raising=False)
        with pytest.raises(BackendUnavailable, match="needs a CUDA GPU"):
            load_base_model("some/model", backend="unsloth")
        monkeypatch.setenv(ENV_UNSLOTH_CPU, "1")
        check_unsloth_usable()
    with pytest.raises(ConfigError, match="fast_inference"):
        load_base_model("some/model", backend="unsloth", allow_cpu=True, fast_inference=True)


def test_attach_zero_stack_is_identity_and_random_stack_changes_logits(unsloth_model):
    model, tok = unsloth_model.model, unsloth_model.tok
    batch = _prompt(model, tok)
    with torch.no_grad():
        base = model(**batch).logits
    with attached(model) as stacks:
        assert len(stacks.targets) == N_LAYERS * N_PROJ
        assert len(stacks._handles) == N_LAYERS * N_PROJ + 2  # one per projection + the guard's pre/post hooks
        stacks.new_stack("chat")  # zero-init B
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, base)
        stacks.discard_active()
        add_random_stack(stacks, "chat", seed=3, a_scale=0.5, b_scale=0.5, freeze=False)
        with torch.no_grad():
            hooked = model(**batch).logits
        assert not torch.allclose(hooked.float(), base.float(), atol=1e-2)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base)  # detached: exactly the base again


def test_optimizer_step_trains_only_the_active_stack_and_aux_reaches_the_router(unsloth_model, data_dir):
    model, tok = unsloth_model.model, unsloth_model.tok
    batch = CompletionCollator(tok.pad_token_id)(_chat_examples(tok, data_dir))
    batch = {k: v.to(model.device) for k, v in batch.items()}
    with attached(model) as stacks:
        add_random_stack(stacks, "chat", seed=1)  # frozen
        frozen = stacks.frozen_stacks[0]
        active = stacks.new_stack("code")
        frozen_before, active_before = _snapshot(frozen), _snapshot(active)
        q_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
        model.train()
        opt = torch.optim.AdamW(stacks.trainable_parameters(), lr=1e-3)
        with count_calls(stacks) as counts:
            loss = model(**batch).loss
            loss.backward()
        assert counts["__model__"] == 1 and set(counts[k] for k in stacks.keys) == {1}  # every hook, once
        for key, m in active.items():
            assert m.B.grad is not None and m.B.grad.abs().sum() > 0, key
            # With B == 0 the task loss gives the router no gradient at all: this one is the injected aux loss.
            assert m.router.grad is not None and m.router.grad.abs().sum() > 0, key
        assert all(p.grad is None for p in frozen.parameters())
        assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("brainstacks."))
        opt.step()
        opt.zero_grad()
        assert _changed(frozen, frozen_before) == set()
        assert {n.rsplit(".", 1)[-1] for n in _changed(active, active_before)} >= {"B", "router"}
        assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, q_before)


def test_sft_trainer_steps_through_unsloth_train_only_the_active_stack(unsloth_model, data_dir, tmp_path):
    from brainstacks_hooks.training.config import TrainArgs
    from brainstacks_hooks.training.trainer import build_trainer, sft_config

    model, tok = unsloth_model.model, unsloth_model.tok
    examples = _chat_examples(tok, data_dir)
    args = TrainArgs(max_steps=2, batch_size=2, gradient_accumulation_steps=1, warmup_steps=0, learning_rate=1e-3,
                     max_length=48, logging_steps=1)
    with attached(model) as stacks:
        add_random_stack(stacks, "chat", seed=1)
        frozen = stacks.frozen_stacks[0]
        active = stacks.new_stack("code")
        frozen_before, active_before = _snapshot(frozen), _snapshot(active)
        q_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
        trainer = build_trainer(stacks, tok, examples, sft_config(args, str(tmp_path), 0))
        chunked = []  # Unsloth's CPU SFT loss (chunked cross-entropy) is on during each training forward
        flag = model.register_forward_pre_hook(
            lambda m, a: chunked.append(vars(m).get("_unsloth_cpu_chunked_ce_active")))
        try:
            with count_calls(stacks) as counts:
                trainer.train()
        finally:
            flag.remove()
        assert trainer.state.global_step == 2
        assert counts["__model__"] == 2 and set(counts[k] for k in stacks.keys) == {2}
        if ON_CPU:
            assert chunked == [True, True]
        assert _changed(frozen, frozen_before) == set()
        assert {n.rsplit(".", 1)[-1] for n in _changed(active, active_before)} >= {"B", "router"}
        assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, q_before)
        logged = [h for h in trainer.state.log_history if "loss" in h]
        assert logged and all("load_balance_loss" in h and h["load_balance_loss"] > 0 for h in logged)


def _bypass_mlp(mlp):
    """What Unsloth's ``fast_swiglu_inference`` does: read the projection weights, never call the modules."""

    def forward(self, x):
        gate = F.linear(x, self.gate_proj.weight)
        return F.linear(self.act_fn(gate) * F.linear(x, self.up_proj.weight), self.down_proj.weight)

    return MethodType(forward, mlp)


def test_hooks_fire_in_generation_and_the_bypass_guard_is_safe(unsloth_model, monkeypatch):
    from brainstacks_hooks.inference.routed_model import RoutedModel
    from brainstacks_hooks.rl.dpo import make_generate_fn

    model, tok = unsloth_model.model, unsloth_model.tok
    with attached(model) as stacks:
        add_random_stack(stacks, "chat", seed=3, a_scale=0.5, b_scale=0.5)
        with stacks.base_only():
            base = _generate(model, tok, use_cache=False)
        # HF path without a cache: every projection hook fires on every step, and the stack changes each step.
        with count_calls(stacks) as counts:
            out = _generate(model, tok, use_cache=False)
        assert counts["__model__"] == 3 and set(counts[k] for k in stacks.keys) == {3}
        assert all(not torch.equal(a, b) for a, b in zip(out.scores, base.scores))

        # Unsloth's default generate (KV cache). On a GPU its fast decode is expected to bypass the hooks
        # (research/unsloth_hooks.md, read from the code), which the guard must turn into StackBypassed. On the
        # CPU backend (stock transformers) the decode steps (1 new token, KV cache) still call every projection.
        bypassed, lengths = None, []
        seen = model.register_forward_pre_hook(
            lambda m, a, kw: lengths.append(kw["input_ids"].shape[1]) if "input_ids" in kw else None, with_kwargs=True)
        try:
            with count_calls(stacks) as counts:
                try:
                    cached = _generate(model, tok, use_cache=True)
                except StackBypassed as e:
                    bypassed = e
        finally:
            seen.remove()
        if bypassed is None:  # then every hook fired on every step and the stack changed every step
            assert counts["__model__"] == len(cached.scores) == 3
            assert set(counts[k] for k in stacks.keys) == {3}
            assert all(not torch.equal(a, b) for a, b in zip(cached.scores, base.scores))
        if ON_CPU:  # recorded behaviour of Unsloth's CPU backend: the cached decode runs and does not bypass
            assert bypassed is None and lengths[1:] == [1, 1] and lengths[0] > 1

        # A fused MLP in the decoder (as Unsloth's fast inference uses) must trip the guard, not pass silently.
        mlp = model.model.layers[4].mlp
        mlp.forward = _bypass_mlp(mlp)
        try:
            with pytest.raises(StackBypassed, match="did not fire"):
                _generate(model, tok, use_cache=True)
        finally:
            del mlp.forward

        # The toolkit's own generation paths turn the KV cache off on this backend.
        assert RoutedModel(model, tok, stacks, store=None).use_cache is False
        calls = []
        real_generate = model.generate

        def spy(*args, **kwargs):
            calls.append(kwargs.get("use_cache"))
            return real_generate(*args, **kwargs)

        monkeypatch.setattr(model, "generate", spy)
        with count_calls(stacks) as counts:
            answers = make_generate_fn(model, tok, max_new_tokens=2, do_sample=False)([("Say hi.", "")])
        assert calls == [False] and len(answers) == 1
        assert counts["__model__"] >= 1 and set(counts[k] for k in stacks.keys) == {counts["__model__"]}
