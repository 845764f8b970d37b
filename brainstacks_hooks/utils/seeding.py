"""Seeding and seeded sampling shared by data loading, evaluation and the router."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seeded_sample_indices(n_total: int, n_take: int | None, seed: int) -> list[int]:
    """Return ``n_take`` distinct indices of ``range(n_total)`` drawn with a private seeded RNG.

    Never "the first N rows": the sample is uniform, reproducible and independent of global RNG state.
    The returned indices are sorted so that reading order stays stable.
    """
    if n_take is None or n_take >= n_total:
        return list(range(n_total))
    rng = random.Random(seed)
    return sorted(rng.sample(range(n_total), n_take))
