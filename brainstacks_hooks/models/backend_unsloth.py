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
_INSTALL_HINT = "pip install 'brainstacks-hooks[unsloth]'"


def check_unsloth_usable() -> None:
    """Raise :class:`BackendUnavailable` unless Unsloth is installed and a CUDA GPU is visible (no import)."""
    require_unsloth()
    if not torch.cuda.is_available():
        raise BackendUnavailable(
            f"the unsloth backend needs a CUDA GPU and none is available; use backend='hf' or 'bnb4' on this "
            f"machine (Unsloth: {_INSTALL_HINT} on a GPU machine)"
        )


def load_unsloth(
    name_or_path: str,
    *,
    dtype: torch.dtype | str | None = None,
    max_seq_length: int = 2048,
    revision: str | None = None,
    trust_remote_code: bool = False,
    load_in_4bit: bool = False,
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
        **kwargs: forwarded to ``FastLanguageModel.from_pretrained``.

    Raises:
        BackendUnavailable: Unsloth is not installed or no CUDA GPU is available.
        ConfigError: ``fast_inference=True`` (vLLM bypasses forward hooks).
    """
    check_unsloth_usable()
    if kwargs.get("fast_inference"):
        raise ConfigError("fast_inference=True (vLLM) bypasses forward hooks; Brainstacks cannot use it")
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
        "Loaded %s (unsloth, 4bit=%s). Generate with use_cache=False while stacks are active: Unsloth's "
        "fast decode bypasses forward hooks",
        name_or_path,
        load_in_4bit,
    )
    return model, tokenizer
