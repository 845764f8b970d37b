"""GRPO on the active stack: beta=0 by default, reference mode for beta>0 (never a reload), eval-mode rollouts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from brainstacks_hooks.data.formatting import encode_prompt, format_prompt
from brainstacks_hooks.errors import ConfigError
from brainstacks_hooks.testing import ModelLoad, nan_loss_at_step

ROWS = [{"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(4)]


def length_reward(completions, **kwargs):
    """Trivial reward with a spread (so advantages are non-zero)."""
    return [float(len(c)) for c in completions]


def _config(tmp_path, **kw):
    from brainstacks_hooks.rl.grpo import grpo_config

    base = dict(max_steps=2, per_device_train_batch_size=2, num_generations=2, max_completion_length=4,
                learning_rate=5e-3, use_cpu=True, bf16=False)
    base.update(kw)
    return grpo_config(str(tmp_path / "out"), **base)


def _frozen_state(stacks):
    return {f"{i}.{k}": v.clone() for i, s in enumerate(stacks.frozen_stacks) for k, v in s.tensors().items()}


def _logps(trainer, model, ids, mask, keep):
    was = trainer.model.training
    trainer.model.eval()
    try:
        with torch.no_grad():
            return trainer._get_per_token_logps_and_entropies(model, ids, mask, keep)[0]
    finally:
        trainer.model.train(was)


def test_beta_reference_is_reference_mode_not_a_reload(setup, tmp_path):
    from brainstacks_hooks.rl.dpo import ReferencePolicy
    from brainstacks_hooks.rl.grpo import build_grpo_trainer

    stacks, tok = setup
    cfg = _config(tmp_path, beta=0.1, max_steps=1, learning_rate=5e-2)
    trainer = build_grpo_trainer(stacks, tok, ROWS, length_reward, cfg)
    assert isinstance(trainer.ref_model, ReferencePolicy) and trainer.beta == 0.1 and cfg.beta == 0.1
    prompt = encode_prompt(tok, ROWS[0]["question"])["input_ids"]
    ids = torch.tensor([[*prompt, tok.eos_token_id, 42, 43, 44]])
    mask, keep = torch.ones_like(ids), 4

    # step 0: zero-init active stack, so the reference is the policy
    torch.testing.assert_close(_logps(trainer, trainer.ref_model, ids, mask, keep),
                               _logps(trainer, trainer.model, ids, mask, keep), rtol=0, atol=1e-5)
    trainer.train()
    assert trainer.state.global_step == 1
    ref = _logps(trainer, trainer.ref_model, ids, mask, keep)
    with stacks.reference():
        expected = _logps(trainer, trainer.model, ids, mask, keep)
    torch.testing.assert_close(ref, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(_logps(trainer, trainer.model, ids, mask, keep), expected, atol=1e-4)
    assert "kl" in trainer.state.log_history[0]


def test_plain_trl_with_beta_would_reload_and_the_patch_catches_it(setup, tmp_path):
    import trl

    from brainstacks_hooks.rl.grpo import prompt_dataset

    stacks, tok = setup
    with pytest.raises(ModelLoad):
        trl.GRPOTrainer(model=stacks.model, reward_funcs=[length_reward], args=_config(tmp_path, beta=0.1),
                        train_dataset=prompt_dataset(tok, ROWS), processing_class=tok)


def test_two_step_run_beta0_frozen_stacks_bit_identical(setup, tmp_path, data_dir):
    from brainstacks_hooks.rl.grpo import build_grpo_trainer
    from brainstacks_hooks.rl.rewards import format_reward, gsm8k_reward

    stacks, tok = setup
    with (data_dir / "eval" / "gsm8k.jsonl").open() as f:
        rows = [json.loads(next(f)) for _ in range(2)]
    rows = [{"question": r["question"], "answer": r["answer"]} for r in rows]
    before = _frozen_state(stacks)
    active_before = {k: v.clone() for k, v in stacks.active.state_dict().items()}
    trainer = build_grpo_trainer(stacks, tok, rows, [gsm8k_reward, format_reward, length_reward], _config(tmp_path))
    assert trainer.ref_model is None and trainer.beta == 0.0
    trainer.train()
    assert trainer.state.global_step == 2
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert "rewards/gsm8k_reward/mean" in logs[0] and "rewards/length_reward/mean" in logs[0]
    after = _frozen_state(stacks)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(active_before[k], v) for k, v in stacks.active.state_dict().items())
    assert all(p.dtype == torch.float32 for p in stacks.active.parameters())


def test_rollouts_in_eval_mode_with_bypass_guard_on(setup, tmp_path):
    from brainstacks_hooks.rl.grpo import build_grpo_trainer

    stacks, tok = setup
    module = next(m for _, m in stacks.active.items())
    seen = []
    handle = module.register_forward_pre_hook(
        lambda m, args: seen.append((m.training, torch.is_grad_enabled(), stacks.check_bypass)))
    stacks.check_bypass = False  # forced on while sampling, restored afterwards
    trainer = build_grpo_trainer(stacks, tok, ROWS, length_reward, _config(tmp_path, max_steps=1))
    prompt = format_prompt(tok, ROWS[1]["question"])
    assert trainer._tokenize_prompts([prompt])[0] == [encode_prompt(tok, ROWS[1]["question"])["input_ids"]]
    try:
        trainer.train()
    finally:
        handle.remove()
    sampling = [s for s in seen if not s[1]]
    training = [s for s in seen if s[1]]
    assert sampling and training
    assert all(not t and bypass for t, _, bypass in sampling)  # no router noise, guard on, while sampling
    assert all(t for t, _, _ in training)  # the loss forward is in train mode as usual
    assert stacks.check_bypass is False and stacks.model.training


def test_rejects_vllm_and_missing_clipping(setup, tmp_path):
    from brainstacks_hooks.rl.grpo import build_grpo_trainer

    stacks, tok = setup
    with pytest.raises(ConfigError):
        build_grpo_trainer(stacks, tok, ROWS, length_reward, _config(tmp_path, max_grad_norm=0.0))
    cfg = _config(tmp_path)
    cfg.use_vllm = True
    with pytest.raises(ConfigError):
        build_grpo_trainer(stacks, tok, ROWS, length_reward, cfg)


def test_guard_restores_on_injected_nan(setup, tmp_path):
    from brainstacks_hooks.rl.dpo import RLGuardCallback
    from brainstacks_hooks.rl.grpo import build_grpo_trainer

    stacks, tok = setup
    guard = RLGuardCallback(stacks)
    trainer = build_grpo_trainer(stacks, tok, ROWS, length_reward, _config(tmp_path, max_steps=4), guard=guard)
    with nan_loss_at_step(trainer, 1):
        trainer.train()
    assert guard.stop_reason == "nonfinite_loss" and trainer.state.global_step == 2
    assert all(torch.isfinite(v).all() for v in stacks.active.state_dict().values())


def test_trainer_class_is_created_lazily_from_the_current_trl_binding(monkeypatch):
    """Unsloth rebinds ``trl.GRPOTrainer`` at import: the subclass must inherit whatever is bound when asked."""
    import trl

    from brainstacks_hooks.rl.grpo import stack_grpo_trainer_class

    class Patched(trl.GRPOTrainer):
        pass

    monkeypatch.setattr(trl, "GRPOTrainer", Patched)
    assert Patched in stack_grpo_trainer_class().__mro__
