"""Router metrics: accuracy against labels, recovered fraction, route summaries, routing latency."""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..data.formatting import encode_prompt
from ..loss import eval_mode
from ..utils.logging import get_logger
from .gating import Route, route_prompts
from .model import MetaRouter

logger = get_logger(__name__)


def label_metrics(
    probs: torch.Tensor, domains: Sequence[str], labels: Sequence[Sequence[str]], is_mixed: torch.Tensor
) -> dict[str, float]:
    """Router accuracy against the labels (not the oracle targets).

    * ``single_top1_label``: over single-domain rows, the fraction whose most probable domain is the
      source domain;
    * ``mixed_set_label``: over mixed rows, the fraction whose predicted set ``{d : p_d > 0.5}`` equals the
      label set (both domains) exactly.

    Metrics without rows are NaN.
    """
    single = [i for i in range(len(labels)) if not bool(is_mixed[i])]
    mixed = [i for i in range(len(labels)) if bool(is_mixed[i])]
    nan = float("nan")
    top1 = (sum(domains[int(probs[i].argmax())] in labels[i] for i in single) / len(single)) if single else nan
    sets = (sum({d for d, p in zip(domains, probs[i].tolist()) if p > 0.5} == set(labels[i]) for i in mixed)
            / len(mixed)) if mixed else nan
    return {"single_top1_label": top1, "mixed_set_label": sets}


def recovered_fraction(reference: float, ungated: float, routed: float, eps: float = 1e-4) -> float | None:
    """``(ungated - routed) / (ungated - reference)``: the share of the gap between ungated and a better
    reference (the per-example oracle) that routing recovers; ``None`` when ungated is not worse by ``eps``."""
    den = ungated - reference
    if not math.isfinite(den) or den <= eps:
        return None
    return (ungated - routed) / den


@torch.no_grad()
def route_summary(routes: Sequence[Route], domains: Sequence[str], top_k: int = 3) -> dict[str, Any]:
    n = max(len(routes), 1)
    sets = Counter("+".join(r.gated_on) or "(none)" for r in routes)
    return {
        "n": len(routes),
        "mean_score": {d: sum(r.scores[d] for r in routes) / n for d in domains},
        "gated_on_fraction": {d: sum(d in r.weights for r in routes) / n for d in domains},
        "top_gated_sets": [[k, c] for k, c in sets.most_common(top_k)],
        "gap_fraction": sum(r.gap for r in routes) / n,
    }


def stats_ms(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"n": len(values), "mean": statistics.fmean(values), "median": statistics.median(values),
            "min": min(values), "max": max(values)}


@torch.no_grad()
def measure_timing(
    stacks: Any,
    tokenizer: Any,
    router: MetaRouter,
    meta: Mapping[str, Any],
    prompts: Sequence[tuple[str, str]],
    generation_prompts: int,
    generation_tokens: int,
) -> dict[str, Any]:
    """Per-prompt routing latency (features + router, batch of one) and routed generation time.

    The first prompt is routed once untimed (warm-up). Generation is greedy with exactly
    ``generation_tokens`` new tokens (``min_new_tokens`` = ``max_new_tokens``) in ``routed`` mode.
    """
    out: dict[str, Any] = {"device": str(next(stacks.model.parameters()).device),
                           "threads": torch.get_num_threads()}
    if not prompts:
        return out
    route_prompts(stacks, tokenizer, router, meta, [prompts[0]], batch_size=1)  # warm-up
    feats, rtr, routes = [], [], []
    for p in prompts:
        (route,) = route_prompts(stacks, tokenizer, router, meta, [p], batch_size=1)
        feats.append(route.timings["features_ms"])
        rtr.append(route.timings["router_ms"])
        routes.append(route)
    out["features_ms_per_prompt"] = stats_ms(feats)
    out["router_ms_per_prompt"] = stats_ms(rtr)
    out["route_ms_per_prompt"] = stats_ms([f + r for f, r in zip(feats, rtr)])
    gen: list[float] = []
    model = stacks.model
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with eval_mode(model):
        for p, route in list(zip(prompts, routes))[:generation_prompts]:
            ids = torch.tensor([encode_prompt(tokenizer, p[0], p[1])["input_ids"]],
                               device=next(model.parameters()).device)
            with stacks.routed(route.weights):
                t0 = time.perf_counter()
                new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=generation_tokens, min_new_tokens=generation_tokens,
                                     pad_token_id=pad)
                gen.append((time.perf_counter() - t0) * 1000.0)
            if new.shape[1] - ids.shape[1] != generation_tokens:
                logger.warning("generation produced %d tokens, not %d", new.shape[1] - ids.shape[1],
                               generation_tokens)
    out["generation_tokens"] = generation_tokens
    out["generate_ms_per_prompt"] = stats_ms(gen)
    if gen and out["route_ms_per_prompt"]:
        out["route_over_generate"] = out["route_ms_per_prompt"]["median"] / statistics.median(gen)
    return out


def mean_pool(features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mask-mean-pooled features ``[N, D]`` (fp32) of ``[N, S, D]`` features."""
    m = attention_mask.to(torch.float32).unsqueeze(-1)  # [N, S, 1]
    return (features.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, n_classes: int,
                 steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-3, seed: int = 0) -> torch.Tensor:
    """Softmax regression on standardised pooled features: the baseline a router must at least match.

    Args:
        train_x: ``[N, D]`` pooled training features; ``train_y``: ``[N]`` class indices.
        test_x: ``[M, D]`` pooled test features.
        n_classes: Number of classes.

    Returns:
        ``[M, n_classes]`` class probabilities.
    """
    g = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-5)
    xs, xt = (train_x - mean) / std, (test_x - mean) / std
    w = (torch.randn(xs.shape[1], n_classes, generator=g) * 0.01).requires_grad_()
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(xs @ w + b, train_y).backward()
            opt.step()
    with torch.no_grad():
        return torch.softmax(xt @ w + b, dim=1)


def label_top1(probs: torch.Tensor, domains: Sequence[str], labels: Sequence[str], min_margin: float = 0.05
               ) -> dict[str, float]:
    """Top-1 against the source domain with the tie rule of :func:`~.train.validation_metrics`, plus the mean
    margin, the mean spread (highest minus lowest score) and the per-domain top-1."""
    if not len(labels):
        return {"top1": float("nan"), "top1_margin": float("nan"), "score_spread": float("nan")}
    idx = torch.tensor([list(domains).index(d) for d in labels])
    two = probs.topk(min(2, probs.shape[1]), dim=1).values
    margin = two[:, 0] - two[:, -1]
    hit = (probs.argmax(1) == idx) & (margin >= min_margin)
    out = {"top1": float(hit.float().mean()), "top1_margin": float(margin.mean()),
           "score_spread": float((probs.max(1).values - probs.min(1).values).mean())}
    for j, d in enumerate(domains):
        sel = idx == j
        if bool(sel.any()):
            out[f"top1_{d}"] = float(hit[sel].float().mean())
    return out


def gap_summary(routes_by_domain: Mapping[str, Sequence[Route]], trained: Sequence[str]) -> dict[str, Any]:
    """How often the gap flag (every score at or below the gate) is raised, per test domain, and in total for
    trained vs untrained domains."""
    per = {d: sum(r.gap for r in rs) / len(rs) for d, rs in routes_by_domain.items() if rs}
    inside = [r.gap for d, rs in routes_by_domain.items() if d in trained for r in rs]
    outside = [r.gap for d, rs in routes_by_domain.items() if d not in trained for r in rs]
    return {"per_domain": per,
            "trained_domains": sum(inside) / len(inside) if inside else None,
            "untrained_domains": sum(outside) / len(outside) if outside else None,
            "n_trained": len(inside), "n_untrained": len(outside)}
