"""``StackSFTTrainer``: TRL's ``SFTTrainer`` training the active stack, with the load-balance loss logged apart.

The load-balance loss (paper eq. 7, ``alpha * sum over projections of E * sum_i f_i P_i``, see
:mod:`brainstacks_hooks.stacks.moe_lora`) reaches the gradients inside the hooks (see
:class:`~brainstacks_hooks.stacks.moe_lora.AuxLossInjector`), so it also works under reentrant gradient
checkpointing; it is never part of the loss tensor that ``compute_loss`` returns. This trainer sets its
gradient scale to ``1 / gradient-accumulation steps`` (times the fp16 loss scale, :func:`aux_gradient_scale`)
and logs, at each logging step:

* ``loss``: the task loss only (completion cross-entropy), as the Trainer computes it;
* ``load_balance_loss``: the value the hooks add to the objective, coefficient applied and summed over
  the projections, per optimizer step (the mean over its micro-batches, which is what the ``1 / GA``
  gradient scale optimises), averaged over the logging window like ``loss``. The objective is
  ``loss + load_balance_loss`` (the paper's "train loss 7.444" was that sum);
* ``load_balance_per_projection``: the mean over projections of eq. 7 without the coefficient, to read
  the balance: K under uniform routing, up to E when every token goes to the same experts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from ..data.formatting import CompletionCollator
from ..stacks.brainstacks import BrainStacks
from ..utils.logging import get_logger
from .config import TrainArgs

logger = get_logger(__name__)


def aux_gradient_scale(trainer: Any) -> float:
    """The constant the hooks inject as the load-balance loss's gradient for one micro-batch of ``trainer``.

    ``1 / gradient-accumulation steps`` (the task loss of an optimizer step is the mean over its micro-batches),
    times the current loss scale when fp16 training runs under a ``GradScaler`` (accelerate's
    ``trainer.accelerator.scaler``): the scaler multiplies the task loss before ``backward`` and divides every
    gradient after it, so an injected constant that ignored the scale would shrink by the scale factor (65536 at
    the start) and the load balance would stop training. Called in ``compute_loss``, before the forward, so the
    scale is the one the following ``backward`` uses.
    """
    steps = getattr(trainer, "current_gradient_accumulation_steps", None) or trainer.args.gradient_accumulation_steps
    scale = 1.0 / max(1, int(steps))
    scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
    if scaler is not None and scaler.is_enabled():
        scale *= float(scaler.get_scale())
    return scale


class StackSFTTrainer(SFTTrainer):
    """``SFTTrainer`` whose trainable parameters are the active stack of ``stacks``."""

    def __init__(self, *args: Any, stacks: BrainStacks, **kwargs: Any) -> None:
        self.stacks = stacks
        self._lb_added = 0.0  # sum over micro-batches of (added load-balance loss) * (its gradient scale)
        self._lb_steps = 0.0  # sum of the gradient scales: optimizer steps since the last log
        self._lb_per_projection: list[float] = []
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # the injected aux gradient does not follow the task loss's upstream gradient: scale it here, in every case
        self.stacks.aux_grad_scale = aux_gradient_scale(self)
        scale = 1.0 / max(1, int(getattr(self, "current_gradient_accumulation_steps", None)
                                 or self.args.gradient_accumulation_steps))  # the logged value's weight
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if model.training and self.stacks.config.aux_loss_coef > 0:
            added, n = self.stacks.aux_loss(), self._n_aux_projections()
            if n:
                self._lb_added += float(added) * scale
                self._lb_steps += scale
                self._lb_per_projection.append(float(added) / (self.stacks.config.aux_loss_coef * n))
        return out

    def _n_aux_projections(self) -> int:
        active = self.stacks.active
        return sum(m.last_aux is not None for _, m in active.items()) if active is not None else 0

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._lb_steps > 0:  # a training log (eval logs carry eval_loss)
            logs["load_balance_loss"] = self._lb_added / self._lb_steps
            logs["load_balance_per_projection"] = sum(self._lb_per_projection) / len(self._lb_per_projection)
            self._lb_added, self._lb_steps, self._lb_per_projection = 0.0, 0.0, []
        super().log(logs, start_time)


def use_cpu(args: TrainArgs) -> bool:
    """Train on the CPU: ``train.use_cpu`` when set, else when there is no GPU."""
    return args.use_cpu if args.use_cpu is not None else not torch.cuda.is_available()


def sft_config(args: TrainArgs, output_dir: str, seed: int, learning_rate: float | None = None,
               max_steps: int | None = None) -> SFTConfig:
    """The TRL config of one inner-loop round (evaluation is the callback's job, checkpoints are stacks)."""
    return SFTConfig(
        output_dir=output_dir,
        max_steps=max_steps or args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=learning_rate or args.learning_rate,
        warmup_steps=min(args.warmup_steps, max(0, (max_steps or args.max_steps) - 1)),
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        lr_scheduler_type=args.lr_scheduler_type,
        adam_beta2=args.adam_beta2,
        logging_steps=args.logging_steps,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        bf16=args.bf16,
        fp16=args.fp16,  # accelerate's GradScaler; the aux gradient follows its scale (aux_gradient_scale)
        use_cpu=use_cpu(args),
        gradient_checkpointing=args.gradient_checkpointing,
        max_length=args.max_length,
        seed=seed,
        data_seed=seed,
        packing=False,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


@contextlib.contextmanager
def keep_active_stack_dtype(stacks: Any) -> Iterator[None]:
    """Keep the active stack's tensors (fp32) through a TRL trainer's construction.

    TRL 1.16 casts every trainable parameter to bf16 on 4/8-bit bases (``sft_trainer.py:908-911``,
    ``dpo_trainer.py:726-729``, ``grpo_trainer.py:537-541``) by rebinding ``param.data``. The original tensors
    are kept here and rebound on exit, so the values are exactly the ones before construction. Used by the SFT
    trainer and the RL trainers (:mod:`brainstacks_hooks.rl`); remove when TRL stops casting adapters.
    """
    params = list(stacks.active.parameters()) if stacks.active is not None else []
    saved = [p.data for p in params]
    try:
        yield
    finally:
        for p, t in zip(params, saved):
            if p.dtype != t.dtype or p.data_ptr() != t.data_ptr():
                p.data = t


def build_trainer(
    stacks: BrainStacks,
    tokenizer: Any,
    train_examples: Sequence[dict[str, Any]],
    config: SFTConfig,
    callbacks: list | None = None,
) -> StackSFTTrainer:
    """Build the trainer of one round over pre-encoded examples (``input_ids``, ``attention_mask``, ``labels``)."""
    columns = ("input_ids", "attention_mask", "labels")
    dataset = Dataset.from_list([{k: ex[k] for k in columns} for ex in train_examples])
    model = stacks.model
    guard = contextlib.nullcontext()
    if getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False):
        from ..models.backend_bnb import allow_hook_adapter_training

        guard = allow_hook_adapter_training(model)
    with guard, keep_active_stack_dtype(stacks):
        return StackSFTTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            data_collator=CompletionCollator(pad_token_id=tokenizer.pad_token_id),
            callbacks=callbacks or [],
            stacks=stacks,
        )
