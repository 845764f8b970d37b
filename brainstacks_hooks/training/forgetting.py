"""Forgetting matrix: every seen domain's validation loss in prefix, isolated and ungated modes.

``prefix(d)`` is the condition d was trained under, so its loss must reproduce the value recorded when d
finished, after any number of later domains (zero forgetting, measured). ``isolated`` and ``ungated``
show what each domain's stacks do alone and what all stacks firing together do (interference).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..loss import evaluate_loss
from ..stacks.brainstacks import BrainStacks

MODES = ("prefix", "isolated", "ungated")


def forgetting_row(
    stacks: BrainStacks,
    val_sets: dict[str, Sequence[dict[str, Any]]],
    pad_token_id: int,
    batch_size: int = 8,
    bf16: bool = False,
    modes: Sequence[str] = MODES,
    *,
    shard: bool = False,
) -> dict[str, dict[str, float]]:
    """``{domain: {mode: loss}}`` for every domain with frozen stacks and a validation set.

    Modes that resolve to the same stacks and weights for a domain (``prefix`` and ``isolated`` of the first
    domain, ``prefix`` and ``ungated`` of the last one) compute the same function, so they are evaluated once
    and share the loss. ``shard``: split each evaluation over the processes (``evaluate_loss``).
    """
    row: dict[str, dict[str, float]] = {}
    for domain in stacks.domains:
        if domain not in val_sets:
            continue
        row[domain] = {}
        seen: dict[tuple, float] = {}  # plan signature -> loss, for this domain's val set
        for mode in modes:
            with stacks.using(mode, None if mode == "ungated" else domain):
                key = stacks.plan.signature
                if key not in seen:
                    seen[key] = evaluate_loss(stacks.model, val_sets[domain], pad_token_id, batch_size, bf16,
                                              shard=shard)
                row[domain][mode] = seen[key]
    return row


def forgetting_summary(rows: list[dict[str, Any]], recorded: dict[str, float]) -> dict[str, Any]:
    """Zero-forgetting drift and backward transfer from the matrix rows.

    Args:
        rows: ``[{"after": domain, "losses": {domain: {mode: loss}}}, ...]`` in training order.
        recorded: each domain's prefix loss recorded when it finished.
    Returns:
        ``max_prefix_drift`` (max |prefix loss now - recorded| over domains and later rows: 0 means zero
        forgetting), and ``backward_transfer`` per mode: mean over earlier domains of
        (loss after the last domain - recorded loss); positive means the domain got worse.
    """
    drift = 0.0
    for row in rows:
        for d, losses in row["losses"].items():
            if d in recorded:
                drift = max(drift, abs(losses["prefix"] - recorded[d]))
    bwt: dict[str, float | None] = {}
    if rows:
        last = rows[-1]["losses"]
        earlier = [d for d in last if d in recorded and d != rows[-1]["after"]]
        for mode in MODES:
            vals = [last[d][mode] - recorded[d] for d in earlier if mode in last[d]]
            bwt[mode] = sum(vals) / len(vals) if vals else None
    return {"max_prefix_drift": drift, "backward_transfer": bwt}
