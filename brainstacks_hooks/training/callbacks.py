"""``BestStackCallback``: keep the best active-stack weights, restore on a spike, NaN or plateau."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback

from ..stacks.brainstacks import BrainStacks
from ..utils.logging import get_logger

logger = get_logger(__name__)


@dataclass
class EvalRecord:
    """One validation of the callback."""

    step: int
    loss: float
    decision: str  # improved | worse | spike | nonfinite | plateau


@dataclass
class BestStackCallback(TrainerCallback):
    """Snapshot the active stack whenever validation loss improves; restore the best on trouble.

    The best loss is seeded with ``initial_loss`` (the loss before the round) and the initial snapshot is
    the untrained stack (an exact identity), so a bad first evaluation is rejected. On a spike
    (loss > best + ``spike_threshold``), a non-finite loss (training or validation) or ``patience``
    evaluations without improvement, training stops and the best snapshot is restored. Training always
    ends with the best weights loaded.
    """

    stacks: BrainStacks
    evaluate: Callable[[], float]
    initial_loss: float
    eval_steps: int = 50
    spike_threshold: float = 0.1
    patience: int = 4
    best_loss: float = field(init=False)
    best_step: int = field(init=False, default=0)
    stop_reason: str = field(init=False, default="max_steps")
    history: list[EvalRecord] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.best_loss = self.initial_loss
        self._bad = 0
        self._stopped = False  # set by _stop; the Trainer's own max_steps stop must not skip the last eval
        self._snapshot = self._take()

    def _take(self) -> dict[str, torch.Tensor]:
        stack = self.stacks.active
        if stack is None:
            raise RuntimeError("BestStackCallback needs an active stack")
        return {k: v.detach().to("cpu", copy=True) for k, v in stack.state_dict().items()}

    def restore(self) -> None:
        """Load the best snapshot into the active stack."""
        self.stacks.active.load_state_dict(self._snapshot)

    def _stop(self, control, reason: str) -> None:
        self.stop_reason = reason
        self._stopped = True
        self.restore()
        control.should_training_stop = True
        logger.info("round stopped (%s); restored weights of step %d (val %.4f)", reason, self.best_step,
                    self.best_loss)

    def check(self, step: int, control) -> None:
        """Evaluate now and decide (public so tests can drive it without a Trainer)."""
        loss = self.evaluate()
        if not math.isfinite(loss):
            self.history.append(EvalRecord(step, loss, "nonfinite"))
            self._stop(control, "nonfinite")
        elif loss > self.best_loss + self.spike_threshold:
            self.history.append(EvalRecord(step, loss, "spike"))
            self._stop(control, "spike")
        elif loss < self.best_loss:
            self.best_loss, self.best_step, self._bad = loss, step, 0
            self._snapshot = self._take()
            self.history.append(EvalRecord(step, loss, "improved"))
        else:
            self._bad += 1
            self.history.append(EvalRecord(step, loss, "worse"))
            if self._bad >= self.patience:
                self._stop(control, "plateau")

    def on_step_end(self, args, state, control, **kwargs):
        # The Trainer's flow callback runs first and already sets should_training_stop at max_steps, so
        # only our own stop (spike, NaN, plateau) skips the evaluation; the last step is always evaluated.
        if self._stopped:
            return control
        if state.global_step % self.eval_steps == 0 or state.global_step >= state.max_steps:
            self.check(state.global_step, control)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)) and not self._stopped:
            self.history.append(EvalRecord(state.global_step, float(loss), "nonfinite"))
            self._stop(control, "nonfinite_train_loss")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()
        return control
