"""Collect the directions a finished domain's frozen stacks write into (paper 3.5, done right).

For a previous domain p, its validation sequences run through the model in ``isolated(p)`` mode (or, with
``collection: aggregate``, in ``prefix(p)`` mode: every frozen stack up to p, the paper's condition); the
hooks hand over the frozen stacks' summed output delta per projection (the delta the forward computes
anyway). Token rows (padding excluded) are sampled uniformly up to ``max_rows`` per projection, and the
top-k right singular vectors become p's basis. Bases of all previous domains are merged and
re-orthonormalised by :meth:`BrainStacks.add_null_space_basis`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..data.formatting import CompletionCollator
from ..loss import autocast_context, eval_mode
from ..run_config import NullSpaceConfig
from ..stacks.brainstacks import BrainStacks
from ..stacks.null_space import top_directions
from ..utils.logging import get_logger

logger = get_logger(__name__)


@torch.no_grad()
def collect_domain_basis(
    stacks: BrainStacks,
    domain: str,
    examples: Sequence[dict[str, Any]],
    pad_token_id: int,
    config: NullSpaceConfig,
    batch_size: int = 8,
    bf16: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Top-``directions_per_domain`` output directions of ``domain``'s frozen stacks, per projection."""
    examples = list(examples)[: config.num_samples]
    if not examples:
        raise ValueError(f"no validation examples to compute the null space of {domain!r}")
    n_batches = math.ceil(len(examples) / batch_size)
    per_batch = math.ceil(config.max_rows / n_batches)
    gen = torch.Generator().manual_seed(seed)
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in stacks.keys}
    current: dict[str, torch.Tensor] = {}

    def collect(key: str, delta: torch.Tensor) -> None:
        rows[key].append(delta.index_select(0, current["idx"].to(delta.device)).float().cpu())  # [n, d_out]

    collate = CompletionCollator(pad_token_id=pad_token_id)
    device = next(stacks.model.parameters()).device
    mode = stacks.prefix(domain) if config.collection == "aggregate" else stacks.isolated(domain)
    with eval_mode(stacks.model), mode, stacks.collect_frozen_deltas(collect), \
            autocast_context(stacks.model, bf16):
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size])
            valid = batch["attention_mask"].reshape(-1).nonzero().squeeze(1)  # non-padding token positions
            pick = torch.randperm(valid.numel(), generator=gen)[:per_batch]
            current["idx"] = valid[pick.sort().values]
            stacks.model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    bases = {}
    for key, parts in rows.items():
        d = torch.cat(parts)[: config.max_rows]  # [n_rows, d_out]
        bases[key] = top_directions(d, config.directions_per_domain, niter=config.niter)
    ks = [v.shape[1] for v in bases.values()]
    logger.info("null space of %s: %d-%d directions per projection from %d token rows", domain, min(ks), max(ks),
                sum(p.shape[0] for p in rows[stacks.keys[0]]))
    return bases
