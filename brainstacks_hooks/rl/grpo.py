"""GRPO on the active stack: rollouts through the hooked model, verifiable rewards, reference = reference mode.

Built on trl==1.16.0 ``trl/trainer/grpo_trainer.py``:

* ``beta=0`` (the default here and in TRL, ``grpo_config.py:681``): no reference model (983-986).
* ``beta>0`` without PEFT would **reload the checkpoint** (``create_model_from_path``, 991-1003). The trainer is
  therefore constructed with ``args.beta = 0`` (restored right after), then ``self.beta`` is set back and
  ``self.ref_model`` is a :class:`~brainstacks_hooks.rl.dpo.ReferencePolicy` (the same model in
  ``stacks.reference()``); TRL reads ``self.beta``/``self.ref_model`` at run time only (2710-2722, 3098, 3149).
* Rollouts: ``use_vllm=False`` (vLLM never runs the hooks); TRL calls ``unwrapped_model.generate`` in *train
  mode* (``_generate_single_turn``, 1862-1875; the unwrap never calls ``eval()``), so the active stack's
  router noise would be on while sampling. ``_generate_single_turn`` is overridden to run in eval mode (router
  noise and aux loss off, dropout off) with the stacks' bypass guard forced on, and restores the training flag.
  It is the narrowest method around the ``generate`` call; ``_generate`` reads ``self.model.training`` for its
  metric keys before it, so metrics stay under ``train``.
* Prompts are strings in the toolkit's one prompt format
  (:func:`~brainstacks_hooks.data.formatting.format_prompt`) and are tokenized exactly like
  :func:`~brainstacks_hooks.data.formatting.encode_prompt` (``_tokenize_prompts`` override; TRL's
  ``processing_class(text=prompts)``, 1758, would add special tokens again).
* On 4/8-bit bases TRL casts trainable parameters to bf16 (537-541): undone exactly by
  :func:`~brainstacks_hooks.training.trainer.keep_active_stack_dtype`.

Rewards are TRL reward functions, e.g. :func:`brainstacks_hooks.rl.rewards.gsm8k_reward` (reads the ``answer``
column), :func:`~brainstacks_hooks.rl.rewards.format_reward` or :func:`~brainstacks_hooks.rl.rewards.code_reward`
(reads ``test_list``). The class is created lazily (Unsloth rebinds ``trl.GRPOTrainer`` at import).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..data.formatting import encode_text, format_prompt
from ..errors import ConfigError
from ..models.hardware import native_bf16
from ..training.trainer import keep_active_stack_dtype
from ..utils.logging import get_logger
from .dpo import (
    ReferencePolicy,
    RLGuardCallback,
    _check_rl_args,
    _construction_guard,
    _StackRLMixin,
)

logger = get_logger(__name__)

__all__ = ["build_grpo_trainer", "grpo_config", "prompt_dataset", "stack_grpo_trainer_class"]

_GRPO_CLASSES: dict[type, type] = {}


def stack_grpo_trainer_class() -> type:
    """``StackGRPOTrainer``, subclassing the ``trl.GRPOTrainer`` bound *now* (Unsloth rebinds it at import)."""
    import trl

    base = trl.GRPOTrainer
    cls = _GRPO_CLASSES.get(base)
    if cls is not None:
        return cls

    class StackGRPOTrainer(_StackRLMixin, base):
        """``GRPOTrainer`` training the active stack; with ``beta > 0`` the reference is reference mode."""

        def __init__(self, *args: Any, stacks: Any, **kwargs: Any) -> None:
            if kwargs.get("peft_config") is not None:
                raise ConfigError("StackGRPOTrainer trains the active stack; peft_config is not supported")
            cfg = kwargs.get("args") if kwargs.get("args") is not None else (args[2] if len(args) > 2 else None)
            if cfg is None:
                raise ConfigError("pass args=GRPOConfig(...) (see grpo_config)")
            _check_rl_args(cfg, stacks)
            self.stacks = stacks
            beta = cfg.beta
            cfg.beta = 0.0  # non-PEFT + beta != 0 reloads the checkpoint (grpo_trainer.py:991-1003)
            model = kwargs.get("model", args[0] if args else None)
            try:
                with _construction_guard(model), keep_active_stack_dtype(stacks):
                    super().__init__(*args, **kwargs)
            finally:
                cfg.beta = beta
            self.beta = beta
            if beta != 0.0:
                self.ref_model = ReferencePolicy(stacks)  # scored at grpo_trainer.py:2712

        def _tokenize_prompts(self, prompts: list):
            if prompts and all(isinstance(p, str) for p in prompts):
                return [encode_text(self.processing_class, p) for p in prompts], None, {}
            return super()._tokenize_prompts(prompts)

        def _generate_single_turn(self, *args: Any, **kwargs: Any):
            model = self.stacks.model
            was_training, bypass = model.training, self.stacks.check_bypass
            self.stacks.check_bypass = True  # a fused decode path that skips the hooks must fail, not sample
            model.eval()  # router noise off while sampling (MoELoRA: noisy = training and router_noise)
            try:
                return super()._generate_single_turn(*args, **kwargs)
            finally:
                model.train(was_training)
                self.stacks.check_bypass = bypass

    StackGRPOTrainer.__qualname__ = "StackGRPOTrainer"
    _GRPO_CLASSES[base] = StackGRPOTrainer
    return StackGRPOTrainer


def grpo_config(output_dir: str, **overrides: Any):
    """A ``trl.GRPOConfig`` for a stack round: ``beta=0``, HF generation (no vLLM), clipping on, no checkpoints.

    CPU-safe defaults where no GPU is present. ``per_device_train_batch_size`` x GA must divide by
    ``num_generations`` (TRL's rule). ``overrides`` are any ``GRPOConfig`` fields.
    """
    from trl import GRPOConfig

    cuda = torch.cuda.is_available()
    kw: dict[str, Any] = dict(
        output_dir=output_dir, max_steps=50, per_device_train_batch_size=4, gradient_accumulation_steps=1,
        num_generations=4, max_completion_length=64, learning_rate=1e-4, lr_scheduler_type="constant",
        warmup_steps=0, beta=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to="none", use_cpu=not cuda, bf16=native_bf16(), fp16=cuda and not native_bf16(),
        gradient_checkpointing=False, dataloader_num_workers=0, disable_dropout=True, use_vllm=False, seed=0,
    )
    kw.update(overrides)
    return GRPOConfig(**kw)


def prompt_dataset(tokenizer: Any, rows: Sequence[dict[str, Any]], system: str | None = None):
    """GRPO rows: ``prompt`` = :func:`format_prompt` of ``instruction`` (+ ``input``) or ``question``.

    Every other column (``answer``, ``final``, ``test_list``, ...) is kept for the reward functions; a row's
    own ``prompt`` string is taken as the raw user text.
    """
    from datasets import Dataset

    out = []
    for row in rows:
        user = row.get("instruction", row.get("question", row.get("prompt")))
        if not isinstance(user, str):
            raise ConfigError("a GRPO row needs an 'instruction', 'question' or 'prompt' string")
        rest = {k: v for k, v in row.items() if k not in ("instruction", "input", "question", "prompt")}
        out.append({**rest, "prompt": format_prompt(tokenizer, user, row.get("input", "") or "", system)})
    if not out:
        raise ConfigError("no GRPO prompts")
    return Dataset.from_list(out)


def build_grpo_trainer(stacks: Any, tokenizer: Any, train_rows: Sequence[dict[str, Any]] | Any,
                       reward_funcs: Callable | Sequence[Callable], config: Any, callbacks: list | None = None,
                       guard: RLGuardCallback | bool = True, **kwargs: Any):
    """``StackGRPOTrainer`` on ``stacks.model`` over prompt rows (see :func:`prompt_dataset`).

    ``guard=True`` adds a default :class:`~brainstacks_hooks.rl.dpo.RLGuardCallback`; pass one to configure it
    (e.g. ``evaluate=lambda: -held_out_mean_reward()``), ``False`` for none. ``kwargs`` go to the trainer.
    """
    dataset = train_rows if hasattr(train_rows, "column_names") else prompt_dataset(tokenizer, train_rows)
    callbacks = list(callbacks or [])
    if guard is True:
        guard = RLGuardCallback(stacks)
    if guard:
        callbacks.append(guard)
    funcs = list(reward_funcs) if isinstance(reward_funcs, Sequence) else [reward_funcs]
    cls = stack_grpo_trainer_class()
    return cls(model=stacks.model, reward_funcs=funcs, args=config, train_dataset=dataset,
               processing_class=tokenizer, callbacks=callbacks, stacks=stacks, **kwargs)
