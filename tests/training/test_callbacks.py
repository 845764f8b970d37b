"""BestStackCallback: seeded with the pre-round loss, restores on spike / NaN / plateau; the trainer's aux log."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainerControl

from brainstacks_hooks import BrainStacks, StackConfig
from brainstacks_hooks.training.callbacks import BestStackCallback


def _setup(tiny_llama, losses):
    stacks = BrainStacks.attach(tiny_llama, StackConfig(target_modules=("q_proj",)))
    stacks.new_stack("a")
    seq = iter(losses)
    cb = BestStackCallback(stacks, evaluate=lambda: next(seq), initial_loss=2.0, spike_threshold=0.1, patience=2)
    return stacks, cb


def _set_b(stacks, value):
    with torch.no_grad():
        for _, m in stacks.active.items():
            m.B.fill_(value)


def _b(stacks):
    return stacks.active.module_for("layers.0.q_proj").B.clone()


def test_bad_first_eval_is_rejected_and_identity_restored(tiny_llama):
    stacks, cb = _setup(tiny_llama, [2.5])
    _set_b(stacks, 1.0)
    control = TrainerControl()
    cb.check(1, control)
    assert control.should_training_stop and cb.stop_reason == "spike"
    assert torch.equal(_b(stacks), torch.zeros_like(_b(stacks)))  # back to the untrained (identity) stack
    assert cb.best_loss == 2.0


def test_restores_best_snapshot_on_nan(tiny_llama):
    stacks, cb = _setup(tiny_llama, [1.8, float("nan")])
    _set_b(stacks, 0.5)
    control = TrainerControl()
    cb.check(1, control)
    _set_b(stacks, 9.0)  # training goes on and ruins the weights
    cb.check(2, control)
    assert control.should_training_stop and cb.stop_reason == "nonfinite"
    assert torch.equal(_b(stacks), torch.full_like(_b(stacks), 0.5))
    assert cb.best_loss == 1.8 and [h.decision for h in cb.history] == ["improved", "nonfinite"]


def test_plateau_after_patience_and_small_wobble_is_not_a_spike(tiny_llama):
    stacks, cb = _setup(tiny_llama, [1.5, 1.55, 1.58])
    control = TrainerControl()
    _set_b(stacks, 0.25)
    cb.check(1, control)
    _set_b(stacks, 0.75)
    cb.check(2, control)
    assert not control.should_training_stop
    cb.check(3, control)
    assert control.should_training_stop and cb.stop_reason == "plateau"
    assert torch.equal(_b(stacks), torch.full_like(_b(stacks), 0.25))


def test_nan_training_loss_stops(tiny_llama):
    _, cb = _setup(tiny_llama, [])
    control = TrainerControl()

    class _State:
        global_step = 3

    cb.on_log(None, _State(), control, logs={"loss": math.inf})
    assert control.should_training_stop and cb.stop_reason == "nonfinite_train_loss"


def test_last_step_is_evaluated_under_a_real_trainer(tiny_llama, tmp_path):
    """The Trainer's flow callback sets should_training_stop at max_steps before ours runs; the last
    evaluation must happen anyway (otherwise every step after the previous evaluation would be thrown away)."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    stacks = BrainStacks.attach(tiny_llama, StackConfig(target_modules=("q_proj",)))
    stacks.new_stack("a")
    losses = iter([1.9, 1.8, 1.7])
    cb = BestStackCallback(stacks, evaluate=lambda: next(losses), initial_loss=2.0, eval_steps=2)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (ids := torch.randint(3, 96, (8,), generator=g).tolist()), "labels": ids}
            for _ in range(6)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=2,
                             learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True)
    Trainer(model=tiny_llama, args=args, train_dataset=Dataset.from_list(rows), callbacks=[cb]).train()
    assert [h.step for h in cb.history] == [2, 4, 5]
    assert cb.best_step == 5 and cb.best_loss == 1.7 and cb.stop_reason == "max_steps"


def test_stack_trainer_logs_the_load_balance_loss_it_adds(tiny_model_dir, tmp_path):
    """``load_balance_loss`` is what the hooks add to the objective (alpha * sum over the projections of eq. 7)
    per optimizer step, i.e. the mean over its micro-batches, which the 1/GA gradient scale optimises."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from brainstacks_hooks.run_config import TrainArgs
    from brainstacks_hooks.training.trainer import build_trainer, sft_config

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    stacks = BrainStacks.attach(model, StackConfig(rank=4))
    stacks.new_stack("a")
    seen = []  # (value added by the hooks, its gradient scale) per micro-batch
    total = stacks.aux_loss

    def spy():
        value = total()
        seen.append((float(value), stacks.aux_grad_scale))
        return value

    stacks.aux_loss = spy
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(8):
        ids = torch.randint(3, len(tok), (10,), generator=g).tolist()
        examples.append({"input_ids": ids, "attention_mask": [1] * 10, "labels": [-100] * 4 + ids[4:]})
    args = TrainArgs(max_steps=2, batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-3, warmup_steps=0,
                     logging_steps=1, max_length=32, bf16=False, use_cpu=True)
    trainer = build_trainer(stacks, tok, examples, sft_config(args, str(tmp_path), 0))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and len(seen) == 4
    assert all(scale == 0.5 for _, scale in seen)  # 1 / gradient-accumulation steps
    n_projections = 2 * 7
    for step, h in enumerate(logs):
        added = (seen[2 * step][0] + seen[2 * step + 1][0]) / 2
        assert h["load_balance_loss"] == pytest.approx(added, rel=1e-6)
        assert h["load_balance_per_projection"] == pytest.approx(added / (0.01 * n_projections), rel=1e-6)
        assert 1.5 < h["load_balance_per_projection"] <= 4.0  # near K = 2 for a fresh stack, at most E = 4
        assert "aux_loss" not in h
