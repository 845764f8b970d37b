"""Matplotlib figures: forgetting heatmaps, loss curves, expert utilisation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_forgetting(rows: list[dict[str, Any]], path: str | os.PathLike,
                    modes: tuple[str, ...] = ("prefix", "isolated", "ungated")) -> Path:
    """One heatmap per mode: rows = evaluated domain, columns = "after training domain"."""
    afters = [r["after"] for r in rows]
    domains = list(dict.fromkeys(d for r in rows for d in r["losses"]))
    fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 0.6 * len(domains) + 2.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        grid = [[r["losses"].get(d, {}).get(mode, float("nan")) for r in rows] for d in domains]
        im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
        ax.set_xticks(range(len(afters)), [f"after {a}" for a in afters], rotation=30, ha="right")
        ax.set_yticks(range(len(domains)), domains)
        ax.set_title(f"val loss, {mode}")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:  # not NaN
                    ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="white", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
