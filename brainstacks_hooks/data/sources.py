"""Loading domain and evaluation rows from a local data directory or from the HF hub.

Local layout (``shared/data``): ``<dir>/<domain>/{train,val}.jsonl`` with rows
``{"id", "instruction", "input", "output", "source", ...}`` and ``<dir>/eval/<bench>.jsonl``.
The directory is the ``data_dir`` argument or the ``BRAINSTACKS_DATA_DIR`` environment variable.

Unlike the reference implementation (``reference_impl.md`` sections 4.3 and 11.1 item 11), sampling is
uniform and seeded (never "the first N rows"), hub errors are raised instead of silently retrying
another split, and bad rows are skipped *and counted per reason* in a :class:`DataReport`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..constants import ENV_DATA_DIR
from ..errors import DataError
from ..utils.logging import get_logger
from ..utils.seeding import seeded_sample_indices
from .cleaning import strip_chat_tokens, validate_row

logger = get_logger(__name__)

#: Evaluation benchmarks shipped in ``<data_dir>/eval``.
EVAL_BENCHMARKS: tuple[str, ...] = (
    "arc_easy", "arc_challenge", "hellaswag", "truthfulqa_mc", "mmlu", "medqa", "medmcqa", "gsm8k",
)  # fmt: skip

_USER_ROLES = frozenset({"user", "human"})
_ASSISTANT_ROLES = frozenset({"assistant", "gpt", "model"})


@dataclass
class HFSource:
    """A hub dataset mapped to instruction/input/output.

    ``take`` rows are drawn uniformly with a seeded sample from the whole split (the split is downloaded
    once and cached by ``datasets``). With ``messages_field``, the first user turn becomes the
    instruction and the first assistant turn after it the output. ``data_files`` is passed through to
    ``datasets.load_dataset`` (e.g. ``HFSource("json", data_files="rows.jsonl")`` for local files).
    """

    path: str
    name: str | None = None
    split: str = "train"
    instruction_field: str = "instruction"
    input_field: str | None = "input"
    output_field: str = "output"
    messages_field: str | None = None
    take: int | None = None
    revision: str | None = None
    data_files: str | list[str] | None = None

    @property
    def tag(self) -> str:
        """Short source tag used in row ids and reports."""
        return ":".join(x for x in (self.path, self.name, self.split) if x)


@dataclass
class DataReport:
    """What happened while loading one domain split.

    ``n_read`` rows (including malformed lines) = ``n_valid`` + sum of ``dropped``; ``n_kept`` of the
    valid rows were returned after sampling.
    """

    domain: str
    split: str
    origin: list[str] = field(default_factory=list)
    n_read: int = 0
    n_valid: int = 0
    n_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    kept_by_source: dict[str, int] = field(default_factory=dict)
    sample_ids_hash: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view (for the training manifest)."""
        return asdict(self)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """Return the local data directory: ``data_dir``, else ``$BRAINSTACKS_DATA_DIR``, else ``None``.

    Raises:
        DataError: the named directory does not exist.
    """
    raw = os.fspath(data_dir) if data_dir is not None else os.environ.get(ENV_DATA_DIR) or None
    if raw is None:
        return None
    path = Path(raw).expanduser()
    if not path.is_dir():
        origin = "data_dir argument" if data_dir is not None else f"${ENV_DATA_DIR}"
        raise DataError(f"data directory {path} (from {origin}) does not exist")
    return path


def _require_data_dir(data_dir: str | os.PathLike | None, what: str) -> Path:
    path = resolve_data_dir(data_dir)
    if path is None:
        raise DataError(
            f"no data source for {what}: pass data_dir=..., set ${ENV_DATA_DIR} to a directory in the "
            "<dir>/<domain>/{train,val}.jsonl layout, or give hf_sources=[HFSource(...)]"
        )
    return path


def _iter_jsonl(path: Path) -> Any:
    """Yield parsed JSON values, or ``None`` for a malformed line; blank lines are skipped."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield None


def _messages_pair(messages: Any) -> tuple[str, str] | None:
    """First user turn and the first assistant turn after it (role/content or from/value)."""
    if not isinstance(messages, list):
        return None
    user: str | None = None
    for turn in messages:
        if not isinstance(turn, dict):
            continue
        role = str(turn.get("role", turn.get("from", ""))).lower()
        content = turn.get("content", turn.get("value"))
        if isinstance(content, list):
            content = "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
        if not isinstance(content, str):
            continue
        if user is None and role in _USER_ROLES:
            user = content
        elif user is not None and role in _ASSISTANT_ROLES:
            return user, content
    return None


def _hf_raw_rows(src: HFSource, seed: int) -> list[tuple[str, Any]]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a core dependency
        raise DataError("the 'datasets' package is needed for hf_sources") from e
    try:
        ds = datasets.load_dataset(
            src.path, src.name, split=src.split, revision=src.revision, data_files=src.data_files
        )
    except Exception as e:  # datasets raises many types (network, missing split, bad config): all fatal
        raise DataError(f"could not load hub dataset {src.tag}: {e}") from e
    idx = seeded_sample_indices(len(ds), src.take, seed)
    out: list[tuple[str, Any]] = []
    for i, row in zip(idx, ds.select(idx)):
        if src.messages_field is not None:
            pair = _messages_pair(row.get(src.messages_field))
            raw: Any = {"instruction": pair[0], "input": "", "output": pair[1]} if pair else {}
        else:
            raw = {
                "instruction": row.get(src.instruction_field),
                "input": row.get(src.input_field, "") if src.input_field else "",
                "output": row.get(src.output_field),
            }
        raw = {**raw, "id": f"{src.tag}-{i}", "source": src.tag}
        out.append((src.tag, raw))
    return out


def _normalise(raw: dict[str, Any], domain: str, default_id: str, default_source: str) -> dict[str, Any]:
    return {
        "id": str(raw.get("id") or default_id),
        "instruction": strip_chat_tokens(raw["instruction"]),
        "input": strip_chat_tokens(raw.get("input") or ""),
        "output": strip_chat_tokens(raw["output"]),
        "domain": domain,
        "source": str(raw.get("source") or default_source),
    }


def _ids_hash(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()


def load_domain_rows(
    domain: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    hf_sources: list[HFSource] | None = None,
    n: int | None = None,
    seed: int = 42,
    max_chars: int = 20000,
) -> tuple[list[dict[str, Any]], DataReport]:
    """Load, clean, validate and sample the rows of one domain split.

    With ``hf_sources`` the rows come from those hub datasets only; otherwise from
    ``<data_dir>/<domain>/<split>.jsonl`` (``data_dir`` or ``$BRAINSTACKS_DATA_DIR``). Rows are
    normalised to ``{"id", "instruction", "input", "output", "domain", "source"}`` after
    :func:`strip_chat_tokens`. Malformed JSON, wrong types, empty fields, over-long rows and duplicate
    ids are skipped and counted in :attr:`DataReport.dropped`. ``n`` valid rows are then drawn
    uniformly with a seeded sample (all rows when ``n`` is ``None``).

    Raises:
        DataError: no data source is configured, the file is missing, or a hub dataset fails to load.
    """
    report = DataReport(domain=domain, split=split)
    raw_rows: list[tuple[str, Any]] = []
    if hf_sources:
        for k, src in enumerate(hf_sources):
            raw_rows.extend(_hf_raw_rows(src, seed + k))
            report.origin.append(f"hf:{src.tag}")
    else:
        path = _require_data_dir(data_dir, f"domain {domain!r}") / domain / f"{split}.jsonl"
        if not path.is_file():
            available = sorted(
                p.name for p in path.parent.parent.iterdir() if (p / f"{split}.jsonl").is_file()
            )
            raise DataError(f"{path} not found (domains with a {split} split there: {available})")
        report.origin.append(str(path))
        raw_rows = [(f"{domain}-{split}", r) for r in _iter_jsonl(path)]

    dropped: Counter[str] = Counter()
    valid: list[dict[str, Any]] = []
    seen: set[str] = set()
    for line_no, (default_source, raw) in enumerate(raw_rows):
        report.n_read += 1
        reason = "malformed_json" if raw is None else validate_row(raw, max_chars)
        if reason is None:
            row = _normalise(raw, domain, f"{default_source}-{line_no}", default_source)
            reason = validate_row(row, max_chars)  # cleaning may have emptied a field
            if reason is None and row["id"] in seen:
                reason = "duplicate_id"
        if reason is not None:
            dropped[reason] += 1
            continue
        seen.add(row["id"])
        valid.append(row)

    rows = [valid[i] for i in seeded_sample_indices(len(valid), n, seed)]
    report.n_valid = len(valid)
    report.n_kept = len(rows)
    report.dropped = dict(sorted(dropped.items()))
    report.kept_by_source = dict(sorted(Counter(r["source"] for r in rows).items()))
    report.sample_ids_hash = _ids_hash([r["id"] for r in rows])
    if dropped:
        logger.info(
            "%s/%s: dropped %d of %d rows %s",
            domain,
            split,
            sum(dropped.values()),
            report.n_read,
            report.dropped,
        )
    return rows, report


_EVAL_REQUIRED = ("id", "question")


def load_eval_rows(
    bench: str, data_dir: str | os.PathLike | None = None, n: int | None = None, seed: int = 42
) -> list[dict[str, Any]]:
    """Load ``<data_dir>/eval/<bench>.jsonl``, optionally a seeded uniform sample of ``n`` rows.

    Evaluation data must be exact, so a malformed line or a row without ``id``/``question`` and without
    either ``choices``+``answer_index`` or ``final`` raises instead of being skipped.

    Raises:
        DataError: no data directory, missing file, or a malformed row (with its line number).
    """
    path = _require_data_dir(data_dir, f"benchmark {bench!r}") / "eval" / f"{bench}.jsonl"
    if not path.is_file():
        raise DataError(f"{path} not found (known benchmarks: {list(EVAL_BENCHMARKS)})")
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: malformed JSON ({e})") from e
            has_answer = isinstance(row, dict) and (
                ("choices" in row and "answer_index" in row) or "final" in row
            )
            if not has_answer or any(not row.get(k) for k in _EVAL_REQUIRED):
                raise DataError(f"{path}:{line_no}: needs id, question and choices+answer_index or final")
            rows.append(row)
    return [rows[i] for i in seeded_sample_indices(len(rows), n, seed)]


def load_eval_questions(
    data_dir: str | os.PathLike | None = None, benches: tuple[str, ...] | list[str] | None = None
) -> list[str]:
    """All question texts of the given benchmarks (default: every file in ``<data_dir>/eval``).

    Used as ``eval_texts`` for :func:`~brainstacks_hooks.data.decontamination.decontaminate`.
    """
    root = _require_data_dir(data_dir, "evaluation questions") / "eval"
    names = list(benches) if benches is not None else sorted(p.stem for p in root.glob("*.jsonl"))
    return [row["question"] for bench in names for row in load_eval_rows(bench, data_dir=root.parent)]
