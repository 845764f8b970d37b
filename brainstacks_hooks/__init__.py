"""brainstacks_hooks: continual multi-domain fine-tuning with frozen MoE-LoRA stacks on forward hooks.

Public API (imported lazily so ``import brainstacks_hooks`` stays cheap)::

    from brainstacks_hooks import BrainStacks, StackConfig, load_base_model
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_LAZY = {
    "BrainStacks": "brainstacks_hooks.stacks.brainstacks",
    "StackConfig": "brainstacks_hooks.stacks.config",
    "Mode": "brainstacks_hooks.stacks.modes",
    "MoELoRA": "brainstacks_hooks.stacks.moe_lora",
    "Stack": "brainstacks_hooks.stacks.stack",
    "ModelFingerprint": "brainstacks_hooks.models.fingerprint",
    "load_base_model": "brainstacks_hooks.models.loading",
    "BrainstacksError": "brainstacks_hooks.errors",
    "ConfigError": "brainstacks_hooks.errors",
    "FingerprintMismatch": "brainstacks_hooks.errors",
    "StackBypassed": "brainstacks_hooks.errors",
    "StackLoadError": "brainstacks_hooks.errors",
    "StackStateError": "brainstacks_hooks.errors",
    "RunDirError": "brainstacks_hooks.errors",
    "TrainingError": "brainstacks_hooks.errors",
    "RunDir": "brainstacks_hooks.run_dir",
    "RunConfig": "brainstacks_hooks.run_config",
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'brainstacks_hooks' has no attribute {name!r}")
