"""The one completion-loss evaluator: token-weighted NLL over completion tokens.

Every phase that measures a loss goes through this module: inner-loop rounds, the best-weights callback,
the forgetting matrix, null-space collection, the router oracle, the router's per-mode loss table and the
experiments. So they all agree on what "the loss" is:

* only completion tokens count (labels ``!= -100``; token ``t`` is predicted at position ``t - 1``);
* the cross-entropy is taken in fp32 at the labelled positions only (the logits of prompt and padding
  positions are never upcast, which matters for 50k-250k vocabularies);
* the forward runs in eval mode (router noise off, dropout off), under ``no_grad``, and under bf16
  autocast when asked (the precision the SFT evaluator uses, so losses of all phases are comparable);
* per example it returns the *summed* NLL and the token count; the aggregate is the token-weighted mean;
* with ``shard=True`` under ``torch.distributed`` every process evaluates every ``world_size``-th batch and the
  per-example results are gathered back in order, so every process gets the same numbers (those of one
  process evaluating every batch) and the decisions taken on them agree; every process must then call it.

It runs in whatever mode the stacks are in: wrap calls in ``stacks.prefix(d)``, ``stacks.routed(w)``, ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data.formatting import IGNORE_INDEX, CompletionCollator
from .utils import distributed

__all__ = [
    "autocast_context",
    "completion_nll",
    "completion_token_nll",
    "eval_mode",
    "evaluate_loss",
    "per_example_loss",
    "token_nll",
]


def autocast_context(model: nn.Module, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on the model's device type when ``bf16`` (CPU included), else a null context."""
    if not bf16:
        return contextlib.nullcontext()
    device = next(model.parameters()).device
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put the model in eval mode for the block and restore its previous training flag."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def completion_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 NLL of every completion token and the row it belongs to, in row-major token order.

    Args:
        logits: ``[B, L, V]`` next-token logits (any dtype).
        labels: ``[B, L]`` with ``-100`` on prompt and padding positions.

    Returns:
        ``(nll [K] float32, rows [K] int64)`` on the logits' device (``K`` labelled tokens in the batch).
    """
    target = labels[:, 1:]  # [B, L-1]: token t is predicted at position t-1
    keep = target != IGNORE_INDEX  # [B, L-1]
    rows = keep.nonzero(as_tuple=True)[0]  # [K] row of every labelled token
    nll = F.cross_entropy(logits[:, :-1][keep].float(), target[keep], reduction="none")  # [K]
    return nll, rows


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed fp32 NLL and count of completion tokens per row.

    Args:
        logits: ``[B, L, V]`` next-token logits (any dtype).
        labels: ``[B, L]`` with ``-100`` on prompt and padding positions.

    Returns:
        ``(sums [B] float64, counts [B] int64)`` on the CPU.
    """
    nll, rows = completion_token_nll(logits, labels)  # [K], [K]
    sums = torch.zeros(labels.shape[0], dtype=torch.float64, device=nll.device)
    sums.index_add_(0, rows, nll.double())
    return sums.cpu(), torch.bincount(rows, minlength=labels.shape[0]).cpu()


def completion_nll(
    model: nn.Module,
    examples: Sequence[dict[str, Any]],
    pad_token_id: int,
    batch_size: int = 8,
    bf16: bool = False,
    *,
    shard: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed completion NLL and completion-token counts, both ``[N]``.

    ``examples`` are encoded (``input_ids``, ``labels``, optional ``attention_mask``); they are right-padded
    in fixed batches of ``batch_size`` in the given order. ``shard``: split the batches over the processes
    of ``torch.distributed`` (collective; see the module docstring), a no-op in a single process.
    """
    collate = CompletionCollator(pad_token_id=pad_token_id)
    device = next(model.parameters()).device
    starts = list(range(0, len(examples), batch_size))
    n_proc = distributed.world_size() if shard else 1
    mine = starts[distributed.rank()::n_proc] if n_proc > 1 else starts
    sums, counts = [], []
    with eval_mode(model), torch.no_grad(), autocast_context(model, bf16):
        for start in mine:
            batch = collate(examples[start : start + batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits  # [B, S, V]
            s, c = token_nll(logits, batch["labels"])
            sums.append(s)
            counts.append(c)
    if n_proc > 1:  # batch i was evaluated by process i % n_proc, as its (i // n_proc)-th batch
        parts = distributed.all_gather_object(list(zip(sums, counts)))
        ordered = [parts[i % n_proc][i // n_proc] for i in range(len(starts))]
        sums, counts = [s for s, _ in ordered], [c for _, c in ordered]
    if not sums:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    return torch.cat(sums), torch.cat(counts)


def evaluate_loss(
    model: nn.Module,
    examples: Sequence[dict[str, Any]],
    pad_token_id: int,
    batch_size: int = 8,
    bf16: bool = False,
    *,
    shard: bool = False,
) -> float:
    """Token-weighted mean completion NLL over ``examples`` (in the stacks' current mode; ``shard``: split
    over the processes, see :func:`completion_nll`)."""
    if not examples:
        raise ValueError("evaluate_loss needs at least one example")
    sums, counts = completion_nll(model, examples, pad_token_id, batch_size, bf16, shard=shard)
    return float(sums.sum() / counts.sum().clamp_min(1))


def per_example_loss(
    model: nn.Module,
    examples: Sequence[dict[str, Any]],
    pad_token_id: int,
    batch_size: int = 8,
    bf16: bool = False,
    *,
    shard: bool = False,
) -> torch.Tensor:
    """Mean completion NLL of each example, ``[N]`` float32 (``shard``: see :func:`completion_nll`)."""
    sums, counts = completion_nll(model, examples, pad_token_id, batch_size, bf16, shard=shard)
    return (sums / counts.clamp_min(1)).float()
