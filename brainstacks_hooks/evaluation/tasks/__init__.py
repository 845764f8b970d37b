"""Offline lm-evaluation-harness tasks for the local benchmark files (``<data_dir>/eval/*.jsonl``).

One YAML per benchmark sits in this folder (``bs_<benchmark>.yaml``); each reproduces the prompt,
choices, metrics and filters of an lm-eval 0.4.13 built-in task (named in its header comment and its
``metadata.lm_eval_task``) over the fields of our files. The ``bs_`` prefix keeps them apart from the
built-ins, whose full sets differ from our 70% subsets.

    from brainstacks_hooks.evaluation.tasks import TASK_NAMES, task_manager
    tm = task_manager("/path/to/data")          # or $BRAINSTACKS_DATA_DIR
    lm_eval.simple_evaluate(model=lm, tasks=list(TASK_NAMES), task_manager=tm)

The data directory reaches the tasks as lm-eval task metadata (``TaskManager(metadata={"data_dir": ...})``),
which lm-eval hands to each YAML's ``custom_dataset`` loader. The same folder also works with the
``lm_eval`` command: ``--include_path <this folder> --metadata '{"data_dir": "..."}'``.

lm-eval is an optional dependency (``pip install 'brainstacks-hooks[eval]'``), imported only when a task
manager is built.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import BackendUnavailable
from .utils import TASK_FILES, TaskFile, read_task_file, require_data_dir, task_file_path

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

__all__ = [
    "LM_EVAL_INSTALL_HINT",
    "TASKS_DIR",
    "TASK_FILES",
    "TASK_NAMES",
    "TaskFile",
    "force_hf_offline",
    "require_lm_eval",
    "task_manager",
    "validate_task_file",
]

#: Folder holding the task YAMLs (the ``include_path`` of :func:`task_manager`).
TASKS_DIR = Path(__file__).resolve().parent
#: The shipped task names, in report order.
TASK_NAMES: tuple[str, ...] = tuple(TASK_FILES)
LM_EVAL_INSTALL_HINT = "pip install 'brainstacks-hooks[eval]'"


def require_lm_eval() -> None:
    """Import ``lm_eval.tasks``, or raise :class:`BackendUnavailable` with the pip extra to install."""
    try:
        import lm_eval.tasks  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailable(
            f"lm-eval is not installed or failed to import ({exc}): {LM_EVAL_INSTALL_HINT}"
        ) from exc


def force_hf_offline() -> None:
    """Switch ``huggingface_hub`` and ``datasets`` to offline mode, also when they are already imported.

    Both read ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` once, at import
    (``huggingface_hub/constants.py:194``, ``datasets/config.py:216-218``) and consult the module constant
    on every request, so the environment is set for later imports and the constants for earlier ones.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
        datasets_config.HF_DATASETS_OFFLINE = True


class _DropCustomDatasetHint(logging.Filter):
    """Drop the hint lm-eval logs for every task with a ``custom_dataset`` (``api/task.py:859-862``), for ours.

    It tells the user to pass custom kwargs with ``--metadata`` and to read the task's README, which does
    not apply to these tasks (the data directory is set by :func:`task_manager`).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("bs_") and "Custom kwargs can be passed" in msg)


def _quiet_custom_dataset_hint() -> None:
    lm_eval_task_logger = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _DropCustomDatasetHint) for f in lm_eval_task_logger.filters):
        lm_eval_task_logger.addFilter(_DropCustomDatasetHint())


def task_manager(data_dir: str | os.PathLike | None = None) -> TaskManager:
    """An lm-eval ``TaskManager`` that knows only the shipped ``bs_*`` tasks, reading ``data_dir``.

    ``data_dir`` (else ``$BRAINSTACKS_DATA_DIR``) is the directory holding ``eval/<benchmark>.jsonl``.
    The hub is switched off first (:func:`force_hf_offline`). Task files are read and checked when a task
    is loaded (``tm.load([...])`` or ``simple_evaluate(..., task_manager=tm)``), so a missing or bad file
    raises :class:`~brainstacks_hooks.errors.DataError` naming it then.

    Raises:
        DataError: no data directory is given, or it (or its ``eval/`` folder) does not exist.
        BackendUnavailable: lm-eval is not installed.
    """
    root = require_data_dir(data_dir)
    force_hf_offline()
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    _quiet_custom_dataset_hint()
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(root)})


def validate_task_file(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Check every line of task ``name``'s file (fields, types, ``answer_index`` in range); return its path.

    Needs no lm-eval. The same checks run whenever a task loads its documents.

    Raises:
        DataError: ``<file>: ...`` or ``<file>:<line>: ...`` for the first problem found, or an unknown task.
    """
    read_task_file(name, data_dir)
    return task_file_path(name, data_dir)
