"""The one place that configures logging for the package."""

from __future__ import annotations

import logging

_LIBRARY_LOGGER = "brainstacks_hooks"


def get_logger(name: str) -> logging.Logger:
    """Return a logger under the ``brainstacks_hooks`` namespace."""
    if not name.startswith(_LIBRARY_LOGGER):
        name = f"{_LIBRARY_LOGGER}.{name}"
    return logging.getLogger(name)


def log_on_main_process_only(level: int = logging.WARNING) -> None:
    """Several processes: raise the library logger's level to ``level`` on every process but the main one
    (as the HF Trainer does for its replicas), so progress is logged once. A no-op in a single process."""
    from .distributed import is_main_process

    if not is_main_process():
        logger = logging.getLogger(_LIBRARY_LOGGER)
        logger.setLevel(max(level, logger.getEffectiveLevel()))


def enable_console_logging(level: int = logging.INFO) -> None:
    """Attach a simple console handler to the library logger (used by the CLI and recipes)."""
    logger = logging.getLogger(_LIBRARY_LOGGER)
    if not any(getattr(h, "_brainstacks", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._brainstacks = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level)
