"""From router scores to the stack weights that run: chat floor, gate threshold and gap detection.

:func:`apply_gating` is the single definition of how scores become weights. The oracle
(:mod:`.oracle`) runs every candidate route through it too, so the chat floor is applied identically when
targets are discovered and when prompts are routed (the reference code compared "domain + 0.2 chat"
against a base without chat; ``shared/research/reference_impl.md`` section 11.1 item 14).

Semantics, exactly:

* a domain is **gated on** iff its (floored) score is strictly greater than ``gate_threshold``;
* the chat floor raises ``chat_domain``'s score to ``max(score, chat_floor)`` before gating, so chat is
  always on when ``chat_floor > gate_threshold``; without a ``chat_domain`` among the scores there is no
  floor;
* gated-on domains keep their continuous score as weight (not binarised); gated-off domains are absent
  from ``weights``, so downstream code neither loads nor computes them;
* ``gap`` is True iff every *raw* score (before the floor) is ``<= gate_threshold``: no stack claims the
  prompt (the capability-gap signal of paper section 8.1).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .model import MetaRouter


@dataclass
class Route:
    """The routing decision for one prompt.

    Attributes:
        weights: ``{domain: weight}`` of gated-on domains only (gated-off domains are absent).
        scores: Raw router scores of every domain (before the chat floor).
        gated_on: Domains with a weight, in score order of the input.
        gap: True when every raw score is ``<= gate_threshold`` (no stack claims the prompt).
        timings: Optional timings in milliseconds (e.g. ``{"features_ms": ..., "router_ms": ...}``).
    """

    weights: dict[str, float]
    scores: dict[str, float]
    gated_on: list[str]
    gap: bool
    timings: dict[str, float] = field(default_factory=dict)


def apply_gating(
    scores: Mapping[str, float], chat_floor: float, chat_domain: str | None, gate_threshold: float
) -> Route:
    """Turn per-domain scores into the weights that run (see the module docstring for the exact rules).

    Args:
        scores: ``{domain: score}``, scores finite and ``>= 0`` (router probabilities or oracle 0/1).
        chat_floor: Minimum weight of ``chat_domain``.
        chat_domain: Name of the chat domain; ``None`` or a name not in ``scores`` disables the floor.
        gate_threshold: A domain runs iff its (floored) score is strictly greater than this.

    Returns:
        The :class:`Route`.
    """
    raw = {d: float(s) for d, s in scores.items()}
    for d, s in raw.items():
        if not math.isfinite(s) or s < 0:
            raise ValueError(f"score of {d!r} must be finite and >= 0 (got {s})")
    gap = all(s <= gate_threshold for s in raw.values())
    effective = dict(raw)
    if chat_domain is not None and chat_domain in effective:
        effective[chat_domain] = max(effective[chat_domain], float(chat_floor))
    gated_on = [d for d, s in effective.items() if s > gate_threshold]
    return Route(weights={d: effective[d] for d in gated_on}, scores=raw, gated_on=gated_on, gap=gap)


def subset_route(
    subset: Iterable[str],
    domains: Sequence[str],
    chat_floor: float,
    chat_domain: str | None,
    gate_threshold: float,
) -> Route:
    """The route executed when a router scores ``subset`` at 1.0 and every other domain at 0.0.

    This is how the oracle turns a candidate combination into weights: the empty subset runs chat at the
    floor (when chat exists), ``{"math"}`` runs math at 1.0 plus chat at the floor, ``{"chat"}`` runs
    chat at 1.0 alone. Requires ``gate_threshold < 1``.
    """
    members = set(subset)
    unknown = members - set(domains)
    if unknown:
        raise ValueError(f"unknown domains in subset: {sorted(unknown)} (domains: {list(domains)})")
    return apply_gating(
        {d: 1.0 if d in members else 0.0 for d in domains}, chat_floor, chat_domain, gate_threshold
    )


@torch.no_grad()
def route_features(
    router: MetaRouter,
    features: torch.Tensor,
    attention_mask: torch.Tensor | None,
    chat_floor: float,
    chat_domain: str | None,
    gate_threshold: float,
) -> list[Route]:
    """Run the router on precomputed features and gate each prompt.

    Args:
        router: The trained :class:`MetaRouter`.
        features: ``[B, S, D]`` features built with the router's stored feature recipe.
        attention_mask: ``[B, S]`` or ``None``.
        chat_floor, chat_domain, gate_threshold: As in :func:`apply_gating` (use the values stored with
            the router).

    Returns:
        One :class:`Route` per prompt; ``timings["router_ms"]`` is the batch's router time.
    """
    device = next(router.parameters()).device
    mask = attention_mask.to(device) if attention_mask is not None else None
    t0 = time.perf_counter()
    probs = router.predict(features.to(device), mask).float().cpu()  # [B, N]
    router_ms = (time.perf_counter() - t0) * 1000.0
    routes = []
    for row in probs:
        route = apply_gating(dict(zip(router.domains, row.tolist())), chat_floor, chat_domain, gate_threshold)
        route.timings["router_ms"] = router_ms
        routes.append(route)
    return routes


def route_prompts(
    bs: Any,
    tokenizer: Any,
    router: MetaRouter,
    meta: Mapping[str, Any],
    prompts: Sequence[Any],
    batch_size: int = 8,
) -> list[Route]:
    """Route raw prompts end to end with a router loaded by :func:`~.serialization.load_router`.

    Features are computed with the recipe stored in ``meta`` (sequence length, layer weights) inside
    ``bs.base_only()``, and gated with the stored chat floor, chat domain and gate threshold, so routing
    is exactly what the router was trained for.

    Args:
        bs: The :class:`BrainStacks` (or a bare HF base model).
        tokenizer: The base tokenizer.
        router: The router.
        meta: The router's ``router.json`` dictionary.
        prompts: Instruction strings, ``(instruction, input)`` pairs or mappings.
        batch_size: Prompts per base forward.

    Returns:
        One :class:`Route` per prompt, with ``features_ms`` and ``router_ms`` (per batch) in ``timings``.
    """
    from .config import FeatureRecipe
    from .features import compute_features

    recipe = FeatureRecipe.from_dict(dict(meta["feature_recipe"]))
    t0 = time.perf_counter()
    feats, mask = compute_features(bs, tokenizer, prompts, recipe, batch_size, progress=False)
    features_ms = (time.perf_counter() - t0) * 1000.0
    routes = route_features(
        router, feats, mask, meta["chat_floor"], meta["chat_domain"], meta["gate_threshold"]
    )
    for r in routes:
        r.timings["features_ms"] = features_ms
    return routes
