"""``RunDir``: the one owner of a run directory's layout, its manifest and what every phase reads from it.

Every command, recipe, notebook and benchmark reads and writes a run only through this module.

==================================== ============================== ===============================================
file                                 written by                     read by
==================================== ============================== ===============================================
``manifest.json``                    SFT (after every step)         every phase (config, rounds, losses, rows)
``rows/sft_train.jsonl``             SFT (once, at the start)       SFT resume, router (label-only rows), RL
``rows/sft_val.jsonl``               SFT (once, at the start)       SFT resume
``rows/router_train.jsonl``          SFT (once)                     router (oracle rows: unseen by every stack)
``rows/router_test.jsonl``           SFT (once)                     router report (held-out quality numbers)
``rows/<phase>.json``                router, RL (ids they used)     reports
``data_report.json``                 SFT (once)                     users (what cleaning moved or dropped)
``stacks/brainstacks.json``          SFT (after every round)        ``BrainStacks.load``, ``StackStore``, router
``stacks/<domain>-r<k>.safetensors`` SFT (once per accepted round)  through the index only
``stacks/null_space-<d>.safetensors`` SFT (when domain d ends)      ``BrainStacks.load`` (later domains, RL)
``forgetting.json`` / ``.png``       SFT (after every domain)       report
``trainer/``                         HF Trainer scratch             nobody (safe to delete)
``router/``                          ``brainstacks router``         route, generate, chat, evaluation
``eval/<mode>/``                     ``brainstacks eval``           report
``rl/<domain>-r<k>/``                ``brainstacks rl``             RL resume (pairs, pre-RL metrics), reports
==================================== ============================== ===============================================

Each stack file is written **once**; ``manifest.json`` is the record and ``stacks/brainstacks.json`` is
derived from it (:meth:`RunDir.sync_index`), both replaced atomically after the stack file exists. A crash
at any point leaves either the old or the new record: a stack file the manifest does not list yet is
retrained and overwritten under the same name on resume, an index older than the manifest is rebuilt.

Several processes (``torchrun``, ``accelerate launch``): only the main process writes. Every write method is a
no-op on the other processes (those that record a file, :meth:`RunDir.save_round`, :meth:`RunDir.save_null_space`
and :meth:`RunDir.write_rows`, return ``None`` there); :meth:`RunDir.sync` then hands the main process's manifest
to the others, so every process reads the same records. The directory must be on a filesystem every process
sees (one machine, or a shared filesystem), since the others read the files the main process wrote.

Layout versions: 2 (this one). A version-1 run directory (each stack stored twice, under
``stacks/<domain>-r<k>.safetensors`` and ``stacks/stacks/NNN-...``) is refused with a message naming
:meth:`RunDir.convert_legacy` (``brainstacks convert-run RUN_DIR``), which keeps every stack and removes
the duplicates.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .config import from_dict, to_dict
from .constants import MANIFEST_FILE, STACKS_INDEX_FILE
from .errors import RunDirError, StackLoadError
from .models.fingerprint import ModelFingerprint
from .run_config import RunConfig
from .stacks.config import StackConfig
from .stacks.serialization import (
    NullSpaceEntry,
    StackIndex,
    StackIndexEntry,
    null_space_filename,
    read_stack_index,
    read_stack_metadata,
    stack_filename,
    write_stack_index,
)
from .utils import distributed
from .utils.dtypes import DTYPES, dtype_name
from .utils.io import (
    atomic_write_bytes,
    atomic_write_json,
    load_safetensors_checked,
    read_json,
    save_safetensors_atomic,
    sha256_file,
)
from .utils.logging import get_logger

logger = get_logger(__name__)

#: Layout version of a run directory (also the manifest's ``format_version``).
LAYOUT_VERSION = 2
STACKS_SUBDIR = "stacks"
ROUTER_SUBDIR = "router"
EVAL_SUBDIR = "eval"
ROWS_SUBDIR = "rows"
TRAINER_SUBDIR = "trainer"
RL_SUBDIR = "rl"
DATA_REPORT_FILE = "data_report.json"
FORGETTING_FILE = "forgetting.json"
FORGETTING_PLOT = "forgetting.png"
#: Row sets SFT records (``rows/<phase>.jsonl``): the rows each phase after it may use. The router's rows are
#: disjoint from SFT's: no stack ever trained on them.
SFT_TRAIN, SFT_VAL = "sft_train", "sft_val"
ROUTER_TRAIN, ROUTER_TEST = "router_train", "router_test"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide numerics."""
    out = {"python": platform.python_version()}
    for name in ("brainstacks-hooks", "torch", "transformers", "trl", "datasets", "accelerate", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def ids_hash(ids: list[str]) -> str:
    """sha256 of row ids joined by newlines (order matters)."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


# ----------------------------------------------------------------------------------------------- records
@dataclass
class RoundRecord:
    """One inner-loop (or RL) round of a domain: outcome, losses, file and checksum.

    ``status`` is ``accepted`` (the stack was frozen and saved to ``file``) or ``rejected`` (discarded).
    ``kind`` is ``sft`` or the RL algorithm (``dpo``, ``grpo``). ``note`` explains a non-default decision (e.g.
    a first round accepted below ``min_loss_delta``).

    For an RL round the losses are the domain's SFT validation loss (the ``rows/sft_val`` rows, prefix mode)
    before and after RL, ``improvement`` is the gain of the acceptance metric (held-out reward for GRPO, the
    held-out DPO loss decrease for DPO) and ``rl`` holds the metrics before and after, the data and its source.
    """

    round: int
    status: str
    loss_before: float | None
    best_val_loss: float | None
    frozen_val_loss: float | None
    improvement: float | None
    steps: int
    wall_time_s: float
    seed: int
    stop_reason: str
    file: str | None = None
    sha256: str | None = None
    dtype: str | None = None
    kind: str = "sft"
    note: str | None = None
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    train_log: list[dict[str, Any]] = field(default_factory=list)
    rl: dict[str, Any] | None = None

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class NullSpaceRecord:
    """The directions one domain claims: file inside ``stacks/`` with its sha256, directions per projection."""

    file: str
    sha256: str
    directions: dict[str, int] = field(default_factory=dict)


@dataclass
class DomainRecord:
    """What the run did for one domain.

    ``status``: ``pending`` -> ``running`` -> ``done`` (or ``failed``: its first round did not lower the loss).
    """

    status: str = "pending"
    rounds: list[RoundRecord] = field(default_factory=list)
    baseline_loss: float | None = None
    final_prefix_loss: float | None = None
    wall_time_s: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)
    null_space: NullSpaceRecord | None = None

    def accepted_rounds(self) -> list[RoundRecord]:
        """Accepted rounds in round order."""
        return [r for r in self.rounds if r.accepted]

    def record(self, rec: RoundRecord) -> None:
        """Add or replace the round ``rec.round``."""
        self.rounds = sorted([r for r in self.rounds if r.round != rec.round] + [rec], key=lambda r: r.round)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rounds"] = [r.to_dict() for r in self.rounds]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DomainRecord:
        ns = d.get("null_space")
        return cls(status=d.get("status", "pending"), rounds=[RoundRecord.from_dict(r) for r in d.get("rounds", [])],
                   baseline_loss=d.get("baseline_loss"), final_prefix_loss=d.get("final_prefix_loss"),
                   wall_time_s=float(d.get("wall_time_s", 0.0)), data=dict(d.get("data") or {}),
                   null_space=NullSpaceRecord(**ns) if ns else None)


@dataclass
class RowsRecord:
    """A recorded row set: file (relative to the run), sha256, row count and hash of the ids."""

    file: str
    sha256: str
    n: int
    ids_hash: str


@dataclass
class Manifest:
    """The typed ``manifest.json`` of a run (see the module docstring for the layout it describes)."""

    fingerprint: dict[str, Any]
    config_key: dict[str, Any]
    config: dict[str, Any]
    domain_order: list[str]
    format_version: int = LAYOUT_VERSION
    created: str = field(default_factory=_now)
    updated: str = ""
    library_versions: dict[str, str] = field(default_factory=library_versions)
    sessions: int = 0
    domains: dict[str, DomainRecord] = field(default_factory=dict)
    rows: dict[str, RowsRecord] = field(default_factory=dict)
    forgetting: list[dict[str, Any]] = field(default_factory=list)
    forgetting_summary: dict[str, Any] | None = None
    null_space_capacity: dict[str, float] = field(default_factory=dict)

    def domain(self, name: str) -> DomainRecord:
        """The record of one domain (created empty on first use)."""
        return self.domains.setdefault(name, DomainRecord())

    def accepted_rounds(self, name: str) -> list[RoundRecord]:
        """Accepted rounds of a domain, in order."""
        return self.domain(name).accepted_rounds()

    @property
    def finished(self) -> bool:
        """Every domain of the curriculum is done."""
        return bool(self.domain_order) and all(self.domain(d).status == "done" for d in self.domain_order)

    def set_forgetting(self, after_domain: str, row: dict[str, Any]) -> None:
        """Store the forgetting-matrix row measured after ``after_domain`` (replacing an earlier one)."""
        self.forgetting = [r for r in self.forgetting if r["after"] != after_domain] + [{"after": after_domain, **row}]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["domains"] = {k: v.to_dict() for k, v in self.domains.items()}
        d["rows"] = {k: asdict(v) for k, v in self.rows.items()}
        return d

    def update_from(self, other: Manifest) -> None:
        """Take every value of ``other`` in place: a :class:`DomainRecord` held by a caller stays the record of
        its domain (with ``other``'s values)."""
        for f in fields(self):
            if f.name != "domains":
                setattr(self, f.name, getattr(other, f.name))
        domains = {}
        for name, rec in other.domains.items():
            mine = self.domains.get(name)
            if mine is not None:
                vars(mine).update(vars(rec))
                rec = mine
            domains[name] = rec
        self.domains = domains

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "manifest") -> Manifest:
        try:
            m = cls(fingerprint=d["fingerprint"], config_key=d["config_key"], config=d["config"],
                    domain_order=list(d["domain_order"]))
            for name in ("format_version", "created", "updated", "library_versions", "sessions", "forgetting",
                         "forgetting_summary", "null_space_capacity"):
                if name in d:
                    setattr(m, name, d[name])
            m.domains = {k: DomainRecord.from_dict(v) for k, v in d.get("domains", {}).items()}
            m.rows = {k: RowsRecord(**v) for k, v in d.get("rows", {}).items()}
        except (KeyError, TypeError, ValueError) as e:
            raise RunDirError(f"{source}: malformed manifest ({e})") from e
        return m


def config_key(config: RunConfig) -> dict[str, Any]:
    """The parts of the config a resumed run must share with the original (model, stacks, seed, domains)."""
    null_space = to_dict(config.null_space)
    if null_space.get("collection") == "isolated":  # the default: runs recorded before the field existed match
        del null_space["collection"]
    stack = config.stack.to_dict()
    stack.pop("frozen_compute", None)  # how frozen stacks are computed (same function): free to change on resume
    return {"model": to_dict(config.model), "stack": stack, "seed": config.seed,
            "domains": [d.name for d in config.domains], "null_space": null_space}


# ----------------------------------------------------------------------------------------------- RunDir
class RunDir:
    """A run directory: its paths, its manifest and the typed ways to read and extend it.

    Open an existing run with :meth:`open`; SFT creates or resumes one with :meth:`create_or_resume`.

    Example::

        run = RunDir.open("runs/quickstart")
        model, tok = run.load_base()
        stacks = run.open_stacks(model)            # BrainStacks.load on run.stacks_dir
        val = run.read_rows("sft_val")             # the exact rows SFT validated on
    """

    def __init__(self, path: str | os.PathLike, manifest: Manifest | None = None) -> None:
        self.path = Path(path)
        self._manifest = manifest

    # ---- paths
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_FILE

    @property
    def stacks_dir(self) -> Path:
        return self.path / STACKS_SUBDIR

    @property
    def router_dir(self) -> Path:
        return self.path / ROUTER_SUBDIR

    @property
    def eval_dir(self) -> Path:
        return self.path / EVAL_SUBDIR

    @property
    def rows_dir(self) -> Path:
        return self.path / ROWS_SUBDIR

    @property
    def trainer_dir(self) -> Path:
        return self.path / TRAINER_SUBDIR

    def rl_round_dir(self, domain: str, round_index: int) -> Path:
        """Scratch and records of one RL round (its pairs and pre-RL metrics, reused on resume)."""
        return self.path / RL_SUBDIR / f"{domain}-r{round_index}"

    def stack_path(self, domain: str, round_index: int) -> Path:
        """Where the stack of ``domain`` round ``round_index`` is written (once)."""
        return self.stacks_dir / stack_filename(domain, round_index)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---- opening
    @staticmethod
    def is_run_dir(path: str | os.PathLike) -> bool:
        """``path`` holds a ``manifest.json``."""
        return (Path(path) / MANIFEST_FILE).is_file()

    @classmethod
    def open(cls, path: str | os.PathLike, *, require_finished: bool = False) -> RunDir:
        """Open an existing run directory (read-only until a write method is called).

        Raises:
            RunDirError: ``path`` is not a run directory, is of the old layout (with the conversion command),
                or (``require_finished``) its SFT is not finished.
        """
        path = Path(path)
        if not (path / MANIFEST_FILE).is_file():
            what = "does not exist" if not path.exists() else f"has no {MANIFEST_FILE}"
            raise RunDirError(f"{path}: not a run directory ({what}); train one with `brainstacks train CONFIG`")
        raw = read_json(path / MANIFEST_FILE)
        version_ = raw.get("format_version") if isinstance(raw, dict) else None
        if version_ == 1:
            raise RunDirError(f"{path}: run directory of layout 1 (each stack stored twice); convert it with "
                              f"`brainstacks convert-run {path}` (keeps every stack, removes the duplicates)")
        if version_ != LAYOUT_VERSION:
            raise RunDirError(f"{path / MANIFEST_FILE}: run layout {version_!r} unsupported "
                              f"(this library reads {LAYOUT_VERSION})")
        run = cls(path, Manifest.from_dict(raw, str(path / MANIFEST_FILE)))
        if require_finished and not run.manifest.finished:
            pending = [d for d in run.manifest.domain_order if run.manifest.domain(d).status != "done"]
            raise RunDirError(f"{path}: SFT is not finished (domains not done: {', '.join(pending) or 'all'}); "
                              "rerun the train command to resume it")
        return run

    @classmethod
    def create_or_resume(cls, config: RunConfig, fingerprint: ModelFingerprint) -> RunDir:
        """The run directory of ``config.output_dir``: a new one, or the existing run to resume.

        Several processes: the main process creates or resumes it, then the others get its manifest (the same
        error on every process when it cannot).

        Raises:
            RunDirError: the directory holds a run with another model, stack config, seed, domain list or
                null-space setting, or one of the old layout.
        """
        run = distributed.on_main_process(cls._create_or_resume, config, fingerprint)
        if run is None:  # another process than the main one
            run = cls(config.output_dir)
        run.sync()
        return run

    @classmethod
    def _create_or_resume(cls, config: RunConfig, fingerprint: ModelFingerprint) -> RunDir:
        path = Path(config.output_dir)
        key = config_key(config)
        if cls.is_run_dir(path):
            run = cls.open(path)
            m = run.manifest
            if m.config_key != key or m.fingerprint != fingerprint.to_dict():
                raise RunDirError(f"{run.manifest_path}: this output_dir holds a run with a different model, stack "
                                  "config, seed, domain list or null-space setting; use a new output_dir (or "
                                  "restore the original config)")
        else:
            path.mkdir(parents=True, exist_ok=True)
            run = cls(path, Manifest(fingerprint=fingerprint.to_dict(), config_key=key, config=to_dict(config),
                                     domain_order=[d.name for d in config.domains]))
        run.manifest.sessions += 1
        run.manifest.config = to_dict(config)  # training settings may change between sessions
        run.save_manifest()
        run.sync_index()
        return run

    # ---- manifest
    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            self._manifest = RunDir.open(self.path).manifest
        return self._manifest

    def save_manifest(self) -> None:
        """Write ``manifest.json`` atomically (the main process; see :meth:`sync` for the others)."""
        self.manifest.updated = _now()
        if distributed.is_main_process():
            atomic_write_json(self.manifest_path, self.manifest.to_dict())

    def sync(self) -> None:
        """Several processes: every process takes the main process's manifest (collective: every process calls
        it, after the main process wrote). A no-op in a single process.

        Records a caller holds (:meth:`Manifest.domain`) stay valid: they are updated in place.
        """
        if not distributed.is_initialized():
            return
        data = distributed.broadcast_object(self.manifest.to_dict() if distributed.is_main_process() else None)
        if not distributed.is_main_process():
            theirs = Manifest.from_dict(data, str(self.manifest_path))
            if self._manifest is None:
                self._manifest = theirs
            else:
                self._manifest.update_from(theirs)

    def run_config(self) -> RunConfig:
        """The :class:`RunConfig` of the run's latest session."""
        return from_dict(RunConfig, dict(self.manifest.config))

    @property
    def stack_config(self) -> StackConfig:
        return StackConfig.from_dict(self.manifest.config["stack"])

    @property
    def fingerprint(self) -> ModelFingerprint:
        return ModelFingerprint.from_dict(self.manifest.fingerprint)

    # ---- model and stacks
    def load_base(self, **overrides: Any) -> tuple[Any, Any]:
        """Load the run's base model and tokenizer (name, backend, dtype, revision as trained; ``overrides``
        replace any of ``backend``, ``dtype``, ``max_seq_length``)."""
        from .models.loading import load_base_model

        m = self.run_config().model
        kw = {"backend": m.backend, "dtype": m.dtype, "revision": m.revision, "max_seq_length": m.max_seq_length}
        kw.update(overrides)
        return load_base_model(m.name_or_path, **kw)

    def load_tokenizer(self) -> Any:
        """Only the run's tokenizer (prepared as :func:`load_base_model` prepares it)."""
        from .models.backend_hf import load_tokenizer
        from .models.loading import prepare_tokenizer, resolve_model_path

        m = self.run_config().model
        return prepare_tokenizer(load_tokenizer(resolve_model_path(m.name_or_path), revision=m.revision))

    def stack_index(self) -> StackIndex:
        """The validated ``stacks/brainstacks.json``."""
        return read_stack_index(self.stacks_dir)

    def stack_identity(self) -> list[dict[str, Any]]:
        """Domain, round and sha256 of every accepted stack, in training order (what a router is bound to)."""
        return [{"domain": d, "round": r.round, "sha256": r.sha256}
                for d in self.manifest.domain_order for r in self.manifest.accepted_rounds(d)]

    def open_stacks(self, model: Any = None, **load_kw: Any) -> Any:
        """``BrainStacks.load`` of the run's stacks onto ``model`` (the run's base model when ``None``)."""
        from .stacks.brainstacks import BrainStacks

        if model is None:
            model, _ = self.load_base()
        return BrainStacks.load(model, self.stacks_dir, **load_kw)

    def restore_stacks(self, stacks: Any, domains: list[str] | None = None,
                       null_space_of: list[str] | None = None) -> None:
        """Attach the accepted stacks of ``domains`` (all by default) frozen, and the null-space bases of
        ``null_space_of`` (default: the same domains), checksums verified.

        ``domains`` keeps the training order: ``domains`` = the first ``i + 1`` domains is the model domain
        ``i`` was trained on (``prefix``); their bases, without domain ``i``'s own, are what its stacks were
        projected against.
        """
        from .stacks.serialization import load_stack

        self.verify_stacks()
        m = self.manifest
        order = m.domain_order if domains is None else [d for d in m.domain_order if d in set(domains)]
        bases_of = order if null_space_of is None else list(null_space_of)
        for name in order:
            for r in m.accepted_rounds(name):
                stacks.add_frozen(load_stack(self.path / r.file, stacks.shapes, stacks.fingerprint, stacks.config,
                                             expected_sha256=r.sha256))
        for name in bases_of:
            if m.domain(name).null_space is not None:
                stacks.null_space_bases[name] = self.read_null_space(name)
        if stacks.null_space_bases:
            stacks.merge_null_space()

    def read_null_space(self, domain: str) -> dict[str, Any]:
        """The bases ``domain`` claims (``{target: V [d_out, k]}``), checksum verified.

        Raises:
            RunDirError: the manifest records no null space for ``domain``.
            StackLoadError: the file is missing or changed.
        """
        rec = self.manifest.domain(domain).null_space
        if rec is None:
            raise RunDirError(f"{self.path}: no null space recorded for {domain!r}")
        return load_safetensors_checked(self.path / rec.file, rec.sha256)

    # ---- writing stacks
    def save_round(self, domain: str, record: RoundRecord, stack: Any = None,
                   stacks: Any = None) -> RoundRecord | None:
        """Record one finished round: write its stack file (accepted rounds), then manifest, then index.

        ``stack`` is the frozen :class:`~brainstacks_hooks.stacks.stack.Stack` of an accepted round and
        ``stacks`` its :class:`~brainstacks_hooks.stacks.brainstacks.BrainStacks` (for the fingerprint).
        Several processes: the main process records it; elsewhere nothing happens and ``None`` is returned
        (:meth:`sync` brings the record).
        """
        if not distributed.is_main_process():
            return None
        if record.accepted:
            if stack is None or stacks is None:
                raise ValueError("an accepted round needs its frozen stack and the BrainStacks it belongs to")
            path = self.stack_path(domain, record.round)
            record.sha256 = stacks.save_stack(stack, path)
            record.file = str(path.relative_to(self.path))
            record.dtype = dtype_name(stack.dtype)
        self.manifest.domain(domain).record(record)
        self.save_manifest()
        self.sync_index()
        return record

    def save_null_space(self, domain: str, bases: dict[str, Any]) -> NullSpaceRecord | None:
        """Write the bases ``domain`` claims (``{target: V [d_out, k]}``) once, then manifest and index.

        Several processes: the main process writes; elsewhere nothing happens and ``None`` is returned.
        """
        if not distributed.is_main_process():
            return None
        rel = null_space_filename(domain)
        sha = save_safetensors_atomic(bases, self.stacks_dir / rel)
        rec = NullSpaceRecord(file=f"{STACKS_SUBDIR}/{rel}", sha256=sha,
                              directions={k: int(v.shape[1]) for k, v in list(bases.items())[:7]})
        self.manifest.domain(domain).null_space = rec
        self.save_manifest()
        self.sync_index()
        return rec

    def sync_index(self) -> Path | None:
        """Rewrite ``stacks/brainstacks.json`` from the manifest (accepted rounds and null-space files; the main
        process only)."""
        if not distributed.is_main_process():
            return None
        m = self.manifest
        entries, null_space = [], []
        for d in m.domain_order:
            rec = m.domain(d)
            for r in rec.accepted_rounds():
                name = r.dtype or read_stack_metadata(self.path / r.file)["dtype"]  # layout-1 records lack it
                dtype = DTYPES[name]
                entries.append(StackIndexEntry(len(entries), d, r.round, Path(r.file).name, r.sha256, dtype))
            if rec.null_space is not None:
                null_space.append(NullSpaceEntry(d, Path(rec.null_space.file).name, rec.null_space.sha256))
        if not entries and not null_space and not self.stacks_dir.is_dir():
            return None
        order = [d for d in m.domain_order if m.accepted_rounds(d) or m.domain(d).null_space]
        return write_stack_index(self.stacks_dir, self.stack_config, self.fingerprint, order, entries, null_space)

    def verify_stacks(self) -> None:
        """Check every accepted stack file and null-space file against the manifest's sha256.

        Raises:
            StackLoadError: a file is missing or its checksum differs (named with domain and round).
        """
        for d in self.manifest.domain_order:
            rec = self.manifest.domain(d)
            files = [(f"{d} round {r.round}", r.file, r.sha256) for r in rec.accepted_rounds()]
            if rec.null_space is not None:
                files.append((f"{d} null space", rec.null_space.file, rec.null_space.sha256))
            for what, rel, sha in files:
                path = self.path / rel
                if not path.is_file():
                    raise StackLoadError(f"{path}: listed in the manifest ({what}) but missing; restore it or "
                                         "start a new output_dir")
                if sha256_file(path) != sha:
                    raise StackLoadError(f"{path}: checksum differs from the manifest ({what}); the file changed "
                                         "after it was written")

    # ---- rows
    def write_rows(self, phase: str, rows: list[dict[str, Any]]) -> RowsRecord | None:
        """Record the rows a phase uses (``rows/<phase>.jsonl``: id, domain, instruction, input, output).

        Several processes: the main process writes; elsewhere nothing happens and ``None`` is returned.
        """
        if not distributed.is_main_process():
            return None
        keys = ("id", "domain", "instruction", "input", "output")
        text = "".join(json.dumps({k: r.get(k, "") for k in keys}, ensure_ascii=False) + "\n" for r in rows)
        rel = f"{ROWS_SUBDIR}/{phase}.jsonl"
        data = text.encode()
        atomic_write_bytes(self.path / rel, data)
        rec = RowsRecord(rel, hashlib.sha256(data).hexdigest(), len(rows), ids_hash([r["id"] for r in rows]))
        self.manifest.rows[phase] = rec
        self.save_manifest()
        return rec

    def has_rows(self, phase: str) -> bool:
        return phase in self.manifest.rows

    def read_rows(self, phase: str, domain: str | None = None) -> list[dict[str, Any]]:
        """The rows ``phase`` recorded (checksum verified), optionally of one domain.

        Raises:
            RunDirError: the phase recorded no rows, or the file is missing or changed.
        """
        rec = self.manifest.rows.get(phase)
        if rec is None:
            raise RunDirError(f"{self.path}: no {phase!r} rows recorded (recorded: {sorted(self.manifest.rows)})")
        path = self.path / rec.file
        if not path.is_file():
            raise RunDirError(f"{path}: recorded {phase} rows are missing")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != rec.sha256:
            raise RunDirError(f"{path}: recorded {phase} rows changed after they were written")
        rows = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
        return [r for r in rows if domain is None or r["domain"] == domain]

    def rows_by_domain(self, phase: str) -> dict[str, list[dict[str, Any]]]:
        """:meth:`read_rows` grouped by domain, in domain order."""
        out: dict[str, list[dict[str, Any]]] = {d: [] for d in self.manifest.domain_order}
        for r in self.read_rows(phase):
            out.setdefault(r["domain"], []).append(r)
        return out

    def write_ids(self, phase: str, ids: dict[str, list[str]]) -> Path:
        """Record which row ids a later phase used, by role (``rows/<phase>.json``; the main process only)."""
        path = self.rows_dir / f"{phase}.json"
        if distributed.is_main_process():
            atomic_write_json(path, {"phase": phase, "ids": ids, "ids_hash": {k: ids_hash(v) for k, v in ids.items()}})
        return path

    def write_data_report(self, report: dict[str, Any]) -> None:
        if distributed.is_main_process():
            atomic_write_json(self.path / DATA_REPORT_FILE, report)

    # ---- old layout
    @classmethod
    def convert_legacy(cls, path: str | os.PathLike) -> RunDir:
        """Convert a layout-1 run directory in place (every stack kept, verified, duplicates removed).

        Layout 1 kept each stack twice (``stacks/<d>-r<k>.safetensors`` for the manifest and
        ``stacks/stacks/NNN-<d>-r<k>.safetensors`` for the index) and null-space bases in ``null_space/``.
        The manifest's copies are verified and kept; null-space files move into ``stacks/``; a new index is
        written before anything is removed, so an interrupted conversion can simply be run again.

        Raises:
            RunDirError: not a layout-1 run directory, or a stack file is missing or corrupt.
        """
        path = Path(path)
        if not (path / MANIFEST_FILE).is_file():
            raise RunDirError(f"{path}: not a run directory (no {MANIFEST_FILE})")
        raw = read_json(path / MANIFEST_FILE)
        if raw.get("format_version") == LAYOUT_VERSION:
            logger.info("%s: already layout %d", path, LAYOUT_VERSION)
            return cls.open(path)
        if raw.get("format_version") != 1:
            raise RunDirError(f"{path}: unknown run layout {raw.get('format_version')!r}")
        for d in raw.get("domains", {}).values():
            ns = d.get("null_space")
            if ns:  # null_space/<d>.safetensors -> stacks/null_space-<d>.safetensors (same bytes, same sha)
                src, name = path / ns["file"], Path(ns["file"]).stem
                dst = path / STACKS_SUBDIR / null_space_filename(name)
                if src.is_file():
                    os.replace(src, dst)
                if not dst.is_file():
                    raise RunDirError(f"{src}: null-space file listed in the manifest is missing")
                ns["file"] = f"{STACKS_SUBDIR}/{dst.name}"
        raw["format_version"] = LAYOUT_VERSION
        raw.setdefault("rows", {})
        run = cls(path, Manifest.from_dict(raw, str(path / MANIFEST_FILE)))
        try:
            run.verify_stacks()
        except StackLoadError as e:
            raise RunDirError(f"cannot convert {path}: {e}") from e
        run.sync_index()
        run.save_manifest()
        dup = path / STACKS_SUBDIR / STACKS_SUBDIR
        if dup.is_dir():
            shutil.rmtree(dup)
        for old in (path / STACKS_SUBDIR / "null_space.safetensors", path / "null_space"):
            if old.is_file():
                old.unlink()
            elif old.is_dir() and not any(old.iterdir()):
                old.rmdir()
        logger.info("%s: converted to layout %d (router and evaluation outputs must be regenerated if they were "
                    "bound to the old index)", path, LAYOUT_VERSION)
        return run


__all__ = [
    "DATA_REPORT_FILE",
    "LAYOUT_VERSION",
    "ROUTER_TEST",
    "ROUTER_TRAIN",
    "SFT_TRAIN",
    "SFT_VAL",
    "STACKS_INDEX_FILE",
    "DomainRecord",
    "Manifest",
    "NullSpaceRecord",
    "RoundRecord",
    "RowsRecord",
    "RunDir",
    "config_key",
    "ids_hash",
    "library_versions",
]
