"""Helpers for stack tests."""

from __future__ import annotations

import torch

from brainstacks_hooks import BrainStacks


def randomize_active(stacks: BrainStacks, seed: int, scale: float = 0.05) -> None:
    """Set the active stack's A, B and router from ``seed`` (non-zero B, so it changes the output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in stacks.active.items():
            m.A.copy_(torch.randn(m.A.shape, generator=g) * 0.2)
            m.B.copy_(torch.randn(m.B.shape, generator=g) * scale)
            m.router.copy_(torch.randn(m.router.shape, generator=g))


def add_domain(stacks: BrainStacks, domain: str, seed: int, rounds: int = 1) -> None:
    """Create, randomise and freeze ``rounds`` stacks for ``domain``."""
    for r in range(rounds):
        stacks.new_stack(domain)
        randomize_active(stacks, seed * 10 + r)
        stacks.freeze_active()


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
