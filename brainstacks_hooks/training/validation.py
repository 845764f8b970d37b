"""The one validation-loss evaluator, used for rounds, the callback, the forgetting matrix and the oracle.

Loss is the token-weighted mean negative log-likelihood over completion tokens (labels != -100) of a
fixed, pre-encoded validation subset, in fixed batches, under one precision setting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.formatting import CompletionCollator


def autocast_context(model: nn.Module, bf16: bool):
    """bf16 autocast on the model's device type when ``bf16`` (CPU included), else a null context."""
    if not bf16:
        return contextlib.nullcontext()
    device = next(model.parameters()).device
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Put the model in eval mode for the block and restore its previous training flag."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def completion_nll(
    model: nn.Module,
    examples: Sequence[dict[str, Any]],
    pad_token_id: int,
    batch_size: int = 8,
    bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed NLL over completion tokens and per-example completion-token counts, both [N]."""
    collate = CompletionCollator(pad_token_id=pad_token_id)
    device = next(model.parameters()).device
    sums, counts = [], []
    with eval_mode(model), torch.no_grad(), autocast_context(model, bf16):
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]  # [B, S-1]: token t is predicted at position t-1
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100,
                                  reduction="none")  # [B, S-1]
            mask = labels != -100
            sums.append((nll * mask).sum(1).double().cpu())
            counts.append(mask.sum(1).cpu())
    return torch.cat(sums), torch.cat(counts)


def evaluate_loss(
    model: nn.Module,
    examples: Sequence[dict[str, Any]],
    pad_token_id: int,
    batch_size: int = 8,
    bf16: bool = False,
) -> float:
    """Token-weighted mean completion NLL over ``examples`` (in the stacks' current mode)."""
    if not examples:
        raise ValueError("evaluate_loss needs at least one example")
    sums, counts = completion_nll(model, examples, pad_token_id, batch_size, bf16)
    return float(sums.sum() / counts.sum().clamp_min(1))


def per_example_loss(
    model: nn.Module,
    examples: Sequence[dict[str, Any]],
    pad_token_id: int,
    batch_size: int = 8,
    bf16: bool = False,
) -> torch.Tensor:
    """Mean completion NLL of each example, [N] (used by the router oracle)."""
    sums, counts = completion_nll(model, examples, pad_token_id, batch_size, bf16)
    return (sums / counts.clamp_min(1)).float()
