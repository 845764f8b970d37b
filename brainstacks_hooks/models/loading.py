"""One entry point to load a base model and tokenizer through a named backend.

Backends: ``"hf"`` (plain transformers), ``"bnb4"`` (bitsandbytes NF4), ``"unsloth"`` (GPU; its CPU backend
only with ``allow_cpu=True``, for plumbing tests). The name
``"smollm2-135m-instruct"`` (or ``"smollm2"``) selects the embedded model, converted once from its GGUF
into the cache directory (see :mod:`brainstacks_hooks.models.embedded`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..constants import EMBEDDED_MODEL_NAME
from ..errors import ConfigError
from ..utils.dtypes import parse_dtype
from ..utils.import_utils import require_bitsandbytes
from ..utils.logging import get_logger

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = get_logger(__name__)

#: Backend names accepted by :func:`load_base_model`.
BACKENDS: tuple[str, ...] = ("hf", "bnb4", "unsloth")

def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """Map a dtype name (``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"`` and short forms) to a dtype.

    ``None`` and torch dtypes pass through; ``"auto"`` stays the string ``"auto"``.

    Raises:
        ConfigError: an unknown name or type.
    """
    if dtype is None:
        return None
    if not isinstance(dtype, (str, torch.dtype)):
        raise ConfigError(f"unknown dtype {dtype!r}; give a name such as 'bfloat16' or a torch.dtype")
    return parse_dtype(dtype, allow_auto=True)


def resolve_model_path(name_or_path: str) -> str:
    """Return a loadable path: the converted embedded model folder for its name, else ``name_or_path``."""
    from .embedded import embedded_model_path, is_embedded_model_name

    return str(embedded_model_path()) if is_embedded_model_name(name_or_path) else str(name_or_path)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token (its eos token when missing) and right padding; returns it."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError("tokenizer has neither a pad token nor an eos token to use as padding")
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("Tokenizer has no pad token; using eos %r", tokenizer.eos_token)
    tokenizer.padding_side = "right"
    return tokenizer


def _backend_loader(backend: str, allow_cpu: bool = False) -> Callable[..., tuple[Any, Any]]:
    """The backend's loader, after a cheap availability check (before any model conversion/download)."""
    if backend == "hf":
        from .backend_hf import load_hf

        return load_hf
    if backend == "bnb4":
        from .backend_bnb import load_bnb4

        require_bitsandbytes()
        return load_bnb4
    if backend == "unsloth":
        from .backend_unsloth import check_unsloth_usable, load_unsloth

        check_unsloth_usable(allow_cpu)
        return load_unsloth
    raise ConfigError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")


def load_base_model(
    name_or_path: str = EMBEDDED_MODEL_NAME,
    backend: str = "hf",
    dtype: str | torch.dtype | None = None,
    device_map: Any = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    max_seq_length: int = 2048,
    **kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a base causal LM and its tokenizer through ``backend``.

    Args:
        name_or_path: Hub id, local folder, or ``"smollm2-135m-instruct"`` / ``"smollm2"`` for the embedded
            model (converted from GGUF on first use; ``revision`` is ignored for it).
        backend: ``"hf"``, ``"bnb4"`` or ``"unsloth"``.
        dtype: ``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"``, a torch dtype, or ``None`` (the
            backend's default: checkpoint dtype for hf; bf16 on GPU / fp32 on CPU for bnb4; Unsloth's choice).
        device_map: passed to transformers (hf/bnb4) or Unsloth; ``None`` means the backend's default.
        revision: Hub revision (branch, tag or commit).
        trust_remote_code: allow custom modelling code from the Hub.
        max_seq_length: used by the unsloth backend (RoPE caches); ignored by hf and bnb4.
        **kwargs: forwarded to the backend loader, then to ``from_pretrained``. The unsloth backend also takes
            ``allow_cpu=True``: accept Unsloth's CPU backend on a machine without CUDA (plumbing tests only;
            ``BRAINSTACKS_UNSLOTH_CPU=1`` does the same).

    Returns:
        ``(model, tokenizer)``. The tokenizer has a pad token and ``padding_side="right"``; the model carries
        ``model._brainstacks_source = {"name_or_path", "revision", "backend"}`` for fingerprints.

    Raises:
        ConfigError: unknown backend or dtype, or ``allow_cpu`` with a backend other than unsloth.
        BackendUnavailable: the backend's optional dependency (or GPU) is missing.
    """
    backend = str(backend).strip().lower()
    allow_cpu = bool(kwargs.pop("allow_cpu", False))
    if allow_cpu and backend != "unsloth":
        raise ConfigError(f"allow_cpu applies to backend='unsloth' only (got backend={backend!r})")
    loader = _backend_loader(backend, allow_cpu)
    resolved_dtype = resolve_dtype(dtype)
    from .embedded import is_embedded_model_name

    embedded = is_embedded_model_name(name_or_path)
    if embedded and revision is not None:
        logger.warning("revision=%r ignored for the embedded model", revision)
        revision = None
    path = resolve_model_path(name_or_path)
    if backend == "unsloth":
        kwargs["max_seq_length"] = max_seq_length
        kwargs["allow_cpu"] = allow_cpu
    if device_map is not None:
        kwargs["device_map"] = device_map
    model, tokenizer = loader(
        path, dtype=resolved_dtype, revision=revision, trust_remote_code=trust_remote_code, **kwargs
    )
    model._brainstacks_source = {
        "name_or_path": EMBEDDED_MODEL_NAME if embedded else str(name_or_path),
        "revision": revision,
        "backend": backend,
    }
    return model, prepare_tokenizer(tokenizer)
