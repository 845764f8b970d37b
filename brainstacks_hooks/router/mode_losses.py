"""The router's loss table (paper 5.3): per-domain completion loss in prefix, ungated, routed and base modes.

Losses come from the one evaluator (:mod:`brainstacks_hooks.loss`); every mode is evaluated one example at a
time, so all modes see identical shapes. With ``shard=True`` under several processes the examples are dealt out
(:func:`~brainstacks_hooks.utils.distributed.map_sharded`) and gathered back in order before the sums.

**The oracle, cross-fitted** (:func:`cross_fitted_oracle_nll`). The ``oracle`` column picks each example's best
route on that example's own answer tokens and scores it on the same tokens: the smallest of ``2^domains`` noisy
numbers, biased low even where the routes are equally good. ``oracle_cross_fitted`` picks the route by the oracle's
rule on half of the answer tokens (even / odd positions) and scores it on the other half, both ways round. It is a
reference, not a bound: the pick sees the interleaved neighbours of the tokens it is scored on (information a
prompt-only router never has), and it picks on half the tokens (noisier). ``recovered_cross_fitted`` is routing's
share of the gap to it (``None``: ungated is not worse, or it was not computed); a small gap makes the ratio large
and unstable, so read it next to the losses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..loss import autocast_context, completion_nll, completion_token_nll, eval_mode
from ..utils import distributed
from .gating import Route
from .metrics import recovered_fraction
from .oracle import all_route_keys, decide, executed_weights, parse_route_key, route_key

#: Modes of the loss table; ``isolated`` is the prompt's own domain's stacks alone, ``oracle`` the best route
#: per example (from the oracle, run at its executed weights).
LOSS_MODES = ("prefix", "isolated", "ungated", "routed", "base")


def example_nll(model: Any, example: Mapping[str, Any], bf16: bool) -> tuple[float, int]:
    """Summed completion NLL and completion-token count of one encoded example, in the stacks' current mode."""
    pad = int(example["input_ids"][0])  # a batch of one is never padded
    sums, counts = completion_nll(model, [dict(example)], pad, batch_size=1, bf16=bf16)
    return float(sums[0]), int(counts[0])


def route_token_nll(stacks: Any, example: Mapping[str, Any], labels: Sequence[str], config: Any,
                    bf16: bool) -> tuple[list[str], torch.Tensor]:
    """Per-token NLL of one example's answer under every candidate route of the oracle.

    Every route runs at the weights the oracle executes (:func:`~.oracle.executed_weights` with the example's
    ``labels``), in mixed-route forwards of at most ``config.oracle_batch_size`` rows (one row per route; the
    oracle's own forwards batch other rows together, so under bf16 the two differ by rounding).

    Args:
        stacks: The :class:`BrainStacks` (frozen stacks of every domain).
        example: One encoded example (``input_ids``, ``labels``).
        labels: The example's label domains (its source domain for a single-domain row).
        config: The oracle's :class:`~.config.RouterConfig` (threshold, chat floor, gate, blend).
        bf16: bf16 autocast.

    Returns:
        ``(route keys, nll [R, K] float64 on the CPU)``: ``R = 2^domains`` routes, ``K`` the answer's tokens.
    """
    domains = list(stacks.domains)
    keys = all_route_keys(domains)
    weights = [executed_weights(parse_route_key(k), domains, config, labels) for k in keys]
    model = stacks.model
    device = next(model.parameters()).device
    step = max(1, int(config.oracle_batch_size))
    parts = []
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(keys), step):
            chunk = weights[start : start + step]
            ids = torch.tensor([list(example["input_ids"])] * len(chunk), device=device)  # [b, L]: a row per route
            targets = torch.tensor([list(example["labels"])] * len(chunk), device=device)  # [b, L]
            with stacks.routed_rows(chunk), autocast_context(model, bf16):
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
            nll, _ = completion_token_nll(logits, targets)  # [b * K], row-major (the rows are identical)
            parts.append(nll.double().cpu().reshape(len(chunk), nll.numel() // len(chunk)))  # [b, K]
    return keys, torch.cat(parts)  # [R, K]


def cross_fitted_nll(nll: torch.Tensor, keys: Sequence[str], choose: Callable[[dict[str, float]], str]) -> float:
    """Summed NLL of the route ``choose`` picks from one half of the tokens' mean losses, scored on the other half.

    ``nll [R, K]`` (rows in the order of ``keys``) is split by token parity; ``choose({key: mean loss})`` picks a
    route on the even tokens, scored on the odd ones, and the other way round.

    Raises:
        ValueError: fewer than 2 tokens (one half would be empty).
    """
    if nll.shape[1] < 2:
        raise ValueError(f"cross-fitting needs at least 2 tokens, got {nll.shape[1]}")
    even = torch.arange(nll.shape[1]) % 2 == 0  # [K]
    total = 0.0
    for pick_on, score_on in ((even, ~even), (~even, even)):
        pick = choose({k: float(nll[j, pick_on].mean()) for j, k in enumerate(keys)})
        total += float(nll[list(keys).index(pick), score_on].sum())
    return total


def cross_fitted_oracle_nll(stacks: Any, example: Mapping[str, Any], labels: Sequence[str], config: Any,
                            bf16: bool) -> float | None:
    """Summed NLL of the oracle's route (:func:`~.oracle.decide`) picked on the other half of the example's
    answer tokens (:func:`route_token_nll`, :func:`cross_fitted_nll`); ``None`` for fewer than 2 answer tokens."""
    domains = list(stacks.domains)
    keys, nll = route_token_nll(stacks, example, labels, config, bf16)
    if nll.shape[1] < 2:
        return None
    return cross_fitted_nll(nll, keys, lambda table: route_key(decide(table, domains, config, labels).route, domains))


def evaluate_val_losses(
    stacks: Any,
    val_examples: Mapping[str, Sequence[Mapping[str, Any]]],
    routes: Mapping[str, Sequence[Route]],
    bf16: bool,
    progress: bool = True,
    oracle_losses: Mapping[str, Sequence[float | None]] | None = None,
    shard: bool = False,
    oracle_config: Any = None,
    oracle_labels: Mapping[str, Sequence[Sequence[str]]] | None = None,
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
        oracle_config: The oracle's :class:`~.config.RouterConfig`: adds the cross-fitted oracle (module
            docstring; one row per route and example, ``oracle_batch_size`` rows a forward).
        oracle_labels: Each example's label domains, aligned with ``val_examples`` (default: its domain).

    Returns:
        ``(table, per_example)``: ``table[d]`` has ``n_examples``, ``n_tokens``, one loss per mode, ``oracle``
        and ``recovered_fraction`` = ``(ungated - routed) / (ungated - oracle)`` (with ``oracle_config`` also
        ``oracle_cross_fitted`` and ``recovered_cross_fitted``); ``per_example[d][i]`` the per-mode mean losses
        of example ``i``.
    """
    table: dict[str, dict[str, Any]] = {}
    per_example: dict[str, list[dict[str, float]]] = {}
    model = stacks.model
    items = [(d, i) for d, exs in val_examples.items() for i in range(min(len(exs), len(routes[d])))]
    shard = shard and distributed.world_size() > 1
    total = len(distributed.shard_of(items)) if shard else sum(len(v) for v in val_examples.values())
    bar = tqdm(total=total, desc="router loss table", disable=not progress)

    def measure(item: tuple[str, int]) -> tuple[dict[str, float], int, float | None]:
        """Summed NLL of one example in every mode, its completion-token count, the cross-fitted oracle's NLL."""
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
        xfit = None
        if oracle_config is not None:
            labels = oracle_labels[d][i] if oracle_labels is not None else (d,)
            xfit = cross_fitted_oracle_nll(stacks, ex, labels, oracle_config, bf16)
        bar.update(1)
        return summed, c, xfit

    measured = iter(distributed.map_sharded(measure, items) if shard else (measure(x) for x in items))
    for d, exs in val_examples.items():
        sums = dict.fromkeys((*LOSS_MODES, "oracle", "xfit"), 0.0)
        n_tok = n_oracle_tok = n_xfit_tok = 0
        rows = []
        for i in range(min(len(exs), len(routes[d]))):
            summed, c, xfit = next(measured)
            row: dict[str, float] = {}
            if xfit is not None:
                row["oracle_cross_fitted"] = xfit / max(c, 1)
                sums["xfit"] += xfit
                n_xfit_tok += c
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
        if oracle_config is not None:
            xfit = sums["xfit"] / n_xfit_tok if n_xfit_tok == n_tok and n_tok else None
            table[d]["oracle_cross_fitted"] = xfit
            table[d]["recovered_cross_fitted"] = None if xfit is None else \
                recovered_fraction(xfit, losses["ungated"], losses["routed"])
        per_example[d] = rows
    bar.close()
    return table, per_example
