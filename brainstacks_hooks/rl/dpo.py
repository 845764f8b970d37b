"""DPO on the active stack, with the reference policy = the same model in ``reference`` mode.

The trainable parameters are the active stack's only; the reference policy is base + frozen stacks with the
active stack off (:meth:`~brainstacks_hooks.stacks.brainstacks.BrainStacks.reference`), computed by the *same*
model object, never a reloaded copy and never a deep copy.

Why a stand-in (trl==1.16.0, ``trl/trainer/dpo_trainer.py``):

* With ``ref_model=None``, no PEFT and no precompute, ``DPOTrainer.__init__`` **reloads the checkpoint** with
  ``create_model_from_path(get_config_model_id(model.config))`` (lines 916-927), a hook-free copy without any
  stack. Any other ``ref_model`` is used unchecked (929), so :class:`ReferencePolicy`, a parameter-less module
  whose forward runs the policy model under ``stacks.reference()`` and ``no_grad``, is passed instead. It serves
  the online reference forward (``self.ref_model(..., fused_lm_head=True)``, 1338) and the optional precompute
  (``_precompute_ref_logps`` -> ``compute_ref_log_probs`` on ``self.ref_model``, 1203/1243).
* ``add_fused_lm_head(self.ref_model)`` (962) and accelerate's ``prepare_model`` rebind ``ref_model.forward``;
  the stand-in's ``forward`` is a property whose setter ignores that, so the reference always goes through the
  policy's own (fused, hooked, bypass-guarded) forward.
* On 4/8-bit bases TRL casts every ``requires_grad`` parameter to bf16 (``param.data = param.data.to(bf16)``,
  lines 726-729; GRPO 537-541): :func:`keep_active_stack_dtype` keeps references to the active stack's fp32
  tensors and rebinds them after construction (exact, no re-cast), before the optimizer exists.

Data: ``instruction``/``input`` (or a raw ``prompt``) with ``chosen``/``rejected`` answers. Prompts are the
toolkit's one prompt format (:func:`~brainstacks_hooks.data.formatting.format_prompt`), and the token ids are
exactly those of SFT (:func:`~brainstacks_hooks.data.formatting.encode_example`: prompt tokens, then the answer
with its end-of-turn marker or EOS); TRL's own tokenization (which would add special tokens again) is skipped.
:func:`build_preference_pairs` makes pairs from SFT rows: chosen = the reference answer, rejected = the model's own
sampled answer, labelled as such in every row.

The best-weights guard :class:`RLGuardCallback` watches every optimizer step (training loss, finiteness of the
active stack, optionally a held-out score) and, on NaN/inf or a spike, restores the best snapshot and stops.

The trainer class is created lazily (:func:`stack_dpo_trainer_class`), because Unsloth rebinds ``trl.DPOTrainer``
at import: the subclass inherits whatever ``trl.DPOTrainer`` is bound when it is first asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..data.formatting import IGNORE_INDEX, encode_example, format_prompt
from ..errors import ConfigError, StackStateError
from ..models.hardware import native_bf16
from ..training.trainer import aux_gradient_scale, keep_active_stack_dtype
from ..utils import distributed
from ..utils.logging import get_logger

logger = get_logger(__name__)

__all__ = [
    "PAIR_SOURCE",
    "RLGuardCallback",
    "ReferencePolicy",
    "build_dpo_trainer",
    "build_preference_pairs",
    "dpo_config",
    "make_generate_fn",
    "preference_dataset",
    "reference_key",
    "stack_dpo_trainer_class",
]

#: Label of the pairs made by :func:`build_preference_pairs` (recorded in every row and in data reports).
PAIR_SOURCE = "chosen=reference_answer;rejected=model_sample"


# ---------------------------------------------------------------------------------------------- reference policy
def reference_key(stacks: Any) -> str:
    """sha256 identifying the reference policy: base fingerprint + the frozen stacks reference mode computes."""
    h = hashlib.sha256(json.dumps(stacks.fingerprint_dict(), sort_keys=True, default=str).encode())
    with stacks.reference():
        plan = stacks.plan
        for stack, weight in zip(plan.frozen, plan.weights):
            h.update(f"{stack.domain}/r{stack.round_index}@{weight}".encode())
            for name, t in sorted(stack.tensors().items()):
                h.update(name.encode())
                h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class ReferencePolicy(nn.Module):
    """TRL ``ref_model`` stand-in: the *same* model, run in ``stacks.reference()`` (eval mode, no grad).

    It has no parameters (the base is not registered as a submodule), so TRL's dropout removal, device
    placement and ``hash_module`` touch nothing of the policy; its one buffer ``ref_key`` (:func:`reference_key`)
    makes ``hash_module`` (the precompute cache key) differ between reference policies. The model runs in eval
    mode for the reference forward (deterministic: no dropout, no router noise) and its training flag is
    restored afterwards.
    """

    def __init__(self, stacks: Any) -> None:
        super().__init__()
        self._stacks = stacks  # BrainStacks is not an nn.Module: not registered, not moved, not hashed
        key = bytes.fromhex(reference_key(stacks))
        self.register_buffer("ref_key", torch.tensor(list(key), dtype=torch.uint8))

    @property
    def config(self):  # read by add_fused_lm_head and by TRL's model-id helpers
        return self._stacks.model.config

    @property
    def generation_config(self):
        return getattr(self._stacks.model, "generation_config", None)

    def get_output_embeddings(self):
        return self._stacks.model.get_output_embeddings()

    def _ref_forward(self, *args: Any, **kwargs: Any) -> Any:
        model = self._stacks.model
        was_training = model.training
        with torch.no_grad(), self._stacks.reference():
            if was_training:
                model.eval()
            try:
                return model(*args, **kwargs)
            finally:
                if was_training:
                    model.train()

    # add_fused_lm_head (trl/trainer/utils.py, ``model.forward = MethodType(...)``) and accelerate's
    # prepare_model rebind ``forward``: the setter ignores them, the policy's own forward is already fused.
    forward = property(lambda self: self._ref_forward, lambda self, value: None)  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------- dtype guard
def _construction_guard(model: Any):
    if getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_4bit", False) or getattr(
            model, "is_loaded_in_8bit", False):
        from ..models.backend_bnb import allow_hook_adapter_training

        return allow_hook_adapter_training(model)
    return contextlib.nullcontext()


def _check_rl_args(args: Any, stacks: Any) -> None:
    if stacks.active is None:
        raise StackStateError("RL trains the active stack: call stacks.new_stack(domain) first")
    if not (args.max_grad_norm and args.max_grad_norm > 0):
        raise ConfigError("RL on a stack needs gradient clipping: set max_grad_norm > 0 (e.g. 1.0)")
    if getattr(args, "sync_ref_model", False):
        raise ConfigError("sync_ref_model is not supported: the reference is the frozen stacks (reference mode)")
    if getattr(args, "use_vllm", False):
        raise ConfigError("use_vllm=True bypasses the stack hooks; RL rollouts must run through the hooked model")


# ---------------------------------------------------------------------------------------------- guard
class RLGuardCallback(TrainerCallback):
    """Best-weights guard of an RL round: NaN/inf or a spike restores the best snapshot and stops.

    Checked at every optimizer step: the step's training loss (mean of its micro-batch losses, pushed by the
    trainer), the finiteness of the active stack after the update, and, every ``eval_steps`` steps when
    ``evaluate`` is given, a held-out score (lower is better, e.g. held-out DPO loss or ``-mean reward``).

    * Trouble: a non-finite loss or weight, a loss with ``|loss| > max_abs_loss``, or (after ``window`` healthy
      steps) ``|loss| > spike_factor * max(median |loss| of the last window, spike_floor)``; a non-finite score
      or ``score > best_score + eval_spike_threshold``. Training stops and the best snapshot is loaded.
    * Best snapshot: with ``evaluate``, the weights with the lowest score (seeded with the untrained stack and
      ``initial_score``), also loaded at the end of training. Without it, the latest weights whose loss was
      checked healthy: a step's loss is computed on the weights *before* its update, so the weights after step
      ``t`` become the snapshot once step ``t + 1``'s loss passes (the untrained stack to begin with); the
      final weights are kept when nothing went wrong.

    Snapshots are CPU copies of the active stack (one per step without ``evaluate``).
    """

    def __init__(self, stacks: Any, *, evaluate: Callable[[], float] | None = None,
                 initial_score: float | None = None, eval_steps: int = 50,
                 eval_spike_threshold: float | None = None, max_abs_loss: float = 1e4, spike_factor: float = 50.0,
                 spike_floor: float = 1.0, window: int = 8) -> None:
        self.stacks = stacks
        self.evaluate = evaluate
        self.eval_steps = max(1, int(eval_steps))
        self.eval_spike_threshold = eval_spike_threshold
        self.max_abs_loss, self.spike_factor, self.spike_floor = max_abs_loss, spike_factor, spike_floor
        self.window = max(1, int(window))
        self.best_score = math.inf if initial_score is None else float(initial_score)
        self.best_step = 0
        self.stop_reason = "max_steps"
        self.history: list[dict[str, Any]] = []
        self._best = self._take()
        self._candidate = self._best
        self._losses: list[float] = []
        self._recent: deque[float] = deque(maxlen=self.window)
        self._stopped = False

    # -- fed by the trainer
    def observe_loss(self, value: float) -> None:
        """Record one micro-batch's training loss (the trainers call it from ``compute_loss``)."""
        self._losses.append(float(value))

    @property
    def stopped(self) -> bool:
        return self._stopped

    def _take(self) -> dict[str, torch.Tensor]:
        if self.stacks.active is None:
            raise StackStateError("RLGuardCallback needs an active stack")
        return {k: v.detach().to("cpu", copy=True) for k, v in self.stacks.active.state_dict().items()}

    def restore(self) -> None:
        """Load the best snapshot into the active stack."""
        self.stacks.active.load_state_dict(self._best)

    def _weights_finite(self) -> bool:
        params = [p.detach() for p in self.stacks.active.parameters()]
        return bool(torch.stack([torch.isfinite(p).all().cpu() for p in params]).all()) if params else True

    def _is_spike(self, loss: float) -> bool:
        if abs(loss) > self.max_abs_loss:
            return True
        if len(self._recent) >= self.window:
            return abs(loss) > self.spike_factor * max(statistics.median(self._recent), self.spike_floor)
        return False

    def _stop(self, control, step: int, reason: str, value: float | None) -> None:
        self.history.append({"step": step, "value": value, "decision": reason})
        self.stop_reason = reason
        self._stopped = True
        self.restore()
        control.should_training_stop = True
        logger.warning("RL round stopped at step %d (%s, value %s); restored the weights of step %d",
                       step, reason, value, self.best_step)

    def on_train_begin(self, args, state, control, **kwargs):
        # several processes: DDP has just made every replica the main process's (the untrained stack's random A
        # and router may differ before, e.g. after sampling on the main process alone); snapshot those weights
        if distributed.is_initialized() and not self.history:
            self._best = self._candidate = self._take()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        losses, self._losses = self._losses, []
        if self._stopped:
            return control
        if distributed.is_initialized():  # several processes: decide on every process's micro-batches alike
            losses = [x for theirs in distributed.all_gather_object(losses) for x in theirs]
        step = state.global_step
        loss = sum(losses) / len(losses) if losses else None
        if loss is not None and not math.isfinite(loss):
            self._stop(control, step, "nonfinite_loss", loss)
            return control
        if loss is not None and self._is_spike(loss):
            self._stop(control, step, "spike", loss)
            return control
        if not self._weights_finite():
            self._stop(control, step, "nonfinite_weights", loss)
            return control
        if loss is not None:
            self._recent.append(abs(loss))
        if self.evaluate is None:
            # this step's loss was computed on the weights after the previous step: they are verified
            self._best, self.best_step = self._candidate, step - 1
            self._candidate = self._take()
            self.history.append({"step": step, "value": loss, "decision": "ok"})
        elif step % self.eval_steps == 0 or step >= state.max_steps:
            score = float(self.evaluate())
            if not math.isfinite(score):
                self._stop(control, step, "nonfinite_score", score)
            elif self.eval_spike_threshold is not None and score > self.best_score + self.eval_spike_threshold:
                self._stop(control, step, "score_spike", score)
            elif score < self.best_score:
                self.best_score, self.best_step, self._best = score, step, self._take()
                self.history.append({"step": step, "value": score, "decision": "improved"})
            else:
                self.history.append({"step": step, "value": score, "decision": "worse"})
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.evaluate is not None and not self._stopped:
            self.restore()
        return control


# ---------------------------------------------------------------------------------------------- shared mixin
class _StackRLMixin:
    """``compute_loss`` of the stack RL trainers: aux-loss gradient scale, aux-loss metric, guard feed."""

    stacks: Any

    def _stack_guards(self) -> list[RLGuardCallback]:
        return [cb for cb in self.callback_handler.callbacks if isinstance(cb, RLGuardCallback)]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # the aux (load-balance) gradient enters inside the hooks; scale it like the task loss of a step
        self.stacks.aux_grad_scale = aux_gradient_scale(self)
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                   num_items_in_batch=num_items_in_batch)
        if model.training:
            loss = out[0] if isinstance(out, tuple) else out
            guards = self._stack_guards()
            if guards:
                value = float(loss.detach().float())
                for g in guards:
                    g.observe_loss(value)
            if self.stacks.config.aux_loss_coef > 0:
                self._metrics["train"]["stack_aux_loss"].append(float(self.stacks.aux_loss()))
        return out


# ---------------------------------------------------------------------------------------------- data
def _answer_text(value: Any) -> str:
    from .rewards import completion_text

    return completion_text(value)


def _prompt_parts(row: dict[str, Any]) -> tuple[str, str, str | None]:
    if "instruction" in row:
        return row["instruction"], row.get("input", "") or "", row.get("system")
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return prompt, "", row.get("system")
    if isinstance(prompt, list):  # messages: the last user turn (and a system turn, if any)
        users = [m for m in prompt if m.get("role") == "user"]
        systems = [m for m in prompt if m.get("role") == "system"]
        if users:
            return _answer_text([users[-1]]), "", (_answer_text([systems[0]]) if systems else None)
    raise ConfigError("a preference row needs 'instruction' (and optionally 'input') or a 'prompt'")


def preference_dataset(tokenizer: Any, rows: Sequence[dict[str, Any]]):
    """A TRL-ready preference :class:`datasets.Dataset` in the toolkit's one prompt format.

    Rows: ``instruction`` (+ ``input``, ``system``) or ``prompt`` (raw user text, or chat messages as in
    ``HuggingFaceH4/ultrafeedback_binarized``), with ``chosen`` and ``rejected`` answers (text or message
    lists: the last assistant turn is used). Output columns: ``prompt`` (the formatted prompt text),
    ``chosen``/``rejected`` (answer text), and ``prompt_ids``/``chosen_ids``/``rejected_ids`` tokenized exactly
    like SFT (:func:`encode_example`), plus ``pair_source`` when the row has one. Rows whose answer has no token
    are dropped.
    """
    from datasets import Dataset

    out = []
    for row in rows:
        instruction, inp, system = _prompt_parts(row)
        chosen, rejected = _answer_text(row["chosen"]), _answer_text(row["rejected"])
        enc = [encode_example(tokenizer, instruction, inp, a, max_length=10**9, system=system)
               for a in (chosen, rejected)]
        if enc[0] is None or enc[1] is None:
            continue
        n_prompt = sum(1 for y in enc[0]["labels"] if y == IGNORE_INDEX)
        prompt_ids = enc[0]["input_ids"][:n_prompt]
        if enc[1]["input_ids"][:n_prompt] != prompt_ids:  # cannot happen: both start with the prompt's own ids
            raise RuntimeError("chosen and rejected encodings disagree on the prompt tokens")
        item = {
            "prompt": format_prompt(tokenizer, instruction, inp, system),
            "chosen": chosen,
            "rejected": rejected,
            "prompt_ids": prompt_ids,
            "chosen_ids": enc[0]["input_ids"][n_prompt:],
            "rejected_ids": enc[1]["input_ids"][n_prompt:],
        }
        if "pair_source" in row:
            item["pair_source"] = row["pair_source"]
        out.append(item)
    if not out:
        raise ConfigError("no usable preference pairs")
    return Dataset.from_list(out)


def build_preference_pairs(rows: Sequence[dict[str, Any]],
                           generate_fn: Callable[[list[tuple[str, str]]], list[str]],
                           batch_size: int = 8) -> list[dict[str, Any]]:
    """Preference pairs from instruction/output rows: chosen = the reference answer, rejected = a model sample.

    ``generate_fn`` takes ``[(instruction, input), ...]`` and returns the current model's sampled answers
    (e.g. :func:`make_generate_fn`). Each pair is labelled: ``pair_source`` = :data:`PAIR_SOURCE`,
    ``chosen_source = "reference_answer"``, ``rejected_source = "model_sample"``. Pairs where the sample equals
    the reference answer (after stripping whitespace) or is empty are dropped (logged with their count).
    """
    pairs, dropped = [], 0
    rows = list(rows)
    for start in range(0, len(rows), max(1, batch_size)):
        chunk = rows[start:start + batch_size]
        samples = generate_fn([(r["instruction"], r.get("input", "") or "") for r in chunk])
        if len(samples) != len(chunk):
            raise ValueError(f"generate_fn returned {len(samples)} answers for {len(chunk)} prompts")
        for r, sample in zip(chunk, samples):
            if not sample.strip() or sample.strip() == r["output"].strip():
                dropped += 1
                continue
            pairs.append({
                "id": r.get("id"),
                "instruction": r["instruction"],
                "input": r.get("input", "") or "",
                "chosen": r["output"],
                "rejected": sample,
                "pair_source": PAIR_SOURCE,
                "chosen_source": "reference_answer",
                "rejected_source": "model_sample",
            })
    logger.info("built %d preference pairs (%s); dropped %d (sample empty or equal to the reference)",
                len(pairs), PAIR_SOURCE, dropped)
    return pairs


def make_generate_fn(model: Any, tokenizer: Any, max_new_tokens: int = 128, *, do_sample: bool = True,
                     temperature: float = 1.0, top_p: float = 1.0, max_prompt_length: int | None = None,
                     seed: int | None = 0) -> Callable[[list[tuple[str, str]]], list[str]]:
    """``generate_fn(prompts) -> answers`` through the hooked model in its current stacks mode (eval mode).

    Sampled (``do_sample=True``, e.g. the rejected answers of :func:`build_preference_pairs`) or greedy (the
    held-out completions RL rounds score). Prompts are ``(instruction, input)`` pairs in the one prompt format
    (:func:`~brainstacks_hooks.data.formatting.encode_prompt_batch`). On the Unsloth backend the KV cache is
    off (its fast decode path skips the hooks).
    """
    from ..data.formatting import encode_prompt_batch

    use_cache = getattr(model, "_brainstacks_backend", None) != "unsloth"
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)

    def generate(prompts: list[tuple[str, str]]) -> list[str]:
        batch = encode_prompt_batch(tokenizer, prompts, max_length=max_prompt_length)
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        was_training = model.training
        model.eval()
        try:
            if seed is not None and do_sample:
                torch.manual_seed(seed)
            with torch.no_grad():
                out = model.generate(**batch, **sampling, max_new_tokens=max_new_tokens, use_cache=use_cache,
                                     pad_token_id=tokenizer.pad_token_id)
        finally:
            model.train(was_training)
        new = out[:, batch["input_ids"].shape[1]:]
        return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]

    return generate


# ---------------------------------------------------------------------------------------------- trainer
_DPO_CLASSES: dict[type, type] = {}


def stack_dpo_trainer_class() -> type:
    """``StackDPOTrainer``, subclassing the ``trl.DPOTrainer`` bound *now* (Unsloth rebinds it at import)."""
    import trl

    base = trl.DPOTrainer
    cls = _DPO_CLASSES.get(base)
    if cls is not None:
        return cls

    class StackDPOTrainer(_StackRLMixin, base):
        """``DPOTrainer`` training the active stack; the reference is reference mode (:class:`ReferencePolicy`)."""

        def __init__(self, *args: Any, stacks: Any, **kwargs: Any) -> None:
            if kwargs.get("ref_model") is not None:
                raise ConfigError("StackDPOTrainer builds its own reference (reference mode); do not pass ref_model")
            if kwargs.get("peft_config") is not None:
                raise ConfigError("StackDPOTrainer trains the active stack; peft_config is not supported")
            cfg = kwargs.get("args") if kwargs.get("args") is not None else (args[1] if len(args) > 1 else None)
            if cfg is None:
                raise ConfigError("pass args=DPOConfig(...) (see dpo_config)")
            _check_rl_args(cfg, stacks)
            self.stacks = stacks
            kwargs["ref_model"] = ReferencePolicy(stacks)  # never None: None reloads the checkpoint (916-927)
            model = kwargs.get("model", args[0] if args else None)
            with _construction_guard(model), keep_active_stack_dtype(stacks):
                super().__init__(*args, **kwargs)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # rows from preference_dataset are already tokenized in the one prompt format: keep their ids
            # (TRL's own tokenization would re-add special tokens); apply only TRL's over-long filter
            first = next(iter(dataset))
            if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(first):
                if args.max_length is not None and args.truncation_mode == "keep_start":
                    n = len(dataset)
                    dataset = dataset.filter(lambda ex: len(ex["prompt_ids"]) < args.max_length)
                    if n and not len(dataset):
                        raise ConfigError(f"{dataset_name} preference pairs: every prompt has max_length="
                                          f"{args.max_length} tokens or more, so none is left; raise max_length")
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    StackDPOTrainer.__qualname__ = "StackDPOTrainer"
    _DPO_CLASSES[base] = StackDPOTrainer
    return StackDPOTrainer


def dpo_config(output_dir: str, **overrides: Any):
    """A ``trl.DPOConfig`` for a stack round: clipping on, no checkpoints (stacks are saved by the toolkit).

    CPU-safe defaults where no GPU is present (``use_cpu``, no bf16, no gradient checkpointing). ``overrides``
    are any ``DPOConfig`` fields.
    """
    from trl import DPOConfig

    cuda = torch.cuda.is_available()
    kw: dict[str, Any] = dict(
        output_dir=output_dir, max_steps=100, per_device_train_batch_size=4, gradient_accumulation_steps=1,
        learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, beta=0.1, max_length=512,
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        use_cpu=not cuda, bf16=native_bf16(), fp16=cuda and not native_bf16(), gradient_checkpointing=False,
        dataloader_num_workers=0, disable_dropout=True, seed=0,
    )
    kw.update(overrides)
    return DPOConfig(**kw)


def build_dpo_trainer(stacks: Any, tokenizer: Any, train_rows: Sequence[dict[str, Any]] | Any, config: Any,
                      eval_rows: Sequence[dict[str, Any]] | Any | None = None, callbacks: list | None = None,
                      guard: RLGuardCallback | bool = True):
    """``StackDPOTrainer`` on ``stacks.model`` over preference rows (see :func:`preference_dataset`).

    ``guard=True`` adds a default :class:`RLGuardCallback`; pass one to configure it, ``False`` for none.
    """
    def as_dataset(rows):
        if rows is None or hasattr(rows, "column_names"):
            return rows
        return preference_dataset(tokenizer, rows)

    callbacks = list(callbacks or [])
    if guard is True:
        guard = RLGuardCallback(stacks)
    if guard:
        callbacks.append(guard)
    cls = stack_dpo_trainer_class()
    return cls(model=stacks.model, args=config, train_dataset=as_dataset(train_rows),
               eval_dataset=as_dataset(eval_rows), processing_class=tokenizer, callbacks=callbacks, stacks=stacks)
