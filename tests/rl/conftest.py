"""Fixtures of the RL tests: the full sandbox (a test that needs it fails without it, never skips) and the tiny
stacks the DPO and GRPO trainers train, with every model load forbidden."""

from __future__ import annotations

import pytest

from brainstacks_hooks.rl import sandbox
from brainstacks_hooks.testing import forbid_model_loads


@pytest.fixture(scope="session")
def full_sandbox() -> None:
    """Fail, with the probe's reason, where :func:`run_python_tests` cannot run with full isolation."""
    available, reason = sandbox._namespaces_available()
    if not available:
        pytest.fail(f"sandbox unavailable here: {reason}; run the tests as root on a machine that allows mount, "
                    "PID and network namespaces (not under Docker's default seccomp profile)", pytrace=False)


@pytest.fixture
def setup(tiny_model_dir, monkeypatch):
    """Tiny Llama (real tokenizer), a random frozen chat stack, a zero-init active one; then no model may load."""
    from brainstacks_hooks.models.loading import load_base_model
    from brainstacks_hooks.stacks.brainstacks import BrainStacks
    from brainstacks_hooks.stacks.config import StackConfig
    from brainstacks_hooks.testing import add_random_stack

    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    model, tok = load_base_model(str(tiny_model_dir), dtype="float32")
    stacks = BrainStacks.attach(model, StackConfig(rank=4))
    add_random_stack(stacks, "chat", 1)
    stacks.new_stack("chat", 1)
    forbid_model_loads(monkeypatch)
    return stacks, tok
