"""Unsloth backend: ``FastLanguageModel.from_pretrained`` on a CUDA GPU, without any PEFT.

Brainstacks attaches its stacks with forward hooks on the seven projection Linears, so this backend never
calls ``FastLanguageModel.get_peft_model``: Unsloth's fused LoRA kernels read the projection weights
directly and would bypass the hooks.

Generation caveat: Unsloth's fast decode path (any forward with a KV cache and one new token, its CUDA-graph
replay, and the ``fast_swiglu_inference`` MLP used while ``_flag_for_generation`` is set) calls the
projection kernels as plain functions, so **hooks do not fire and active stacks would silently have no
effect**. While stacks are active, generate through the HF path with ``use_cache=False`` (every projection
hook then fires on every step, at O(T²) cost). Models from this backend carry
``model._brainstacks_backend = "unsloth"`` so the inference code can enforce that. This module also sets
``UNSLOTH_DECODE_CUDA_GRAPHS=0`` (unless already set) before importing Unsloth, and refuses
``fast_inference=True`` (vLLM never sees hooks).

For Unsloth's patches to apply fully, ``import unsloth`` should run before transformers/trl/peft are
imported; import it at the top of your script when using this backend.

CPU backend (plumbing tests only): without a GPU, Unsloth 2026.10 falls back to stock transformers + PEFT +
TRL (``unsloth_zoo.cpu.FastCPUModel``: its dtype policy, chunked cross-entropy, trainer defaults), none of
the GPU kernels or fast paths above. This backend refuses it unless asked for explicitly, with
``allow_cpu=True`` (``load_base_model(..., backend="unsloth", allow_cpu=True)``) or
``BRAINSTACKS_UNSLOTH_CPU=1``; ``make test-unsloth`` runs the tests that use it, in ``.venv-unsloth``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from ..errors import BackendUnavailable, ConfigError
from ..utils.import_utils import require_unsloth
from ..utils.logging import get_logger

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = get_logger(__name__)

#: Value of ``model._brainstacks_backend`` for models loaded through Unsloth.
UNSLOTH_BACKEND_FLAG = "unsloth"
#: Set to ``1`` to allow Unsloth's CPU backend on a machine without CUDA (plumbing tests only).
ENV_UNSLOTH_CPU = "BRAINSTACKS_UNSLOTH_CPU"
_INSTALL_HINT = "pip install 'brainstacks-hooks[unsloth]'"


def unsloth_cpu_requested(allow_cpu: bool = False) -> bool:
    """True when Unsloth's CPU backend was asked for: ``allow_cpu`` or ``BRAINSTACKS_UNSLOTH_CPU=1``."""
    return bool(allow_cpu) or os.environ.get(ENV_UNSLOTH_CPU, "").strip() == "1"


def check_unsloth_usable(allow_cpu: bool = False) -> None:
    """Raise :class:`BackendUnavailable` unless Unsloth is installed and usable here (no import).

    Usable means a CUDA GPU is visible, or that Unsloth's CPU backend was asked for explicitly, with
    ``allow_cpu=True`` or ``BRAINSTACKS_UNSLOTH_CPU=1`` (:func:`load_unsloth` then warns that it tests the
    plumbing only).
    """
    require_unsloth()
    if torch.cuda.is_available():
        return
    if not unsloth_cpu_requested(allow_cpu):
        raise BackendUnavailable(
            f"the unsloth backend needs a CUDA GPU and none is available; use backend='hf' or 'bnb4' on this "
            f"machine (Unsloth: {_INSTALL_HINT} on a GPU machine; allow_cpu=True or {ENV_UNSLOTH_CPU}=1 "
            "selects Unsloth's CPU backend, for plumbing tests)"
        )


def load_unsloth(
    name_or_path: str,
    *,
    dtype: torch.dtype | str | None = None,
    max_seq_length: int = 2048,
    revision: str | None = None,
    trust_remote_code: bool = False,
    load_in_4bit: bool = False,
    allow_cpu: bool = False,
    **kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM with ``unsloth.FastLanguageModel.from_pretrained`` (no PEFT attached).

    Args:
        name_or_path: Hub id or local folder. ``use_exact_model_name=True`` is the default here, so Unsloth
            does not swap in one of its own (e.g. pre-quantized) repositories.
        dtype: torch dtype, or ``None`` / ``"auto"`` for Unsloth's choice (bf16 where supported).
        max_seq_length: maximum sequence length Unsloth prepares RoPE caches for.
        revision, trust_remote_code: as in transformers.
        load_in_4bit: quantize the base to 4 bits with bitsandbytes (Unsloth's own default is True; here
            it is False).
        allow_cpu: accept Unsloth's CPU backend when no CUDA GPU is visible (plumbing tests only; also
            ``BRAINSTACKS_UNSLOTH_CPU=1``).
        **kwargs: forwarded to ``FastLanguageModel.from_pretrained``.

    Raises:
        BackendUnavailable: Unsloth is not installed, or no CUDA GPU is available and the CPU backend was
            not asked for.
        ConfigError: ``fast_inference=True`` (vLLM bypasses forward hooks).
    """
    check_unsloth_usable(allow_cpu)
    if kwargs.get("fast_inference"):
        raise ConfigError("fast_inference=True (vLLM) bypasses forward hooks; Brainstacks cannot use it")
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        logger.warning(
            "unsloth backend on CPU (%s): Unsloth's CPU fallback is stock transformers, so this tests the "
            "plumbing only; none of Unsloth's GPU kernels or fast paths (nor their hook bypasses) run here",
            "allow_cpu=True" if allow_cpu else f"{ENV_UNSLOTH_CPU}=1",
        )
    kwargs["fast_inference"] = False
    kwargs.setdefault("use_exact_model_name", True)
    os.environ.setdefault("UNSLOTH_DECODE_CUDA_GRAPHS", "0")
    try:
        from unsloth import FastLanguageModel
    except (ImportError, NotImplementedError) as e:  # NotImplementedError: Unsloth found no accelerator
        raise BackendUnavailable(f"unsloth could not be imported ({e}); {_INSTALL_HINT}") from e

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=name_or_path,
        max_seq_length=max_seq_length,
        dtype=dtype if isinstance(dtype, torch.dtype) else None,
        load_in_4bit=load_in_4bit,
        revision=revision,
        trust_remote_code=trust_remote_code,
        **kwargs,
    )
    model._brainstacks_backend = UNSLOTH_BACKEND_FLAG
    logger.info(
        "Loaded %s (unsloth%s, 4bit=%s). Generate with use_cache=False while stacks are active: Unsloth's "
        "fast decode bypasses forward hooks",
        name_or_path,
        " CPU backend" if on_cpu else "",
        load_in_4bit,
    )
    return model, tokenizer
