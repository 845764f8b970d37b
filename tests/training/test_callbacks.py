"""BestStackCallback: seeded with the pre-round loss, restores on spike / NaN / plateau."""

from __future__ import annotations

import math

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
