"""Model fingerprints: which base a stack was trained on.

A fingerprint records the model id or path, a hash of the architecture fields of the config and the
``(in, out)`` shape of every targeted projection. Saved stacks and routers carry it; loading compares it
and refuses a different base even when the shapes happen to match.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .targets import projection_features

# Config keys that do not change the function the model computes (or change with the loader only).
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "quantization_config",
    "use_cache",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "attn_implementation",
    "_commit_hash",
    "architectures",
    "auto_map",
    "pad_token_id",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "torchscript",
    "id2label",
    "label2id",
    "task_specific_params",
    "unsloth_version",
    "unsloth_fixed",
}


def config_hash(config: Any) -> str:
    """sha256 over the architecture fields of a transformers config (volatile keys removed)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    clean = {k: v for k, v in sorted(d.items()) if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")}
    blob = json.dumps(clean, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass(frozen=True)
class ModelFingerprint:
    """Identity of a base model as seen by stacks."""

    model: str
    config_hash: str
    targets: dict[str, list[int]] = field(default_factory=dict)
    revision: str | None = None

    @classmethod
    def from_model(cls, model: nn.Module, targets: dict[str, nn.Module]) -> ModelFingerprint:
        """Build the fingerprint of ``model`` for the given target projections."""
        source = getattr(model, "_brainstacks_source", None) or {}
        name = source.get("name_or_path") or getattr(model.config, "_name_or_path", "") or type(model).__name__
        return cls(
            model=str(name),
            config_hash=config_hash(model.config),
            targets={k: list(projection_features(m)) for k, m in targets.items()},
            revision=source.get("revision"),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelFingerprint:
        """Inverse of :meth:`to_dict`."""
        return cls(
            model=d["model"], config_hash=d["config_hash"], targets=dict(d["targets"]), revision=d.get("revision")
        )

    def differences(self, other: ModelFingerprint) -> list[str]:
        """Human-readable list of what differs (empty when compatible). The model name alone never counts."""
        out = []
        if self.config_hash != other.config_hash:
            out.append(f"config hash {self.config_hash[:12]} != {other.config_hash[:12]} (different architecture)")
        missing = sorted(set(self.targets) - set(other.targets))
        extra = sorted(set(other.targets) - set(self.targets))
        if missing:
            out.append(f"projections missing on the model: {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        if extra:
            out.append(f"projections not in the stacks: {extra[:4]}{' ...' if len(extra) > 4 else ''}")
        for k in sorted(set(self.targets) & set(other.targets)):
            if list(self.targets[k]) != list(other.targets[k]):
                out.append(f"{k}: shape {self.targets[k]} != {other.targets[k]}")
                break
        return out
