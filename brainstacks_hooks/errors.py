"""Exception hierarchy of brainstacks_hooks.

Every error the library raises on purpose derives from :class:`BrainstacksError`, so callers can
catch the whole family with one ``except`` clause.
"""

from __future__ import annotations


class BrainstacksError(Exception):
    """Base class of every error raised on purpose by brainstacks_hooks."""


class ConfigError(BrainstacksError, ValueError):
    """A configuration value or YAML key is invalid."""


class StackLoadError(BrainstacksError):
    """A stack (or router) file could not be loaded: wrong fingerprint, keys, shapes, dtype or checksum.

    A failed load leaves the model exactly as it was before the call.
    """


class FingerprintMismatch(StackLoadError):
    """The saved stacks were trained on a different base model (config or projection shapes differ)."""


class RunDirError(StackLoadError):
    """A run directory is missing, of an old layout, unfinished for the asked phase, or inconsistent."""


class TrainingError(BrainstacksError, RuntimeError):
    """Training cannot produce a usable result with the current settings (e.g. a domain learned nothing)."""


class StackBypassed(BrainstacksError, RuntimeError):
    """A forward pass ran while the hook of an attached projection did not fire.

    This happens when a fused kernel reads projection weights directly (Unsloth's fast decode, vLLM,
    fused LoRA kernels). Stacks would silently have no effect, so the toolkit raises instead.
    """


class StackStateError(BrainstacksError, RuntimeError):
    """An operation is not valid in the current stack state (e.g. a second active stack)."""


class DataError(BrainstacksError, ValueError):
    """A data source is missing or malformed."""


class BackendUnavailable(BrainstacksError, ImportError):
    """An optional backend (bitsandbytes, Unsloth) is not installed or cannot run here."""
