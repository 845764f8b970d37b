"""``manifest.json``: the run's record, written atomically after every step that changes it.

It holds the model fingerprint, library versions, the config, and per domain and per round the stack
file with its sha256, validation losses, steps, wall time, seed and a hash of the data sample ids. A
rerun of the same command reads it to resume from the last finished round.
"""

from __future__ import annotations

import os
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ..constants import MANIFEST_FILE
from ..errors import StackLoadError
from ..utils.io import atomic_write_json, read_json

MANIFEST_FORMAT_VERSION = 1


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide numerics."""
    out = {"python": platform.python_version()}
    for name in ("brainstacks-hooks", "torch", "transformers", "trl", "datasets", "accelerate", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


class Manifest:
    """Dictionary-backed run manifest with atomic saves."""

    def __init__(self, path: str | os.PathLike, data: dict[str, Any]) -> None:
        self.path = Path(path)
        self.data = data

    @classmethod
    def open(cls, run_dir: str | os.PathLike, header: dict[str, Any]) -> Manifest:
        """Load ``run_dir/manifest.json`` or create it from ``header`` (fingerprint, config, domains)."""
        path = Path(run_dir) / MANIFEST_FILE
        if path.is_file():
            data = read_json(path)
            if data.get("format_version") != MANIFEST_FORMAT_VERSION:
                raise StackLoadError(f"{path}: manifest format {data.get('format_version')} unsupported")
            return cls(path, data)
        data = {"format_version": MANIFEST_FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "library_versions": library_versions(), **header, "domains": {}, "forgetting": [], "sessions": 0}
        m = cls(path, data)
        m.save()
        return m

    def save(self) -> None:
        """Write atomically."""
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_json(self.path, self.data)

    def domain(self, name: str) -> dict[str, Any]:
        """The record of one domain (created empty on first use)."""
        return self.data["domains"].setdefault(name, {"status": "pending", "rounds": []})

    def accepted_rounds(self, name: str) -> list[dict[str, Any]]:
        """Accepted rounds of a domain, in order."""
        return [r for r in self.domain(name)["rounds"] if r["status"] == "accepted"]

    def record_round(self, name: str, record: dict[str, Any]) -> None:
        """Add or replace the record of round ``record['round']`` and save."""
        rounds = [r for r in self.domain(name)["rounds"] if r["round"] != record["round"]]
        rounds.append(record)
        self.domain(name)["rounds"] = sorted(rounds, key=lambda r: r["round"])
        self.save()

    def set_forgetting(self, after_domain: str, row: dict[str, Any]) -> None:
        """Store the forgetting-matrix row measured after ``after_domain`` (replacing an earlier one)."""
        rows = [r for r in self.data["forgetting"] if r["after"] != after_domain]
        rows.append({"after": after_domain, **row})
        self.data["forgetting"] = rows
        self.save()
