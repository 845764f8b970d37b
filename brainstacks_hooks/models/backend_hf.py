"""Plain transformers backend: ``AutoModelForCausalLM.from_pretrained`` on CPU or GPU."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..utils.logging import get_logger

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = get_logger(__name__)


def load_tokenizer(
    name_or_path: str, revision: str | None = None, trust_remote_code: bool = False, **kwargs: Any
) -> PreTrainedTokenizerBase:
    """Load the tokenizer of ``name_or_path`` with ``AutoTokenizer`` (no pad-token fix-up here)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code, **kwargs)


def load_hf(
    name_or_path: str,
    *,
    dtype: torch.dtype | str | None = None,
    device_map: Any = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer with plain transformers.

    Args:
        name_or_path: Hub id or local folder.
        dtype: a torch dtype or ``"auto"`` (the checkpoint's dtype); ``None`` means ``"auto"``.
        device_map: passed to ``from_pretrained`` when given (e.g. ``"auto"``, ``"cuda"``, ``{"": 0}``);
            ``None`` loads on the CPU.
        revision: Hub revision (branch, tag or commit).
        trust_remote_code: allow custom modelling code from the Hub.
        **kwargs: forwarded to ``AutoModelForCausalLM.from_pretrained``.
    """
    from transformers import AutoModelForCausalLM

    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path,
        dtype="auto" if dtype is None else dtype,
        revision=revision,
        trust_remote_code=trust_remote_code,
        **kwargs,
    )
    logger.info("Loaded %s (hf, %s, %s)", name_or_path, model.dtype, model.device)
    return model, load_tokenizer(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
