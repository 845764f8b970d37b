"""Typed config of an RL refinement round (``brainstacks rl dpo|grpo CONFIG``, ``recipes/{dpo,grpo}_domain.py``).

YAML maps onto :class:`RLConfig` with :func:`brainstacks_hooks.config.load_config` (strict keys, dotted
overrides such as ``trainer.max_steps=4``). Shipped configs: ``rl_grpo_math_cpu``, ``rl_dpo_chat_cpu`` (2 CPU
cores, the quickstart run) and ``rl_grpo_math_gpu``, ``rl_dpo_chat_gpu`` (one GPU, a bigger run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

#: Row sources that name a row set the run recorded (``rows/<name>.jsonl``), see :mod:`brainstacks_hooks.run_dir`.
RUN_ROW_SETS = ("sft_train", "sft_val", "router_train", "router_test")
ALGORITHMS = ("dpo", "grpo")


@dataclass
class RLDataConfig:
    """Where the RL round's training and held-out rows come from.

    Args:
        train_source: ``sft_train`` (the run's recorded rows of the domain, the default), another recorded row
            set (``sft_val``, ``router_train``, ``router_test``), a JSONL file (absolute, or relative to
            ``data_dir``, e.g. ``math/train.jsonl``) or ``hf:<dataset id>[:<config>][:<split>]`` (a Hub dataset,
            e.g. ``hf:HuggingFaceH4/ultrafeedback_binarized:train_prefs``, ``hf:openai/gsm8k:main:test``; needs
            network access).
        train_rows: Rows sampled (seeded) from ``train_source``; ``None``: all.
        eval_source: The held-out rows the acceptance metric is measured on, same forms as ``train_source``
            (``sft_val`` by default; GRPO on math uses ``eval/gsm8k.jsonl``). They must share no id with the
            training rows (checked).
        eval_rows: Rows sampled (seeded) from ``eval_source``; ``None``: all.
        data_dir: Directory relative file sources are read from (default ``$BRAINSTACKS_DATA_DIR``).
        seed: Seed of both samples.
    """

    train_source: str = "sft_train"
    train_rows: int | None = 32
    eval_source: str = "sft_val"
    eval_rows: int | None = 24
    data_dir: str | None = None
    seed: int = 0


@dataclass
class PairsConfig:
    """DPO pairs built from instruction rows when they have no ``chosen``/``rejected`` (see
    :func:`~brainstacks_hooks.rl.dpo.build_preference_pairs`): chosen = the reference answer, rejected = the
    current (SFT) policy's own sample.

    Args:
        max_new_tokens: Length of the sampled (rejected) answer.
        temperature: Sampling temperature.
        top_p: Nucleus sampling.
        max_prompt_length: Prompts are cut (from the left) to this many tokens; ``None``: not cut.
        batch_size: Prompts sampled together.
    """

    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_length: int | None = 256
    batch_size: int = 8


@dataclass
class RLEvalConfig:
    """The held-out metric measured before and after RL.

    Args:
        max_new_tokens: Greedy tokens per held-out prompt (GRPO: the completion the rewards score).
        batch_size: Prompts generated or scored together.
        max_prompt_length: Held-out prompts are cut (from the left) to this many tokens.
        sft_val_rows: Rows of the domain's ``rows/sft_val`` whose completion loss is recorded before and after
            (how far RL moved the SFT policy); 0 skips it.
    """

    max_new_tokens: int = 192
    batch_size: int = 8
    max_prompt_length: int | None = 256
    sft_val_rows: int = 24


@dataclass
class RLConfig:
    """One per-domain RL refinement of a finished SFT run (paper 6.2, 8.5).

    The round trains a new zero-init stack of ``domain`` on top of the run's stacks of the domains up to and
    including ``domain`` (so ``reference`` mode is exactly the SFT policy), measures ``eval`` before and after,
    accepts it (frozen, saved, recorded in the manifest like an SFT round) when the held-out metric improved by
    more than ``min_improvement``, and discards it otherwise. Rerunning the same command resumes: rounds already
    recorded are skipped, an interrupted round restarts.

    Args:
        run_dir: Finished SFT run directory.
        domain: The domain whose stacks are refined (one of the run's domains).
        algorithm: ``dpo`` or ``grpo`` (``brainstacks rl ALGO`` checks that the config agrees).
        rounds: RL rounds of this algorithm the domain should have (done ones count; a rejected round ends them).
        seed: Seed of the round (trainer, sampling of the pairs).
        rewards: GRPO reward functions: ``gsm8k``, ``format``, ``code`` or ``module:function`` (a plain TRL
            reward function); their sum is the reward, each is reported.
        reward_weights: Weights of ``rewards`` (``None``: 1 each).
        trainer: Fields of ``trl.DPOConfig`` / ``trl.GRPOConfig`` over the toolkit's defaults
            (:func:`~brainstacks_hooks.rl.dpo.dpo_config`, :func:`~brainstacks_hooks.rl.grpo.grpo_config`).
        data: Training and held-out rows.
        pairs: How DPO pairs are built from instruction rows.
        eval: The held-out metric.
        min_improvement: Acceptance threshold of the held-out metric's gain (GRPO: mean reward; DPO: held-out
            DPO loss decrease).
        max_sft_val_loss_increase: A round is also rejected when the domain's SFT validation loss rose by more
            than this (RL must not undo SFT; DPO's held-out loss starts at ln 2 and falls under almost any
            update, so the held-out metric alone is a weak test); ``None`` disables the check.
        guard_eval_steps: Every this many steps the best-weights guard scores the held-out metric on
            ``guard_eval_rows`` rows and keeps the best weights (0: the loss-only guard).
        guard_eval_rows: Held-out rows the guard scores.
        backend: Load the base with this backend instead of the run's (``unsloth``: Unsloth's patched trainers).
    """

    run_dir: str = "runs/quickstart"
    domain: str = "math"
    algorithm: str = "grpo"
    rounds: int = 1
    seed: int = 0
    rewards: list[str] = field(default_factory=lambda: ["gsm8k", "format"])
    reward_weights: list[float] | None = None
    trainer: dict[str, Any] = field(default_factory=dict)
    data: RLDataConfig = field(default_factory=RLDataConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    eval: RLEvalConfig = field(default_factory=RLEvalConfig)
    min_improvement: float = 0.0
    max_sft_val_loss_increase: float | None = 0.05
    guard_eval_steps: int = 0
    guard_eval_rows: int = 8
    backend: str | None = None

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm: {self.algorithm!r} is not one of {', '.join(ALGORITHMS)}")
        if self.rounds < 1:
            raise ConfigError(f"rounds: must be >= 1, got {self.rounds}")
        if self.algorithm == "grpo" and not self.rewards:
            raise ConfigError("rewards: GRPO needs at least one reward function (e.g. [gsm8k, format])")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ConfigError(f"reward_weights: {len(self.reward_weights)} weights for {len(self.rewards)} rewards")
        for key in ("output_dir", "use_vllm", "sync_ref_model"):
            if key in self.trainer:
                raise ConfigError(f"trainer.{key}: set by the toolkit (the round's scratch dir; no vLLM; the "
                                  "reference is the frozen stacks), not a config field")
