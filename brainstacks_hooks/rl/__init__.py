"""Per-domain RL refinement: verifiable rewards and the code sandbox.

Everything is imported lazily, so ``import brainstacks_hooks.rl`` stays cheap (no torch, no TRL)::

    from brainstacks_hooks.rl import code_reward, gsm8k_reward, run_python_tests
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
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
