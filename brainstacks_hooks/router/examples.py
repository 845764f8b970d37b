"""The router's examples: single-domain rows, synthetic mixed prompts, and the train/validation split.

Rows come from the run directory (``rows/sft_train.jsonl`` and ``rows/sft_val.jsonl``, exactly the rows SFT
used after cleaning); the rules for sampling and for the mixed prompts are in
:mod:`brainstacks_hooks.router.pipeline`.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..data.formatting import build_messages, encode_prompt
from ..errors import DataError
from ..utils.logging import get_logger
from ..utils.seeding import seeded_sample_indices
from .oracle import OracleExample
from .train import prompt_key

logger = get_logger(__name__)

#: Source-domain tag of synthetic mixed examples (their oracle cache file and analysis group).
MIXED_SOURCE = "_mixed"


def user_text(instruction: str, input: str = "") -> str:
    """The user turn of a prompt (instruction, then input after a blank line): the router's prompt key."""
    return build_messages(instruction, input)[-1]["content"]


def _row_key(row: Mapping[str, Any]) -> str:
    return prompt_key(user_text(row["instruction"], row.get("input", "") or ""))


def build_mixed_examples(
    pools: Mapping[str, Sequence[Mapping[str, Any]]],
    n_pairs: int,
    seed: int,
    tokenizer: Any = None,
    max_prompt_tokens: int | None = None,
    max_draws: int = 20,
) -> list[OracleExample]:
    """Deterministic synthetic two-domain examples (rules in the module docstring).

    Args:
        pools: Rows (``instruction``, ``input``, ``output``) per domain, in domain order.
        n_pairs: Number of mixed examples wanted (fewer when draws keep failing).
        seed: Seed of the row draws.
        tokenizer, max_prompt_tokens: When both are given, joined prompts longer than this many tokens
            (as :func:`encode_prompt` renders them) are redrawn.
        max_draws: Draws per pair before it is given up.

    Returns:
        :class:`OracleExample` list with source ``MIXED_SOURCE`` and labels ``(a, b)``.
    """
    domains = [d for d, rows in pools.items() if rows]
    pairs = list(itertools.combinations(domains, 2))
    if not pairs or n_pairs <= 0:
        return []
    rng = random.Random(seed)
    out: list[OracleExample] = []
    seen: set[str] = set()
    for k in range(n_pairs):
        a, b = pairs[k % len(pairs)]
        if (k // len(pairs)) % 2:
            a, b = b, a
        for _ in range(max_draws):
            ra, rb = rng.choice(list(pools[a])), rng.choice(list(pools[b]))
            instruction = f"{user_text(ra['instruction'], ra.get('input', ''))}\n\n" \
                          f"{user_text(rb['instruction'], rb.get('input', ''))}"
            if prompt_key(instruction) in seen:
                continue
            if tokenizer is not None and max_prompt_tokens is not None:
                if len(encode_prompt(tokenizer, instruction)["input_ids"]) > max_prompt_tokens:
                    continue
            seen.add(prompt_key(instruction))
            output = f"{ra['output']}\n\n{rb['output']}"
            out.append(OracleExample.make(MIXED_SOURCE, instruction, "", output, labels=(a, b)))
            break
        else:
            logger.warning("mixed pair %d (%s+%s): no short enough unique prompt in %d draws", k, a, b, max_draws)
    return out


def _single_example(domain: str, row: Mapping[str, Any]) -> OracleExample:
    return OracleExample.make(domain, row["instruction"], row.get("input", "") or "", row["output"])


def _prompt_of(e: OracleExample) -> str:
    return user_text(e.instruction, e.input)


@dataclass
class RouterExamples:
    """The router's examples, split by prompt (see the module docstring).

    Attributes:
        train: Training oracle examples (single-domain, then mixed).
        val: Validation oracle examples (single-domain, then mixed).
        val_rows: The validation rows per domain (with their ``"encoded"`` SFT example) for the loss table.
        info: Counts for the report.
    """

    train: list[OracleExample]
    val: list[OracleExample]
    val_rows: dict[str, list[dict[str, Any]]]
    info: dict[str, Any]


def build_router_examples(
    cfg: Any,
    domains: Sequence[str],
    train_rows: Mapping[str, Sequence[dict[str, Any]]],
    val_rows: Mapping[str, Sequence[dict[str, Any]]],
    tokenizer: Any = None,
) -> RouterExamples:
    """Sample single-domain rows, build mixed prompts and keep every validation prompt out of training.

    Raises:
        DataError: a prompt ended up on both sides (a guard; unreachable by construction).
    """
    rc = cfg.router
    val_sel = {d: [val_rows[d][i] for i in seeded_sample_indices(len(val_rows[d]), cfg.val_samples_per_domain,
                                                                 cfg.seed + 1)]
               for d in domains if d in val_rows}
    val_keys = {_row_key(r) for rows in val_sel.values() for r in rows}
    n_overlap = 0
    train_pool: dict[str, list[dict[str, Any]]] = {}
    for d in domains:
        rows = [r for r in train_rows.get(d, []) if _row_key(r) not in val_keys]
        n_overlap += len(train_rows.get(d, [])) - len(rows)
        train_pool[d] = rows
    if n_overlap:
        logger.info("dropped %d train rows whose prompt is also a validation prompt", n_overlap)
    train_single = [_single_example(d, rows[i]) for d, rows in train_pool.items()
                    for i in seeded_sample_indices(len(rows), cfg.train_samples, cfg.seed)]
    val_single = [_single_example(d, r) for d, rows in val_sel.items() for r in rows]
    # a mixed prompt must fit the router's window and leave the oracle room for 16 answer tokens
    max_mixed = max(1, min(rc.seq_len, rc.oracle_max_length - 16))
    train_mixed = build_mixed_examples(train_pool, cfg.mixed_pairs, cfg.seed, tokenizer, max_mixed)
    val_mixed = build_mixed_examples(val_sel, cfg.val_mixed_pairs, cfg.seed + 1, tokenizer, max_mixed)
    train, val = train_single + train_mixed, val_single + val_mixed
    both = {prompt_key(_prompt_of(e)) for e in train} & {prompt_key(_prompt_of(e)) for e in val}
    if both:
        raise DataError(f"{len(both)} prompts on both sides of the router split")
    info = {
        "oracle_train_single": dict(Counter(e.domain for e in train_single)),
        "oracle_train_mixed": len(train_mixed),
        "val_single": {d: len(rows) for d, rows in val_sel.items()},
        "val_mixed": len(val_mixed),
        "train_rows_dropped_as_val_prompts": n_overlap,
    }
    return RouterExamples(train, val, val_sel, info)
