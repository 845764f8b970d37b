"""Inner loop (paper 3.3): residual boosting within one domain, accepting a stack before freezing it.

Each round adds a zero-initialised stack, trains it with TRL under :class:`BestStackCallback`, and
freezes it only if it lowered the validation loss by at least ``min_loss_delta`` against the previous
round (the first round against the loss before the domain). A round that does not is discarded and
ends the domain. Under several processes the validation losses are sharded and gathered
(``evaluate_loss(..., shard=True)``), so every process takes the same decisions.

The first round of a domain is the exception, so that a domain never silently ends with zero stacks: if it
lowered the loss at all (but by less than ``min_loss_delta``) it is accepted with a warning and a ``note``
in its record; if it did not lower the loss, it is discarded and the outer loop stops with a clear
:class:`~brainstacks_hooks.errors.TrainingError` (the domain is marked ``failed`` and retried on rerun).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..loss import evaluate_loss
from ..run_config import InnerLoopConfig, TrainArgs
from ..run_dir import RoundRecord
from ..stacks.brainstacks import BrainStacks
from ..stacks.stack import Stack
from ..utils.logging import get_logger
from .callbacks import BestStackCallback
from .trainer import build_trainer, sft_config

logger = get_logger(__name__)


def round_seed(base_seed: int, domain_index: int, round_index: int) -> int:
    """Seed of one round: distinct per domain and round, reproducible across resumes."""
    return base_seed + 1000 * domain_index + round_index


def run_inner_loop(
    stacks: BrainStacks,
    tokenizer: Any,
    domain: str,
    train_examples: Sequence[dict[str, Any]],
    val_examples: Sequence[dict[str, Any]],
    train: TrainArgs,
    inner: InnerLoopConfig,
    work_dir: str | Path,
    *,
    seed: int = 42,
    domain_index: int = 0,
    start_round: int = 0,
    loss_before: float | None = None,
    max_rounds: int | None = None,
    max_steps: int | None = None,
    learning_rate: float | None = None,
    on_round_end: Callable[[RoundRecord, Stack | None], None] | None = None,
) -> list[RoundRecord]:
    """Run rounds ``start_round .. max_rounds-1`` for ``domain``; returns the rounds run here.

    ``loss_before`` is the validation loss the first round must beat (computed in train mode, i.e. with
    all frozen stacks, when not given). Accepted stacks are frozen; ``on_round_end(record, frozen_stack)``
    (``None`` for a rejected round) is called after each round, before the next one starts: the outer loop
    saves the stack and the record there.
    """
    pad = tokenizer.pad_token_id

    def evaluate() -> float:
        with stacks.train_mode():
            return evaluate_loss(stacks.model, val_examples, pad, train.eval_batch_size, train.bf16, shard=True)

    if loss_before is None:
        loss_before = evaluate()
    max_rounds = max_rounds or inner.max_inner_rounds
    results = []
    for r in range(start_round, max_rounds):
        t0 = time.time()
        seed_r = round_seed(seed, domain_index, r)
        stacks.new_stack(domain, r)
        callback = BestStackCallback(stacks, evaluate, initial_loss=loss_before, eval_steps=train.eval_steps,
                                     spike_threshold=inner.spike_threshold, patience=inner.patience)
        cfg = sft_config(train, str(Path(work_dir) / f"{domain}-r{r}"), seed_r, learning_rate, max_steps)
        trainer = build_trainer(stacks, tokenizer, train_examples, cfg, callbacks=[callback])
        trainer.train()
        steps = trainer.state.global_step
        log = [dict(h) for h in trainer.state.log_history]
        del trainer
        improvement = loss_before - callback.best_loss
        result = RoundRecord(round=r, status="rejected", loss_before=loss_before, best_val_loss=callback.best_loss,
                             frozen_val_loss=None, improvement=improvement, steps=steps, wall_time_s=0.0, seed=seed_r,
                             stop_reason=callback.stop_reason, eval_history=[asdict(h) for h in callback.history],
                             train_log=log)
        frozen = None
        first = not stacks.stacks_for(domain)  # the domain has no stack yet
        accept = improvement >= inner.min_loss_delta or (first and improvement > 0)
        if accept and improvement < inner.min_loss_delta:
            result.note = (f"first round of the domain accepted below min_loss_delta ({improvement:.4f} < "
                           f"{inner.min_loss_delta}) so that the domain has a stack")
            logger.warning("%s round %d: %s", domain, r, result.note)
        if accept:
            frozen = stacks.freeze_active()
            with stacks.prefix(domain):
                result.frozen_val_loss = evaluate_loss(stacks.model, val_examples, pad, train.eval_batch_size,
                                                       train.bf16, shard=True)
            result.status = "accepted"
            loss_before = result.frozen_val_loss
        else:
            stacks.discard_active()
        result.wall_time_s = round(time.time() - t0, 2)
        logger.info("%s round %d: %s (val %.4f -> %.4f, %d steps, %s, %.0fs)", domain, r, result.status,
                    result.loss_before, result.best_val_loss, steps, result.stop_reason, result.wall_time_s)
        results.append(result)
        if on_round_end is not None:
            on_round_end(result, frozen)
        if result.status == "rejected":
            break
    return results
