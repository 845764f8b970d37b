"""Inner loop (paper 3.3): residual boosting within one domain, accepting a stack before freezing it.

Each round adds a zero-initialised stack, trains it with TRL under :class:`BestStackCallback`, and
freezes it only if it lowered the validation loss by at least ``min_loss_delta`` against the previous
round (the first round against the loss before the domain). A round that does not is discarded and
ends the domain.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..stacks.brainstacks import BrainStacks
from ..utils.logging import get_logger
from .callbacks import BestStackCallback
from .config import InnerLoopConfig, TrainArgs
from .trainer import build_trainer, sft_config
from .validation import evaluate_loss

logger = get_logger(__name__)


@dataclass
class RoundResult:
    """What one inner-loop round did."""

    round: int
    status: str  # accepted | rejected
    loss_before: float
    best_val_loss: float
    frozen_val_loss: float | None
    improvement: float
    steps: int
    wall_time_s: float
    seed: int
    stop_reason: str
    file: str | None = None
    sha256: str | None = None
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    train_log: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    stack_path: Callable[[int], Path],
    *,
    seed: int = 42,
    domain_index: int = 0,
    start_round: int = 0,
    loss_before: float | None = None,
    max_rounds: int | None = None,
    max_steps: int | None = None,
    learning_rate: float | None = None,
    on_round_end: Callable[[RoundResult], None] | None = None,
) -> list[RoundResult]:
    """Run rounds ``start_round .. max_rounds-1`` for ``domain``; returns the rounds run here.

    ``loss_before`` is the validation loss the first round must beat (computed in train mode, i.e. with
    all frozen stacks, when not given). Accepted stacks are frozen and saved to ``stack_path(round)``.
    """
    pad = tokenizer.pad_token_id

    def evaluate() -> float:
        with stacks.train_mode():
            return evaluate_loss(stacks.model, val_examples, pad, train.eval_batch_size, train.bf16)

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
        result = RoundResult(round=r, status="rejected", loss_before=loss_before, best_val_loss=callback.best_loss,
                             frozen_val_loss=None, improvement=improvement, steps=steps, wall_time_s=0.0, seed=seed_r,
                             stop_reason=callback.stop_reason, eval_history=[asdict(h) for h in callback.history],
                             train_log=log)
        if improvement >= inner.min_loss_delta:
            stacks.freeze_active()
            frozen = stacks.frozen_stacks[-1]
            with stacks.prefix(domain):
                result.frozen_val_loss = evaluate_loss(stacks.model, val_examples, pad, train.eval_batch_size,
                                                       train.bf16)
            path = stack_path(r)
            result.sha256 = stacks.save_stack(frozen, path)
            result.file = str(path)
            result.status = "accepted"
            loss_before = result.frozen_val_loss
        else:
            stacks.discard_active()
        result.wall_time_s = round(time.time() - t0, 2)
        logger.info("%s round %d: %s (val %.4f -> %.4f, %d steps, %s, %.0fs)", domain, r, result.status,
                    result.loss_before, result.best_val_loss, steps, result.stop_reason, result.wall_time_s)
        results.append(result)
        if on_round_end is not None:
            on_round_end(result)
        if result.status == "rejected":
            break
    return results
