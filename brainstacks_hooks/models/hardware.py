"""Backend and precision for the machine at hand (what the README's GPU section and the notebooks use).

===================  =====================  ==================================================
hardware             backend                precision
===================  =====================  ==================================================
no CUDA device       ``hf``                 fp32 weights, ``train.bf16`` autocast (CPU)
CUDA without bf16    ``unsloth`` or ``bnb4`` fp16 autocast + GradScaler (Colab's T4, V100)
CUDA with bf16       ``unsloth`` or ``bnb4`` bf16 (L4, A10, A100, H100)
===================  =====================  ==================================================

``unsloth`` is chosen when it imports (the ``unsloth`` extra, in its own environment: see the README), else
``bnb4`` when bitsandbytes is installed, else ``hf``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class HardwareSettings:
    """What to train with here: ``backend``, ``dtype`` (weights), ``bf16``/``fp16`` (training autocast)."""

    device: str
    backend: str
    dtype: str
    bf16: bool
    fp16: bool

    def overrides(self) -> list[str]:
        """Dotted overrides for ``brainstacks train`` (``model.backend=... train.bf16=... train.fp16=...``)."""
        return [f"model.backend={self.backend}", f"model.dtype={self.dtype}", f"train.bf16={str(self.bf16).lower()}",
                f"train.fp16={str(self.fp16).lower()}"]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def native_bf16() -> bool:
    """A CUDA device with native bf16 (compute capability 8+: L4, A10, A100, H100). ``torch.cuda.is_bf16_supported()``
    also says yes for emulated bf16 (T4, V100), where fp16 + GradScaler is the right choice."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def suggest_settings(prefer: str | None = None) -> HardwareSettings:
    """The backend and precision for this machine (see the module table); ``prefer`` forces a backend."""
    if not torch.cuda.is_available():
        return HardwareSettings("cpu", prefer or "hf", "float32", bf16=True, fp16=False)
    name = torch.cuda.get_device_name(0)
    bf16 = native_bf16()
    if prefer is None:
        if importlib.util.find_spec("unsloth") is not None:
            prefer = "unsloth"
        elif importlib.util.find_spec("bitsandbytes") is not None:
            prefer = "bnb4"
        else:
            prefer = "hf"
    dtype = "bfloat16" if bf16 else "float16"
    return HardwareSettings(name, prefer, dtype, bf16=bf16, fp16=not bf16)
