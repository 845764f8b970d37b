"""Per-domain RL refinement: DPO and GRPO on the active stack, verifiable rewards and the code sandbox.

Everything is imported lazily, so ``import brainstacks_hooks.rl`` stays cheap (no torch, no TRL), and the trainer
classes are created on first use from whatever ``trl.DPOTrainer`` / ``trl.GRPOTrainer`` is bound then (Unsloth
rebinds them at import)::

    from brainstacks_hooks.rl import build_dpo_trainer, build_grpo_trainer, code_reward, gsm8k_reward
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "RLGuardCallback": "brainstacks_hooks.rl.dpo",
    "ReferencePolicy": "brainstacks_hooks.rl.dpo",
    "build_dpo_trainer": "brainstacks_hooks.rl.dpo",
    "build_grpo_trainer": "brainstacks_hooks.rl.grpo",
    "build_preference_pairs": "brainstacks_hooks.rl.dpo",
    "dpo_config": "brainstacks_hooks.rl.dpo",
    "grpo_config": "brainstacks_hooks.rl.grpo",
    "preference_dataset": "brainstacks_hooks.rl.dpo",
    "make_generate_fn": "brainstacks_hooks.rl.dpo",
    "RLConfig": "brainstacks_hooks.rl.config",
    "run_rl": "brainstacks_hooks.rl.round",
    "prompt_dataset": "brainstacks_hooks.rl.grpo",
    "SandboxUnavailable": "brainstacks_hooks.rl.sandbox",
    "code_reward": "brainstacks_hooks.rl.rewards",
    "completion_text": "brainstacks_hooks.rl.rewards",
    "extract_code": "brainstacks_hooks.rl.rewards",
    "extract_final_number": "brainstacks_hooks.rl.rewards",
    "format_reward": "brainstacks_hooks.rl.rewards",
    "gsm8k_reward": "brainstacks_hooks.rl.rewards",
    "is_sandbox_available": "brainstacks_hooks.rl.sandbox",
    "run_python_tests": "brainstacks_hooks.rl.sandbox",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'brainstacks_hooks.rl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
