"""bitsandbytes 4-bit backend (NF4, double quantization) and the Trainer validator guard.

bitsandbytes >= 0.45 runs ``Linear4bit`` NF4 on the CPU too, so ``device_map="cpu"`` works for tests and
small models (quantizing at load time is slow on CPU: ~10 s for the 135M embedded model on 2 cores).
Read projection sizes from ``Linear4bit.in_features`` / ``out_features``, never from ``weight.shape``
(the weight is a packed ``uint8`` tensor).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from ..utils.import_utils import is_peft_available, require_bitsandbytes
from ..utils.logging import get_logger
from .backend_hf import load_tokenizer

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = get_logger(__name__)

_VALIDATOR_NAME = "validate_quantization_for_training"
#: Where HF Trainer finds the validator: defined in ``transformers.trainer_utils`` and imported by name into
#: ``transformers.trainer`` (``Trainer.__init__`` calls the ``transformers.trainer`` global).
_VALIDATOR_MODULES = ("transformers.trainer_utils", "transformers.trainer")


def default_compute_dtype() -> torch.dtype:
    """bfloat16 on a CUDA GPU, float32 on the CPU."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def bnb4_quantization_config(
    compute_dtype: torch.dtype | None = None, double_quant: bool = True, quant_type: str = "nf4"
) -> BitsAndBytesConfig:
    """The ``BitsAndBytesConfig`` used by the ``bnb4`` backend (NF4 + double quantization by default)."""
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype or default_compute_dtype(),
    )


def load_bnb4(
    name_or_path: str,
    *,
    dtype: torch.dtype | str | None = None,
    device_map: Any = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    double_quant: bool = True,
    quant_type: str = "nf4",
    **kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM with its projections quantized to 4 bits by bitsandbytes.

    Args:
        name_or_path: Hub id or local folder.
        dtype: compute dtype of the 4-bit layers and dtype of the non-quantized parts (embeddings, norms,
            head). ``None`` or ``"auto"``: bfloat16 on CUDA, float32 on CPU.
        device_map: defaults to ``{"": current CUDA device}`` with a GPU and ``"cpu"`` without.
        revision, trust_remote_code: as in transformers.
        double_quant, quant_type: bitsandbytes options (``"nf4"`` or ``"fp4"``).
        **kwargs: forwarded to ``from_pretrained``; a ``quantization_config`` here replaces the default.

    Raises:
        BackendUnavailable: bitsandbytes is not installed.
    """
    require_bitsandbytes()
    from transformers import AutoModelForCausalLM

    compute_dtype = dtype if isinstance(dtype, torch.dtype) else default_compute_dtype()
    if device_map is None:
        device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"
    quantization_config = kwargs.pop("quantization_config", None) or bnb4_quantization_config(
        compute_dtype, double_quant=double_quant, quant_type=quant_type
    )
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path,
        quantization_config=quantization_config,
        dtype=compute_dtype,
        device_map=device_map,
        revision=revision,
        trust_remote_code=trust_remote_code,
        **kwargs,
    )
    logger.info("Loaded %s (bnb4 %s, compute %s, %s)", name_or_path, quant_type, compute_dtype, model.device)
    return model, load_tokenizer(name_or_path, revision=revision, trust_remote_code=trust_remote_code)


def _check_hook_model(model: Any) -> None:
    """The checks of ``validate_quantization_for_training`` that still apply to a hook-adapted model."""
    if hasattr(model, "_orig_mod"):
        raise ValueError("Cannot fine-tune a torch.compile()d quantized model; pass the non-compiled model")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not getattr(quantizer, "is_trainable", False):
        method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", "?")
        raise ValueError(f"Quantization method {method} does not support training")


@contextlib.contextmanager
def allow_hook_adapter_training(model: Any) -> Iterator[None]:
    """Let HF ``Trainer`` (and TRL trainers) be constructed on a quantized base trained via Brainstacks hooks.

    ``Trainer.__init__`` calls ``transformers.trainer_utils.validate_quantization_for_training``, which
    refuses a quantized model without PEFT adapters ("You cannot perform fine-tuning on purely quantized
    models"). Brainstacks' trainable parameters live in stack modules attached by forward hooks, which that
    check cannot see. Inside this context the validator is wrapped so that, **for this exact model object
    only**, and only if it carries ``model._brainstacks_attached = True``, the PEFT requirement is skipped
    (the compiled-model and non-trainable-quantizer checks still run). Every other model goes through the
    original validator. The wrapper is installed in ``transformers.trainer_utils``, ``transformers.trainer``
    and any other loaded module that imported the validator by name (e.g. Unsloth's generated trainers), and
    the previous functions are restored on exit. ``_hf_peft_config_loaded`` is deliberately *not* set,
    because it also changes saving and gradient-checkpointing behaviour.

    Models without ``_brainstacks_attached`` are left to the normal check (the context does nothing).
    Use it around trainer construction only; it is not thread-safe against concurrent patching.

    Example:
        >>> with allow_hook_adapter_training(model):
        ...     trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds)
    """
    if not getattr(model, "_brainstacks_attached", False):
        logger.debug("allow_hook_adapter_training: model has no brainstacks hooks; validator left as is")
        yield
        return
    for name in _VALIDATOR_MODULES:
        importlib.import_module(name)
    original = vars(sys.modules["transformers.trainer_utils"]).get(_VALIDATOR_NAME)

    def wrap(previous: Callable[[Any], None]) -> Callable[[Any], None]:
        @functools.wraps(previous)
        def validator(candidate: Any) -> None:
            if candidate is model:
                _check_hook_model(candidate)
                return
            previous(candidate)

        return validator

    patched = []
    for name, module in list(sys.modules.items()):
        previous = vars(module).get(_VALIDATOR_NAME) if hasattr(module, "__dict__") else None
        if callable(previous) and (name in _VALIDATOR_MODULES or previous is original):
            wrapper = wrap(previous)
            setattr(module, _VALIDATOR_NAME, wrapper)
            patched.append((module, previous, wrapper))
    logger.debug("Wrapped %s in %s", _VALIDATOR_NAME, [m.__name__ for m, _, _ in patched])
    try:
        yield
    finally:
        for module, previous, wrapper in reversed(patched):
            if vars(module).get(_VALIDATOR_NAME) is wrapper:
                setattr(module, _VALIDATOR_NAME, previous)
            else:
                logger.warning("%s.%s was replaced inside the context; not restoring", module.__name__, _VALIDATOR_NAME)


#: Cached availability checks that a hidden bitsandbytes could have answered with False.
_BNB_AVAILABILITY_CHECKS = (("transformers.utils.import_utils", "is_bitsandbytes_available"),
                            ("peft.import_utils", "is_bnb_available"), ("peft.import_utils", "is_bnb_4bit_available"))


def import_peft_without_bitsandbytes() -> None:
    """Import peft, when it is installed, without letting it import bitsandbytes.

    ``transformers.trainer_utils`` (so every HF/TRL trainer) imports peft whenever it is installed (the ``dev``
    and ``eval`` extras install it), and peft imports bitsandbytes whenever *that* is installed
    (``peft.helpers``), which on a CPU prints bitsandbytes' "Failed to load CPU gemm_4bit_forward" warning
    even when no model is quantized. Called before the trainer stack is imported, this keeps bitsandbytes out
    of ``sys.modules`` until the ``bnb4`` backend (or peft's bnb layers) import it; it stays fully importable.
    The one trace left: ``peft.helpers.bnb`` is ``None`` (peft's adapter-rescaling helper for bnb layers,
    which Brainstacks does not use). Does nothing when peft is missing or peft or bitsandbytes is imported.
    """
    if "peft" in sys.modules or "bitsandbytes" in sys.modules or not is_peft_available():
        return
    sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # `import bitsandbytes` raises ImportError
    try:
        importlib.import_module("peft")
    finally:
        if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
            del sys.modules["bitsandbytes"]
        for module, name in _BNB_AVAILABILITY_CHECKS:
            cache_clear = getattr(getattr(sys.modules.get(module), name, None), "cache_clear", None)
            if cache_clear is not None:
                cache_clear()
