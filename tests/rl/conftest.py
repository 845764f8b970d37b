"""Fixtures of the RL tests: the full sandbox, which a test that needs it must have (it fails, never skips)."""

from __future__ import annotations

import pytest

from brainstacks_hooks.rl import sandbox


@pytest.fixture(scope="session")
def full_sandbox() -> None:
    """Fail, with the probe's reason, where :func:`run_python_tests` cannot run with full isolation."""
    available, reason = sandbox._namespaces_available()
    if not available:
        pytest.fail(f"sandbox unavailable here: {reason}; run the tests as root on a machine that allows mount, "
                    "PID and network namespaces (not under Docker's default seccomp profile)", pytrace=False)
