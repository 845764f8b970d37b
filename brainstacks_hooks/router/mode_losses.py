"""The router's loss table (paper 5.3): per-domain completion loss in prefix, ungated, routed and base modes.

Losses come from the one evaluator (:mod:`brainstacks_hooks.loss`); every mode is evaluated one example at a
time, so all modes see identical shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from ..loss import completion_nll
from .gating import Route
from .metrics import recovered_fraction

LOSS_MODES = ("prefix", "ungated", "routed", "base")


def example_nll(model: Any, example: Mapping[str, Any], bf16: bool) -> tuple[float, int]:
    """Summed completion NLL and completion-token count of one encoded example, in the stacks' current mode."""
    pad = int(example["input_ids"][0])  # a batch of one is never padded
    sums, counts = completion_nll(model, [dict(example)], pad, batch_size=1, bf16=bf16)
    return float(sums[0]), int(counts[0])


def evaluate_val_losses(
    stacks: Any,
    val_examples: Mapping[str, Sequence[Mapping[str, Any]]],
    routes: Mapping[str, Sequence[Route]],
    bf16: bool,
    progress: bool = True,
) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, float]]]]:
    """Per-domain token-weighted completion loss in prefix, ungated, routed and base modes.

    Args:
        stacks: The :class:`BrainStacks`.
        val_examples: Encoded validation examples per domain (``input_ids``, ``labels``).
        routes: The route of each example, aligned with ``val_examples``.
        bf16: bf16 autocast.
        progress: tqdm bar over domains' examples.

    Returns:
        ``(table, per_example)``: ``table[d]`` has ``n_examples``, ``n_tokens``, one loss per mode and
        ``recovered_fraction``; ``per_example[d][i]`` the per-mode mean losses of example ``i``.
    """
    table: dict[str, dict[str, Any]] = {}
    per_example: dict[str, list[dict[str, float]]] = {}
    model = stacks.model
    total = sum(len(v) for v in val_examples.values())
    bar = tqdm(total=total, desc="router eval losses", disable=not progress)
    for d, exs in val_examples.items():
        sums = dict.fromkeys(LOSS_MODES, 0.0)
        n_tok = 0
        rows = []
        for ex, route in zip(exs, routes[d]):
            row: dict[str, float] = {}
            for mode in LOSS_MODES:
                if mode == "prefix":
                    ctx = stacks.prefix(d)
                elif mode == "ungated":
                    ctx = stacks.ungated()
                elif mode == "routed":
                    ctx = stacks.routed(route.weights)
                else:
                    ctx = stacks.base_only()
                with ctx:
                    s, c = example_nll(model, ex, bf16)
                sums[mode] += s
                row[mode] = s / max(c, 1)
            n_tok += c
            rows.append(row)
            bar.update(1)
        losses = {m: sums[m] / max(n_tok, 1) for m in LOSS_MODES}
        table[d] = {"n_examples": len(exs), "n_tokens": n_tok, **losses,
                    "recovered_fraction": recovered_fraction(losses["prefix"], losses["ungated"], losses["routed"])}
        per_example[d] = rows
    bar.close()
    return table, per_example
