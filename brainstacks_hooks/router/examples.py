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
    """The router's examples (see :mod:`brainstacks_hooks.router.pipeline` for where each comes from).

    Attributes:
        oracle_train: Oracle examples for training (single-domain rows no stack trained on, then mixed).
        label_rows: Label-only rows per domain (features only; target = the source domain).
        test: Held-out single-domain test rows per trained domain (classification metrics).
        test_oracle: Test examples that also get the oracle and the loss table (single, then mixed).
        gap_rows: Test rows of domains without stacks (the gap signal).
        info: Counts for the report.
        row_ids: Row id of every single-domain oracle example (by example id).
    """

    oracle_train: list[OracleExample]
    label_rows: dict[str, list[dict[str, Any]]]
    test: dict[str, list[dict[str, Any]]]
    test_oracle: list[OracleExample]
    gap_rows: dict[str, list[dict[str, Any]]]
    info: dict[str, Any]
    row_ids: dict[str, str]


def _cap(rows: Sequence[dict[str, Any]], n: int | None, seed: int) -> list[dict[str, Any]]:
    return [rows[i] for i in seeded_sample_indices(len(rows), n, seed)]


def build_router_examples(
    cfg: Any,
    domains: Sequence[str],
    oracle_rows: Mapping[str, Sequence[dict[str, Any]]],
    label_pool: Mapping[str, Sequence[dict[str, Any]]],
    test_rows: Mapping[str, Sequence[dict[str, Any]]],
    tokenizer: Any = None,
) -> RouterExamples:
    """Sample the router's rows, build mixed prompts and keep every test prompt out of training.

    Args:
        cfg: The :class:`~.pipeline.RouterPipelineConfig`.
        domains: Domains with stacks (the router's outputs).
        oracle_rows: ``rows/router_train`` by domain (no stack trained on them).
        label_pool: ``rows/sft_train`` by domain (label-only rows are drawn from it).
        test_rows: ``rows/router_test`` by domain (trained domains and gap domains).

    Raises:
        DataError: a prompt ended up on both sides (a guard; unreachable by construction).
    """
    rc = cfg.router
    test = {d: _cap(test_rows.get(d, []), cfg.test_rows_per_domain, cfg.seed + 1) for d in domains}
    gap = {d: _cap(rows, cfg.test_rows_per_domain, cfg.seed + 1) for d, rows in test_rows.items() if d not in domains}
    test_keys = {_row_key(r) for rows in (*test.values(), *gap.values()) for r in rows}
    dropped = 0

    def unseen(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        nonlocal dropped
        kept = [r for r in rows if _row_key(r) not in test_keys]
        dropped += len(rows) - len(kept)
        return kept

    oracle_pool = {d: unseen(_cap(oracle_rows.get(d, []), cfg.oracle_rows_per_domain, cfg.seed)) for d in domains}
    labels = {d: unseen(_cap(label_pool.get(d, []), cfg.label_rows_per_domain, cfg.seed + 2)) for d in domains}
    oracle_keys = {_row_key(r) for rows in oracle_pool.values() for r in rows}
    labels = {d: [r for r in rows if _row_key(r) not in oracle_keys] for d, rows in labels.items()}
    if dropped:
        logger.info("dropped %d training rows whose prompt is also a test prompt", dropped)
    # a mixed prompt must fit the router's window and leave the oracle room for 16 answer tokens
    max_mixed = max(1, min(rc.seq_len, rc.oracle_max_length - 16))
    row_ids: dict[str, str] = {}

    def single(d: str, r: dict[str, Any]) -> OracleExample:
        e = _single_example(d, r)
        row_ids[e.example_id] = r["id"]
        return e

    train_single = [single(d, r) for d, rows in oracle_pool.items() for r in rows]
    train_mixed = build_mixed_examples(oracle_pool, cfg.mixed_pairs, cfg.seed, tokenizer, max_mixed)
    test_single_rows = {d: rows[: cfg.test_oracle_rows_per_domain] for d, rows in test.items()}
    test_single = [single(d, r) for d, rows in test_single_rows.items() for r in rows]
    test_mixed = build_mixed_examples(test, cfg.test_mixed_pairs, cfg.seed + 1, tokenizer, max_mixed)
    train_keys = ({prompt_key(_prompt_of(e)) for e in train_single + train_mixed}
                  | {_row_key(r) for rows in labels.values() for r in rows})
    both = train_keys & ({_row_key(r) for rows in (*test.values(), *gap.values()) for r in rows}
                         | {prompt_key(_prompt_of(e)) for e in test_mixed})
    if both:
        raise DataError(f"{len(both)} prompts on both sides of the router's train/test split")
    info = {
        "oracle_train_single": dict(Counter(e.domain for e in train_single)),
        "oracle_train_mixed": len(train_mixed),
        "label_only": {d: len(rows) for d, rows in labels.items()},
        "test": {d: len(rows) for d, rows in test.items()},
        "test_oracle_single": {d: len(rows) for d, rows in test_single_rows.items()},
        "test_oracle_mixed": len(test_mixed),
        "gap_test": {d: len(rows) for d, rows in gap.items()},
        "train_rows_dropped_as_test_prompts": dropped,
    }
    return RouterExamples(train_single + train_mixed, labels, test, test_single + test_mixed, gap, info, row_ids)
