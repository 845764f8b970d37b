"""Data loading, cleaning, decontamination and the single prompt format of brainstacks_hooks."""

from __future__ import annotations

from .cleaning import CHAT_TOKEN_PATTERNS, strip_chat_tokens, validate_row
from .decontamination import (
    DEFAULT_KEYWORDS,
    DecontaminationConfig,
    DecontaminationReport,
    KeywordMatcher,
    decontaminate,
    detect_leak,
    keyword_scores,
)
from .formatting import (
    FALLBACK_TEMPLATE,
    IGNORE_INDEX,
    CompletionCollator,
    build_messages,
    encode_example,
    encode_prompt,
    format_prompt,
)
from .sources import (
    EVAL_BENCHMARKS,
    DataReport,
    HFSource,
    load_domain_rows,
    load_eval_questions,
    load_eval_rows,
    resolve_data_dir,
)

__all__ = [
    "CHAT_TOKEN_PATTERNS",
    "DEFAULT_KEYWORDS",
    "EVAL_BENCHMARKS",
    "FALLBACK_TEMPLATE",
    "IGNORE_INDEX",
    "CompletionCollator",
    "DataReport",
    "DecontaminationConfig",
    "DecontaminationReport",
    "HFSource",
    "KeywordMatcher",
    "build_messages",
    "decontaminate",
    "detect_leak",
    "encode_example",
    "encode_prompt",
    "format_prompt",
    "keyword_scores",
    "load_domain_rows",
    "load_eval_questions",
    "load_eval_rows",
    "resolve_data_dir",
    "strip_chat_tokens",
    "validate_row",
]
