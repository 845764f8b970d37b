"""DPO on the active stack: reference = reference mode (never a reload), frozen stacks untouched, guard."""

from __future__ import annotations

import math

import pytest
import torch

from brainstacks_hooks.data.formatting import encode_example, encode_prompt
from brainstacks_hooks.errors import ConfigError
from brainstacks_hooks.testing import ModelLoad, nan_loss_at_step

ROWS = [{"instruction": f"What is {i} plus {i}?", "chosen": f"The answer is {2 * i}.",
         "rejected": f"Maybe {i + 3}, I am not sure."} for i in range(8)]


def _config(tmp_path, **kw):
    from brainstacks_hooks.rl.dpo import dpo_config

    base = dict(max_steps=2, per_device_train_batch_size=2, max_length=128, learning_rate=5e-3, use_cpu=True,
                bf16=False)
    base.update(kw)
    return dpo_config(str(tmp_path / "out"), **base)


def _frozen_state(stacks):
    return {f"{i}.{k}": v.clone() for i, s in enumerate(stacks.frozen_stacks) for k, v in s.tensors().items()}


def _policy_logps(model, batch):
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                        use_cache=False, fused_lm_head=True)
    finally:
        model.train(was)
    return out.log_probs.sum(1)


def test_reference_is_reference_mode_not_a_reload(setup, tmp_path):
    from brainstacks_hooks.rl.dpo import ReferencePolicy, build_dpo_trainer

    stacks, tok = setup
    model = stacks.model
    trainer = build_dpo_trainer(stacks, tok, ROWS, _config(tmp_path, max_steps=1))
    assert isinstance(trainer.ref_model, ReferencePolicy)
    assert not list(trainer.ref_model.parameters())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])

    # step 0: zero-init active stack, so reference log-probs are the policy's (and not the base's)
    ref_c, ref_r = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    torch.testing.assert_close(torch.cat([ref_c, ref_r]), _policy_logps(model, batch), rtol=0, atol=1e-5)
    with stacks.base_only():
        assert not torch.allclose(_policy_logps(model, batch), torch.cat([ref_c, ref_r]))

    trainer.train()
    assert trainer.state.global_step == 1
    assert any(m.B.abs().sum() > 0 for _, m in stacks.active.items())
    # after a step: still exactly a reference-mode forward of the same model, and no longer the policy
    ref_c, ref_r = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    with stacks.reference():
        expected = _policy_logps(model, batch)
    torch.testing.assert_close(torch.cat([ref_c, ref_r]), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(_policy_logps(model, batch), expected, atol=1e-4)


def test_two_step_run_frozen_stacks_bit_identical(setup, tmp_path):
    from brainstacks_hooks.rl.dpo import build_dpo_trainer

    stacks, tok = setup
    before = _frozen_state(stacks)
    active_before = {k: v.clone() for k, v in stacks.active.state_dict().items()}
    trainer = build_dpo_trainer(stacks, tok, ROWS, _config(tmp_path))
    trainer.train()
    assert trainer.state.global_step == 2
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert "rewards/margins" in trainer.state.log_history[0]
    after = _frozen_state(stacks)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(not p.requires_grad for s in stacks.frozen_stacks for p in s.parameters())
    assert any(not torch.equal(active_before[k], v) for k, v in stacks.active.state_dict().items())
    assert all(p.dtype == torch.float32 for p in stacks.active.parameters())


def test_plain_trl_would_reload_and_the_patch_catches_it(setup, tmp_path):
    """Negative control: TRL's own DPOTrainer with ref_model=None tries to load a model, which the fixture stops."""
    import trl

    stacks, tok = setup
    from brainstacks_hooks.rl.dpo import preference_dataset

    with pytest.raises(ModelLoad):
        trl.DPOTrainer(model=stacks.model, args=_config(tmp_path), train_dataset=preference_dataset(tok, ROWS),
                       processing_class=tok)


def test_active_stack_stays_fp32_on_a_quantized_base(setup, tmp_path):
    from brainstacks_hooks.rl.dpo import build_dpo_trainer

    stacks, tok = setup
    with torch.no_grad():
        for _, m in stacks.active.items():
            m.B.normal_(0, 1e-3)  # values a bf16 cast would change
    before = {k: v.clone() for k, v in stacks.active.state_dict().items()}
    stacks.model.is_loaded_in_4bit = True  # what TRL reads (dpo_trainer.py:589) before the bf16 cast (726-729)
    try:
        build_dpo_trainer(stacks, tok, ROWS, _config(tmp_path))
    finally:
        del stacks.model.is_loaded_in_4bit
    for k, v in stacks.active.state_dict().items():
        assert v.dtype == torch.float32, k
        assert torch.equal(v, before[k]), k


def test_guard_restores_best_snapshot_on_injected_nan(setup, tmp_path):
    from transformers import TrainerCallback

    from brainstacks_hooks.rl.dpo import RLGuardCallback, build_dpo_trainer

    stacks, tok = setup
    states = {}

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            states[state.global_step] = {k: v.clone() for k, v in stacks.active.state_dict().items()}

    guard = RLGuardCallback(stacks)
    trainer = build_dpo_trainer(stacks, tok, ROWS, _config(tmp_path, max_steps=5), callbacks=[Record()],
                                guard=guard)
    # the mixin feeds the guard inside compute_loss, so inject through the parent's loss
    with nan_loss_at_step(trainer, 2):
        trainer.train()
    assert guard.stop_reason == "nonfinite_loss"
    assert trainer.state.global_step == 3  # stopped at the poisoned step, not max_steps
    assert guard.best_step == 1  # step 2's healthy loss verified the weights after step 1
    for k, v in stacks.active.state_dict().items():
        assert torch.isfinite(v).all(), k
        assert torch.equal(v, states[1][k]), k


def test_guard_spike_and_clipping_required(setup, tmp_path):
    from brainstacks_hooks.rl.dpo import RLGuardCallback, build_dpo_trainer

    stacks, tok = setup
    with pytest.raises(ConfigError):
        build_dpo_trainer(stacks, tok, ROWS, _config(tmp_path, max_grad_norm=0.0))
    guard = RLGuardCallback(stacks, window=2)

    class Control:
        should_training_stop = False

    class State:
        max_steps = 10

    state, control = State(), Control()
    for step, loss in enumerate([0.7, 0.69, 0.68, 1e3], start=1):
        state.global_step = step
        guard.observe_loss(loss)
        guard.on_step_end(None, state, control)
    assert guard.stop_reason == "spike" and control.should_training_stop


def test_preference_dataset_uses_the_one_prompt_format(setup):
    from brainstacks_hooks.rl.dpo import PAIR_SOURCE, build_preference_pairs, preference_dataset

    _, tok = setup
    chat_row = {"prompt": "Hi there", "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": "Go away"}
    ds = preference_dataset(tok, [*ROWS[:2], chat_row])
    row = ds[0]
    assert row["prompt_ids"] == encode_prompt(tok, ROWS[0]["instruction"])["input_ids"]
    sft = encode_example(tok, ROWS[0]["instruction"], "", ROWS[0]["chosen"], max_length=10**6)
    assert row["prompt_ids"] + row["chosen_ids"] == sft["input_ids"]
    assert ds[2]["chosen"] == "Hello!"
    assert ds[2]["prompt_ids"] == encode_prompt(tok, "Hi there")["input_ids"]

    sft_rows = [{"id": i, "instruction": f"Q{i}", "input": "", "output": f"A{i}"} for i in range(3)]
    pairs = build_preference_pairs(sft_rows, lambda prompts: ["A0", "wrong", ""][: len(prompts)])
    assert [p["id"] for p in pairs] == [1]  # equal to the reference and empty samples are dropped
    assert pairs[0]["chosen"] == "A1" and pairs[0]["rejected"] == "wrong"
    assert pairs[0]["pair_source"] == PAIR_SOURCE
    assert (pairs[0]["chosen_source"], pairs[0]["rejected_source"]) == ("reference_answer", "model_sample")
    assert preference_dataset(tok, pairs)[0]["pair_source"] == PAIR_SOURCE


def test_sampling_generate_fn_runs_through_the_stacks(setup):
    from brainstacks_hooks.rl.dpo import build_preference_pairs, make_generate_fn

    stacks, tok = setup
    was = stacks.model.training
    gen = make_generate_fn(stacks.model, tok, max_new_tokens=4)
    rows = [{"id": 0, "instruction": "Name a colour.", "output": "Blue."}]
    pairs = build_preference_pairs(rows, gen)
    assert len(pairs) <= 1
    assert stacks.model.training is was


def test_precomputed_reference_logps_are_reference_mode(setup, tmp_path):
    """precompute_ref_log_probs runs in __init__ through the stand-in, so it scores reference mode, not the policy."""
    from brainstacks_hooks.rl.dpo import build_dpo_trainer

    stacks, tok = setup
    with torch.no_grad():
        for _, m in stacks.active.items():
            m.B.normal_(0, 0.05)  # an active stack that already changes the output
    trainer = build_dpo_trainer(stacks, tok, ROWS, _config(tmp_path, precompute_ref_log_probs=True))
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(rows)
    stored = torch.cat([torch.tensor([r["ref_chosen_logps"] for r in rows]),
                        torch.tensor([r["ref_rejected_logps"] for r in rows])])
    with stacks.reference():
        expected = _policy_logps(stacks.model, batch)
    torch.testing.assert_close(stored, expected, rtol=0, atol=1e-4)
    assert not torch.allclose(stored, _policy_logps(stacks.model, batch), atol=1e-3)
    trainer.train()
    assert trainer.state.global_step == 2


def test_trainer_class_is_created_lazily_from_the_current_trl_binding(monkeypatch):
    """Unsloth rebinds ``trl.DPOTrainer`` at import: the subclass must inherit whatever is bound when asked."""
    import trl

    from brainstacks_hooks.rl.dpo import stack_dpo_trainer_class

    class Patched(trl.DPOTrainer):
        pass

    monkeypatch.setattr(trl, "DPOTrainer", Patched)
    assert Patched in stack_dpo_trainer_class().__mro__


def test_pairs_all_longer_than_max_length_are_a_clear_error(setup, tmp_path):
    from brainstacks_hooks.rl.dpo import build_dpo_trainer

    stacks, tok = setup
    with pytest.raises(ConfigError, match="raise max_length"):
        build_dpo_trainer(stacks, tok, ROWS, _config(tmp_path, max_length=4))
