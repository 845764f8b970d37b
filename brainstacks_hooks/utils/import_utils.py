"""Optional-dependency checks with install hints."""

from __future__ import annotations

import importlib.util

from ..errors import BackendUnavailable


def is_bitsandbytes_available() -> bool:
    """True when ``bitsandbytes`` can be imported."""
    return importlib.util.find_spec("bitsandbytes") is not None


def is_unsloth_available() -> bool:
    """True when ``unsloth`` is installed (a GPU is still needed to use its fast paths)."""
    return importlib.util.find_spec("unsloth") is not None


def is_peft_available() -> bool:
    """True when ``peft`` can be imported."""
    return importlib.util.find_spec("peft") is not None


def require_bitsandbytes() -> None:
    """Raise :class:`BackendUnavailable` with the pip extra when bitsandbytes is missing."""
    if not is_bitsandbytes_available():
        raise BackendUnavailable("bitsandbytes is not installed: pip install 'brainstacks-hooks[bnb]'")


def require_unsloth() -> None:
    """Raise :class:`BackendUnavailable` with the pip extra when Unsloth is missing."""
    if not is_unsloth_available():
        raise BackendUnavailable("unsloth is not installed: pip install 'brainstacks-hooks[unsloth]' (needs a GPU)")
