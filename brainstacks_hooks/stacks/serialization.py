"""Stack files: one safetensors file per stack with JSON metadata; strict loading.

Tensor keys are stable: ``layers.{i}.{proj}.{A|B|router|noise}``. The safetensors header carries the
format version, the stack config, the base-model fingerprint, the domain and the round. Loading checks
the checksum, the fingerprint, the exact key set, every shape and the dtype, and raises
:class:`~brainstacks_hooks.errors.StackLoadError` (or :class:`FingerprintMismatch`) naming the file and
what was expected and found.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .. import __version__
from ..constants import READABLE_INDEX_VERSIONS, STACK_FORMAT_VERSION, STACKS_INDEX_FILE, STACKS_INDEX_VERSION
from ..errors import ConfigError, FingerprintMismatch, StackLoadError
from ..models.fingerprint import ModelFingerprint
from ..utils.dtypes import DTYPES, dtype_name
from ..utils.io import atomic_write_json, load_safetensors_checked, read_json, save_safetensors_atomic, sha256_file
from ..utils.logging import get_logger
from .config import StackConfig
from .stack import Stack

logger = get_logger(__name__)

#: The tensors of one MoE-LoRA in a stack file, per target key.
PARAM_NAMES = ("A", "B", "router", "noise")
_COMPAT_FIELDS = ("num_experts", "top_k", "rank", "alpha", "use_rslora", "target_modules")


def save_stack(stack: Stack, path: str | os.PathLike, fingerprint: ModelFingerprint) -> str:
    """Write ``stack`` to ``path`` atomically and return the file's sha256."""
    meta = {
        "format_version": str(STACK_FORMAT_VERSION),
        "library_version": __version__,
        "domain": stack.domain,
        "round": str(stack.round_index),
        "frozen": "1" if stack.frozen else "0",
        "dtype": dtype_name(stack.dtype),
        "config": json.dumps(stack.config.to_dict()),
        "fingerprint": json.dumps(fingerprint.to_dict()),
    }
    return save_safetensors_atomic(stack.tensors(), path, metadata=meta)


def read_stack_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Read and decode a stack file's header without loading tensors."""
    path = Path(path)
    if not path.is_file():
        raise StackLoadError(f"{path}: stack file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for a corrupt header
        raise StackLoadError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        if int(raw.get("format_version", -1)) != STACK_FORMAT_VERSION:
            raise StackLoadError(
                f"{path}: stack format version {raw.get('format_version')} (this library reads {STACK_FORMAT_VERSION})"
            )
        return {
            "domain": raw["domain"],
            "round": int(raw["round"]),
            "frozen": raw.get("frozen", "1") == "1",
            "dtype": raw["dtype"],
            "config": StackConfig.from_dict(json.loads(raw["config"])),
            "fingerprint": ModelFingerprint.from_dict(json.loads(raw["fingerprint"])),
        }
    except (KeyError, ValueError, json.JSONDecodeError) as e:
        raise StackLoadError(f"{path}: malformed stack metadata ({e})") from e


def check_fingerprint(saved: ModelFingerprint, model_fp: ModelFingerprint, source: str, allow_mismatch: bool) -> None:
    """Raise :class:`FingerprintMismatch` when the stack was trained on another base (warn if allowed)."""
    diffs = saved.differences(model_fp)
    if not diffs:
        return
    msg = f"{source}: trained on {saved.model!r}, model is {model_fp.model!r}: " + "; ".join(diffs)
    if allow_mismatch and not any("shape" in d or "missing" in d or "not in" in d for d in diffs):
        logger.warning("loading despite fingerprint mismatch (allow_fingerprint_mismatch=True): %s", msg)
        return
    raise FingerprintMismatch(msg)


def check_config_compatible(saved: StackConfig, config: StackConfig, source: str) -> None:
    """Stacks attached to one model must share experts, top-k, rank, alpha, scaling and targets."""
    bad = [f"{f}: file {getattr(saved, f)!r} != attached {getattr(config, f)!r}"
           for f in _COMPAT_FIELDS if getattr(saved, f) != getattr(config, f)]
    if bad:
        raise StackLoadError(f"{source}: stack config incompatible with the attached config: " + "; ".join(bad))


def load_stack(
    path: str | os.PathLike,
    shapes: dict[str, tuple[int, int]],
    model_fingerprint: ModelFingerprint,
    config: StackConfig,
    expected_sha256: str | None = None,
    allow_fingerprint_mismatch: bool = False,
    device: torch.device | str = "cpu",
) -> Stack:
    """Load one stack file strictly and return it frozen (not yet attached to any model).

    Raises:
        StackLoadError: missing/corrupt file, checksum, metadata, key, shape or dtype problem.
        FingerprintMismatch: the stack was trained on a different base model.
    """
    path = Path(path)
    if expected_sha256 is not None:
        actual = sha256_file(path) if path.is_file() else None
        if actual is None:
            raise StackLoadError(f"{path}: stack file not found")
        if actual != expected_sha256:
            raise StackLoadError(
                f"{path}: checksum mismatch (expected {expected_sha256[:16]}..., found {actual[:16]}...)")
    meta = read_stack_metadata(path)
    check_fingerprint(meta["fingerprint"], model_fingerprint, str(path), allow_fingerprint_mismatch)
    check_config_compatible(meta["config"], config, str(path))
    expected = {f"{k}.{n}" for k in shapes for n in PARAM_NAMES}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        found = set(f.keys())
        missing, extra = sorted(expected - found), sorted(found - expected)
        if missing or extra:
            raise StackLoadError(f"{path}: key mismatch; missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                                 f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
        tensors = {k: f.get_tensor(k) for k in sorted(expected)}
    dtype = DTYPES.get(meta["dtype"])
    if dtype is None:
        raise StackLoadError(f"{path}: unknown dtype {meta['dtype']!r} in metadata")
    # Build on the meta device (no random init, no copies), then adopt the loaded tensors as parameters.
    stack = Stack(shapes, config, domain=meta["domain"], round_index=meta["round"], dtype=dtype, device="meta")
    for key, module in stack.items():
        for name in PARAM_NAMES:
            t = tensors[f"{key}.{name}"]
            expected_shape = tuple(getattr(module, name).shape)
            if tuple(t.shape) != expected_shape:
                raise StackLoadError(f"{path}: {key}.{name} has shape {tuple(t.shape)}, expected {expected_shape}")
            if t.dtype != dtype:
                raise StackLoadError(f"{path}: {key}.{name} has dtype {t.dtype}, metadata says {dtype}")
            setattr(module, name, torch.nn.Parameter(t, requires_grad=False))
    stack.freeze(dtype, device=device)
    return stack


def stack_filename(domain: str, round_index: int) -> str:
    """File name of one stack inside a stacks directory: ``<domain>-r<round>.safetensors``."""
    return f"{domain}-r{round_index}.safetensors"


def null_space_filename(domain: str) -> str:
    """File name of the null-space bases one domain claims: ``null_space-<domain>.safetensors``."""
    return f"null_space-{domain}.safetensors"


def _check_relative(rel: str, directory: Path, path: Path, what: str) -> None:
    if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:  # lexical check: symlinked folders are fine
        raise StackLoadError(f"{path}: {what} file {rel!r} is outside {directory}")


@dataclass
class StackIndexEntry:
    """One stack listed in ``brainstacks.json`` (validated; ``file`` is relative and stays inside the folder)."""

    position: int
    domain: str
    round_index: int
    file: str
    sha256: str
    dtype: torch.dtype

    def to_dict(self) -> dict[str, Any]:
        """The JSON entry."""
        return {"domain": self.domain, "round": self.round_index, "file": self.file, "sha256": self.sha256,
                "dtype": dtype_name(self.dtype)}


@dataclass
class NullSpaceEntry:
    """A null-space file listed in the index: ``domain`` (its tensors are keyed by target) or ``None`` for a
    version-1 file holding every domain's bases keyed ``<domain>/<target>``."""

    domain: str | None
    file: str
    sha256: str


@dataclass
class StackIndex:
    """The parsed and validated ``brainstacks.json`` of a saved stacks directory."""

    path: Path
    config: StackConfig
    fingerprint: ModelFingerprint
    entries: list[StackIndexEntry]
    domain_order: list[str]
    null_space: list[NullSpaceEntry]
    format_version: int = STACKS_INDEX_VERSION

    def identity(self) -> list[dict[str, Any]]:
        """Domain, round and sha256 of every stack, in index order (what a router is bound to)."""
        return [{"domain": e.domain, "round": e.round_index, "sha256": e.sha256} for e in self.entries]


def write_stack_index(directory: str | os.PathLike, config: StackConfig, fingerprint: ModelFingerprint,
                      domain_order: list[str], entries: list[StackIndexEntry],
                      null_space: list[NullSpaceEntry]) -> Path:
    """Write ``directory/brainstacks.json`` atomically (the files it lists must already be there).

    The one writer of the index, used by :meth:`BrainStacks.save` and by the run directory after every round.
    """
    index = {
        "format_version": STACKS_INDEX_VERSION,
        "library_version": __version__,
        "config": config.to_dict(),
        "fingerprint": fingerprint.to_dict(),
        "domain_order": list(domain_order),
        "stacks": [e.to_dict() for e in entries],
        "null_space": {n.domain: {"file": n.file, "sha256": n.sha256} for n in null_space if n.domain},
    }
    path = Path(directory) / STACKS_INDEX_FILE
    atomic_write_json(path, index)
    return path


def read_stack_index(directory: str | os.PathLike) -> StackIndex:
    """Read ``directory/brainstacks.json`` and validate its structure (not the stack files).

    Reads index versions 1 (one ``null_space.safetensors`` for all domains) and 2 (one null-space file per
    domain). Raises :class:`StackLoadError` when the index is missing, of another format version, malformed,
    lists a stack twice, names an unknown dtype or a file outside ``directory`` (absolute paths or ``..``).
    """
    directory = Path(directory)
    path = directory / STACKS_INDEX_FILE
    if not path.is_file():
        raise StackLoadError(f"{path}: not found (is {directory} a saved BrainStacks directory?)")
    index = read_json(path)
    try:
        version = index.get("format_version")
        if version not in READABLE_INDEX_VERSIONS:
            raise StackLoadError(f"{path}: index format version {version} unsupported "
                                 f"(this library reads {list(READABLE_INDEX_VERSIONS)})")
        config = StackConfig.from_dict(index["config"])
        fingerprint = ModelFingerprint.from_dict(index["fingerprint"])
        raw_entries = list(index["stacks"])
        order = [str(d) for d in index["domain_order"]]
        raw_ns = index.get("null_space") or None
    except (AttributeError, KeyError, TypeError, ValueError, ConfigError) as e:
        raise StackLoadError(f"{path}: malformed index ({e})") from e
    entries: list[StackIndexEntry] = []
    seen: set[tuple[str, int]] = set()
    for pos, raw in enumerate(raw_entries):
        try:
            domain, round_index, rel, sha = str(raw["domain"]), int(raw["round"]), str(raw["file"]), str(raw["sha256"])
            dtype = DTYPES.get(str(raw.get("dtype", "float32")))
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise StackLoadError(f"{path}: malformed stack entry {pos} ({e})") from e
        if dtype is None:
            raise StackLoadError(f"{path}: stack entry {pos} has unknown dtype {raw.get('dtype')!r}")
        _check_relative(rel, directory, path, "stack")
        if (domain, round_index) in seen:
            raise StackLoadError(f"{path}: stack {domain}/r{round_index} is listed twice")
        seen.add((domain, round_index))
        entries.append(StackIndexEntry(pos, domain, round_index, rel, sha, dtype))
    null_space: list[NullSpaceEntry] = []
    if raw_ns is not None:
        if not isinstance(raw_ns, dict):
            raise StackLoadError(f"{path}: malformed null_space entry {raw_ns!r}")
        items = [(None, raw_ns)] if version == 1 else list(raw_ns.items())
        for domain, rec in items:
            if not isinstance(rec, dict) or "sha256" not in rec:
                raise StackLoadError(f"{path}: malformed null_space entry {rec!r}")
            rel = str(rec.get("file", ""))
            _check_relative(rel, directory, path, "null-space")
            null_space.append(NullSpaceEntry(domain, rel, str(rec["sha256"])))
    return StackIndex(path, config, fingerprint, entries, order, null_space, int(version))


def read_null_space(directory: str | os.PathLike, index: StackIndex,
                    shapes: dict[str, tuple[int, int]] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """The null-space bases per domain listed in ``index`` (checksums verified), ``{domain: {target: V}}``.

    When ``shapes`` is given, every basis must be ``[d_out, k]`` of a known target.
    """
    directory = Path(directory)
    bases: dict[str, dict[str, torch.Tensor]] = {}
    for ns in index.null_space:
        path = directory / ns.file
        for name, v in load_safetensors_checked(path, ns.sha256).items():
            domain, key = (ns.domain, name) if ns.domain is not None else name.split("/", 1)
            if shapes is not None and (key not in shapes or v.dim() != 2 or v.shape[0] != shapes[key][1]):
                raise StackLoadError(f"{path}: basis {name} does not fit the model")
            bases.setdefault(domain, {})[key] = v
    return bases
