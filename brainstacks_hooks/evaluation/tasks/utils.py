"""Document loading and processing for the shipped lm-eval tasks (the ``!function`` targets of the YAMLs).

Each task YAML names its local file in ``dataset_kwargs: {data_file: ...}`` and loads it through
``custom_dataset: !function brainstacks_hooks.evaluation.tasks.utils.load_docs``. lm-eval calls
``custom_dataset(**metadata, **dataset_kwargs)`` (``lm_eval==0.4.13/api/task.py:855-869``), so the data
directory arrives as the ``data_dir`` metadata key that :func:`brainstacks_hooks.evaluation.tasks.task_manager`
puts on its ``TaskManager``. Nothing goes through ``datasets.load_dataset``: no hub lookup, no Arrow
cache, and every row is checked first, so a bad file fails with ``<file>:<line>: ...``.

This module imports only the standard library at import time (``datasets`` inside :func:`load_docs`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...constants import ENV_DATA_DIR
from ...errors import DataError

if TYPE_CHECKING:
    import datasets

#: Folder of the benchmark files inside a data directory (``<data_dir>/eval/<file>``).
EVAL_SUBDIR = "eval"

_MC_FIELDS = ("question", "choices", "answer_index")


@dataclass(frozen=True)
class TaskFile:
    """The local file of one task and the fields its prompt reads.

    Attributes:
        file: file name under ``<data_dir>/eval/``.
        fields: fields every row must have (``choices``: list of strings; ``answer_index``: its 0-based gold).
        n_choices: exact number of choices the prompt needs (4 for the A-D letter tasks), else ``None``.
        lm_eval_task: the built-in lm-eval task whose format this task reproduces.
    """

    file: str
    fields: tuple[str, ...]
    n_choices: int | None
    lm_eval_task: str


#: Task name -> its local file, in the order the evaluation reports them.
TASK_FILES: dict[str, TaskFile] = {
    "bs_arc_easy": TaskFile("arc_easy.jsonl", _MC_FIELDS, None, "arc_easy"),
    "bs_arc_challenge": TaskFile("arc_challenge.jsonl", _MC_FIELDS, None, "arc_challenge"),
    "bs_hellaswag": TaskFile(
        "hellaswag.jsonl", ("activity_label", "ctx_a", "ctx_b", "choices", "answer_index"), None, "hellaswag"
    ),
    "bs_truthfulqa_mc1": TaskFile("truthfulqa_mc.jsonl", _MC_FIELDS, None, "truthfulqa_mc1"),
    "bs_mmlu": TaskFile("mmlu.jsonl", (*_MC_FIELDS, "subject"), 4, "mmlu"),
    "bs_medqa": TaskFile("medqa.jsonl", _MC_FIELDS, 4, "medqa_4options"),
    "bs_medmcqa": TaskFile("medmcqa.jsonl", _MC_FIELDS, 4, "medmcqa"),
    "bs_gsm8k": TaskFile("gsm8k.jsonl", ("question", "answer"), None, "gsm8k"),
}
_BY_FILE = {spec.file: name for name, spec in TASK_FILES.items()}
#: Text fields that may be empty (HellaSwag's ``ctx_b`` is "" for 60 WikiHow rows, as upstream).
_MAY_BE_EMPTY = frozenset({"ctx_b"})


def require_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: ``data_dir``, else ``$BRAINSTACKS_DATA_DIR``.

    Raises:
        DataError: neither is set, or the directory (or its ``eval/`` folder) does not exist.
    """
    origin = "data_dir argument" if data_dir is not None else f"${ENV_DATA_DIR}"
    raw = os.fspath(data_dir) if data_dir is not None else os.environ.get(ENV_DATA_DIR) or None
    if raw is None:
        raise DataError(
            f"no data directory for the evaluation tasks: pass --data-dir / data_dir=... or set ${ENV_DATA_DIR}"
        )
    root = Path(raw).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"data directory {root} (from {origin}) does not exist")
    if not (root / EVAL_SUBDIR).is_dir():
        raise DataError(f"{root / EVAL_SUBDIR}: folder not found (benchmark files live in <data_dir>/{EVAL_SUBDIR}/)")
    return root


def task_file_path(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """``<data_dir>/eval/<file>`` of task ``name`` (the file need not exist)."""
    return require_data_dir(data_dir) / EVAL_SUBDIR / _spec(name).file


def read_task_file(name: str, data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Read and check every row of task ``name``'s file; return the rows.

    Raises:
        DataError: ``<file>: ...`` (missing, unreadable, empty) or ``<file>:<line>: ...`` (bad JSON, a
            missing or mistyped field, an ``answer_index`` outside the choices, a wrong choice count).
    """
    spec = _spec(name)
    path = task_file_path(name, data_dir)
    if not path.is_file():
        raise DataError(f"{path}: file not found (needed by task {name})")
    rows: list[dict[str, Any]] = []
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                rows.append(_check_row(line, spec, f"{path}:{lineno}"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def load_docs(data_file: str, data_dir: str | None = None, **_metadata: Any) -> dict[str, datasets.Dataset]:
    """lm-eval ``custom_dataset`` hook: ``{"test": Dataset}`` of the checked rows of ``<data_dir>/eval/<data_file>``.

    ``_metadata`` receives the rest of the task's metadata (``version``, ``config_source``, ...), which
    lm-eval passes to every ``custom_dataset`` call; it is not used.
    """
    import datasets

    name = _BY_FILE.get(data_file)
    if name is None:
        raise DataError(f"data_file {data_file!r} is not a shipped task file (known: {', '.join(sorted(_BY_FILE))})")
    rows = read_task_file(name, data_dir)
    return {"test": datasets.Dataset.from_list(rows)}


# ------------------------------------------------------------------------------------------- HellaSwag
def preprocess(text: str) -> str:
    """lm-eval's HellaSwag text clean-up, copied from ``lm_eval==0.4.13/tasks/hellaswag/utils.py:6-12``."""
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """lm-eval's HellaSwag ``process_docs`` (``tasks/hellaswag/utils.py:15-25``) on the local raw fields.

    ``query`` is rebuilt from ``activity_label``, ``ctx_a`` and ``ctx_b`` exactly as upstream (the local
    ``question`` is the raw ``ctx`` and is not used); ``choices`` become the preprocessed endings and the raw
    ones are kept as ``endings``, the upstream field name. The gold stays in ``answer_index``.
    """

    def _process_doc(doc: dict[str, Any]) -> dict[str, Any]:
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": preprocess(doc["activity_label"] + ": " + ctx),
            "endings": list(doc["choices"]),
            "choices": [preprocess(ending) for ending in doc["choices"]],
        }

    return dataset.map(_process_doc)


# ------------------------------------------------------------------------------------------- checks
def _spec(name: str) -> TaskFile:
    try:
        return TASK_FILES[name]
    except KeyError:
        raise DataError(f"unknown task {name!r} (known: {', '.join(TASK_FILES)})") from None


def _check_row(line: str, spec: TaskFile, where: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(row).__name__}")
    missing = [f for f in spec.fields if f not in row]
    if missing:
        names = ", ".join(map(repr, missing))
        raise DataError(f"{where}: missing field(s) {names} (required: {', '.join(spec.fields)})")
    for field in spec.fields:
        if field in ("choices", "answer_index"):
            continue
        value = row[field]
        if not isinstance(value, str) or (not value.strip() and field not in _MAY_BE_EMPTY):
            raise DataError(f"{where}: field {field!r} must be a non-empty string, found {value!r:.60}")
    if spec.file == "gsm8k.jsonl" and "#### " not in row["answer"]:
        raise DataError(f"{where}: field 'answer' has no '#### <number>' line (the GSM8K reference answer)")
    if "choices" in spec.fields:
        _check_choices(row, spec, where)
    return row


def _check_choices(row: dict[str, Any], spec: TaskFile, where: str) -> None:
    choices = row["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise DataError(f"{where}: field 'choices' must be a list of 2+ non-empty strings, found {choices!r:.80}")
    if spec.n_choices is not None and len(choices) != spec.n_choices:
        raise DataError(
            f"{where}: the A-D prompt of this task needs exactly {spec.n_choices} choices, found {len(choices)}"
        )
    gold = row["answer_index"]
    if not isinstance(gold, int) or isinstance(gold, bool):
        raise DataError(f"{where}: field 'answer_index' must be an integer, found {gold!r:.40}")
    if not 0 <= gold < len(choices):
        raise DataError(f"{where}: answer_index {gold} is outside the {len(choices)} choices (0..{len(choices) - 1})")
