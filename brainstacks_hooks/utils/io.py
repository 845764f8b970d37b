"""Atomic file writes, checksums and safetensors with JSON metadata.

Everything the toolkit writes goes through :func:`atomic_write_bytes`, so a crash (even ``kill -9``)
never leaves a half-written stack or manifest: readers see either the old file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from ..errors import StackLoadError


def _file_mode() -> int:
    """The mode ``open()`` gives a new file (0o666 minus the umask); ``mkstemp`` would give 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)  # readable like any other file the user writes
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Serialise ``obj`` as indented JSON and write it atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, raising :class:`StackLoadError` with the path on a parse error."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise StackLoadError(f"{path}: not valid JSON ({e})") from e


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _sorted_metadata(data: bytes) -> bytes:
    """``data`` (a serialized safetensors file) with its ``__metadata__`` keys in sorted order.

    safetensors writes the metadata from a hash map, in an order that changes from one process to the next, so
    the same tensors and metadata gave files (and sha256 identities) that differ. The sorted object has the same
    length, so only those bytes of the header change; a header other than the expected one (the metadata object
    not found exactly once) leaves ``data`` as it is. ``data`` must come from ``safetensors.torch.save``.
    """
    n = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + n].decode("utf-8")
    meta = json.loads(header).get("__metadata__")
    if not isinstance(meta, dict) or len(meta) < 2:
        return data
    as_written = json.dumps(meta, separators=(",", ":"), ensure_ascii=False)
    ordered = json.dumps(dict(sorted(meta.items())), separators=(",", ":"), ensure_ascii=False)
    if header.count(as_written) != 1 or len(ordered) != len(as_written):
        return data
    fixed = header.replace(as_written, ordered).encode("utf-8")
    return data[:8] + fixed + data[8 + n :] if len(fixed) == n else data


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> str:
    """Save tensors as safetensors atomically and return the file's sha256 (the same tensors and metadata
    always give the same bytes)."""
    data = _sorted_metadata(save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata))
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def load_safetensors_checked(
    path: str | os.PathLike, expected_sha256: str | None = None, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Load a safetensors file, verifying its sha256 first when one is given.

    Raises:
        StackLoadError: the file is missing, unreadable, or its checksum differs.
    """
    path = Path(path)
    if not path.is_file():
        raise StackLoadError(f"{path}: file not found")
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise StackLoadError(
                f"{path}: checksum mismatch (expected sha256 {expected_sha256[:16]}..., found {actual[:16]}...)"
            )
    try:
        return load_file(str(path), device=device)
    except Exception as e:  # safetensors raises several exception types for corrupt headers
        raise StackLoadError(f"{path}: not a readable safetensors file ({e})") from e
