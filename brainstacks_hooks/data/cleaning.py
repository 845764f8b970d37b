"""Removal of chat-template tokens leaked into training text, and row validation.

Instruction-tuned datasets often contain another model's template tokens (``<start_of_turn>``,
``<|im_start|>``, ``[INST]``...). Training on them teaches the model to emit foreign control tokens
(paper section 7.1, item 4), so every text field passes through :func:`strip_chat_tokens`.

Whitespace is normalised only in text that actually contained a template token: clean rows (for example
Python code whose indentation, blank lines and string literals matter) stay byte-identical.
"""

from __future__ import annotations

import re
from typing import Any

#: Literal template tokens removed by :func:`strip_chat_tokens` (matched case-insensitively, except
#: ``<s>``/``</s>``, which are matched in lower case only so that e.g. a generic ``<S>`` in code survives).
CHAT_TOKEN_PATTERNS: tuple[str, ...] = (
    # Gemma
    "<start_of_turn>", "<end_of_turn>", "<start_of_conversation>", "<end_of_conversation>",
    "<bos>", "<eos>", "<pad>", "<start_of_image>", "<end_of_image>",
    # Llama 2 / Llama 3
    "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
    "<|eom_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>", "<s>", "</s>",
    # ChatML / Phi / Zephyr / GPT-2 family
    "<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",
    "<|endoftext|>",
    # Mistral
    "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]",
    "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
)  # fmt: skip

#: Markers that are followed by a role name (``<start_of_turn>user\n``); the role word goes too.
_TURN_OPENERS: tuple[str, ...] = ("<start_of_turn>", "<|im_start|>", "<|start_header_id|>")
_ROLE_WORDS = ("user", "assistant", "system", "model", "human", "gpt", "tool", "ipython", "developer")
_CASE_SENSITIVE = frozenset({"<s>", "</s>"})


def _literal(token: str) -> str:
    escaped = re.escape(token)
    return f"(?-i:{escaped})" if token in _CASE_SENSITIVE else escaped


def _build_pattern() -> re.Pattern[str]:
    roles = "|".join(_ROLE_WORDS)
    openers = "|".join(re.escape(t) for t in _TURN_OPENERS)
    others = "|".join(
        _literal(t) for t in sorted(set(CHAT_TOKEN_PATTERNS) - set(_TURN_OPENERS), key=len, reverse=True)
    )
    opener = rf"(?:{openers})(?:[ \t]*(?:{roles})(?!\w)[ \t]*:?(?:[ \t]*\r?\n)?)?"
    return re.compile(rf"{opener}|{others}", re.IGNORECASE)


_TOKEN_RE = _build_pattern()
_MANY_NEWLINES = re.compile(r"\n{3,}")
_INNER_SPACES = re.compile(r"(?<=\S)[ \t]{2,}")


def strip_chat_tokens(text: str) -> str:
    """Remove chat-template tokens (and the role word after a turn opener) from ``text``.

    When something was removed, 3+ newlines are collapsed to 2, runs of spaces/tabs inside a line are
    collapsed to one space (leading indentation is kept) and the result is stripped. Text without any
    template token is returned unchanged.
    """
    cleaned, n = _TOKEN_RE.subn("", text)
    if n == 0:
        return text
    cleaned = _MANY_NEWLINES.sub("\n\n", cleaned)
    cleaned = _INNER_SPACES.sub(" ", cleaned)
    return cleaned.strip()


REQUIRED_FIELDS: tuple[str, ...] = ("instruction", "output")


def validate_row(row: Any, max_chars: int | None = None) -> str | None:
    """Return why ``row`` is unusable for SFT, or ``None`` when it is fine.

    Reasons: ``"wrong_type:row"``, ``"missing_field:<f>"``, ``"wrong_type:<f>"`` (``input`` may be
    missing or ``None``), ``"empty_instruction"``, ``"empty_output"``, and ``"overlong"`` when
    instruction + input + output exceed ``max_chars`` characters.
    """
    if not isinstance(row, dict):
        return "wrong_type:row"
    for field in REQUIRED_FIELDS:
        if field not in row or row[field] is None:
            return f"missing_field:{field}"
        if not isinstance(row[field], str):
            return f"wrong_type:{field}"
    inp = row.get("input")
    if inp is not None and not isinstance(inp, str):
        return "wrong_type:input"
    if not row["instruction"].strip():
        return "empty_instruction"
    if not row["output"].strip():
        return "empty_output"
    if max_chars is not None and len(row["instruction"]) + len(inp or "") + len(row["output"]) > max_chars:
        return "overlong"
    return None
