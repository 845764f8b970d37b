"""The router's loss table (paper 5.3): per-domain completion loss in prefix, ungated, routed and base modes.

Losses come from the one evaluator (:mod:`brainstacks_hooks.loss`); every mode is evaluated one example at a
time, so all modes see identical shapes. With ``shard=True`` under several processes the examples are dealt out
(:func:`~brainstacks_hooks.utils.distributed.map_sharded`) and gathered back in order before the sums.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from ..loss import completion_nll
from ..utils import distributed
from .gating import Route
from .metrics import recovered_fraction

#: Modes of the loss table; ``isolated`` is the prompt's own domain's stacks alone, ``oracle`` the best route
#: per example (from the oracle, run at its executed weights).
LOSS_MODES = ("prefix", "isolated", "ungated", "routed", "base")


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
    oracle_losses: Mapping[str, Sequence[float | None]] | None = None,
    shard: bool = False,
) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, float]]]]:
    """Per-domain token-weighted completion loss in every mode of :data:`LOSS_MODES` (and the oracle's).

    Args:
        stacks: The :class:`BrainStacks`.
        val_examples: Encoded examples per domain (``input_ids``, ``labels``).
        routes: The route of each example, aligned with ``val_examples``.
        bf16: bf16 autocast.
        progress: tqdm bar over domains' examples.
        oracle_losses: The oracle's best-route loss (token mean) of each example, aligned with ``val_examples``.
        shard: Split the examples over the processes of ``torch.distributed`` (collective: every process calls
            it with the same examples and routes, and gets the same table); a no-op in a single process.

    Returns:
        ``(table, per_example)``: ``table[d]`` has ``n_examples``, ``n_tokens``, one loss per mode, ``oracle``
        and ``recovered_fraction`` = ``(ungated - routed) / (ungated - oracle)``; ``per_example[d][i]`` the
        per-mode mean losses of example ``i``.
    """
    table: dict[str, dict[str, Any]] = {}
    per_example: dict[str, list[dict[str, float]]] = {}
    model = stacks.model
    items = [(d, i) for d, exs in val_examples.items() for i in range(min(len(exs), len(routes[d])))]
    shard = shard and distributed.world_size() > 1
    total = len(distributed.shard_of(items)) if shard else sum(len(v) for v in val_examples.values())
    bar = tqdm(total=total, desc="router loss table", disable=not progress)

    def measure(item: tuple[str, int]) -> tuple[dict[str, float], int]:
        """Summed NLL of one example in every mode, and its completion-token count."""
        d, i = item
        ex, route = val_examples[d][i], routes[d][i]
        summed: dict[str, float] = {}
        c = 0
        seen: dict[tuple, tuple[float, int]] = {}  # modes computing the same function share one forward
        for mode in LOSS_MODES:
            if mode in ("prefix", "isolated"):
                ctx = stacks.using(mode, d)
            elif mode == "routed":
                ctx = stacks.routed(route.weights)
            else:
                ctx = stacks.ungated() if mode == "ungated" else stacks.base_only()
            with ctx:
                key = stacks.plan.signature
                if key not in seen:
                    seen[key] = example_nll(model, ex, bf16)
                summed[mode], c = seen[key]
        bar.update(1)
        return summed, c

    measured = iter(distributed.map_sharded(measure, items) if shard else (measure(x) for x in items))
    for d, exs in val_examples.items():
        sums = dict.fromkeys((*LOSS_MODES, "oracle"), 0.0)
        n_tok = n_oracle_tok = 0
        rows = []
        for i in range(min(len(exs), len(routes[d]))):
            summed, c = next(measured)
            row: dict[str, float] = {}
            for mode in LOSS_MODES:
                sums[mode] += summed[mode]
                row[mode] = summed[mode] / max(c, 1)
            o = oracle_losses[d][i] if oracle_losses is not None else None
            if o is not None:
                row["oracle"] = float(o)
                sums["oracle"] += float(o) * c
                n_oracle_tok += c
            n_tok += c
            rows.append(row)
        losses = {m: sums[m] / max(n_tok, 1) for m in LOSS_MODES}
        oracle = sums["oracle"] / n_oracle_tok if n_oracle_tok == n_tok and n_tok else None
        table[d] = {"n_examples": len(exs), "n_tokens": n_tok, **losses, "oracle": oracle,
                    "recovered_fraction": None if oracle is None else
                    recovered_fraction(oracle, losses["ungated"], losses["routed"])}
        per_example[d] = rows
    bar.close()
    return table, per_example
