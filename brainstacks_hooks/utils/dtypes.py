"""The one table of dtype names: YAML/CLI names, file metadata names and safetensors header codes."""

from __future__ import annotations

import torch

from ..errors import ConfigError

#: Canonical floating dtypes by name (file metadata and configs use these names).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Short forms accepted from users.
ALIASES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
#: dtype codes of a safetensors header.
SAFETENSORS_CODES: dict[torch.dtype, str] = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def parse_dtype(name: str | torch.dtype, *, allow_auto: bool = False) -> torch.dtype | str:
    """``"bf16"`` / ``"torch.bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; ``"auto"`` when allowed.

    Raises:
        ConfigError: an unknown name.
    """
    if isinstance(name, torch.dtype):
        return name
    key = str(name).strip().lower().removeprefix("torch.")
    if allow_auto and key == "auto":
        return "auto"
    key = ALIASES.get(key, key)
    if key not in DTYPES:
        valid = sorted(DTYPES) + sorted(ALIASES) + (["auto"] if allow_auto else [])
        raise ConfigError(f"unknown dtype {name!r}; valid: {', '.join(valid)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the name written to files)."""
    return str(dtype).removeprefix("torch.")
