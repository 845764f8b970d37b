"""Matplotlib figures: forgetting heatmaps, loss curves, expert utilisation, the three panels.

Every figure is rendered to memory and written with :func:`~brainstacks_hooks.utils.io.atomic_write_bytes`, so
a reader (or a crash) never sees half a PNG.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
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
    return _save(fig, path)


def _save(fig: Any, path: str | os.PathLike) -> Path:
    """Render ``fig`` as PNG and write it atomically; the figure is closed."""
    from ..utils.io import atomic_write_bytes

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_loss_curves(curves: dict[str, list[tuple[int, float]]], path: str | os.PathLike,
                     title: str = "training loss", ylabel: str = "loss") -> Path:
    """One line per curve (``{label: [(step, value), ...]}``), e.g. each round's training loss."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in curves.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="." if len(points) < 30 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if curves:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _save(fig, path)


def plot_matrix(grid: list[list[float]], rows: list[str], cols: list[str], path: str | os.PathLike, title: str,
                fmt: str = "{:.2f}", cmap: str = "viridis") -> Path:
    """A labelled heatmap with its values written in the cells (NaN cells left blank)."""
    fig, ax = plt.subplots(figsize=(0.9 * len(cols) + 2.5, 0.5 * len(rows) + 1.8))
    im = ax.imshow(grid, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title(title)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v == v:
                ax.text(j, i, fmt.format(v), ha="center", va="center", color="white", fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _save(fig, path)


def plot_expert_utilization(util: dict[str, dict[str, list[float]]], path: str | os.PathLike) -> Path:
    """Per domain, a layers x projections heatmap of the share of the most used expert among the selections
    (top-k of E experts: 1/E when balanced, 1/k when the same k experts take every token)."""
    domains = list(util)
    keys = sorted({k for d in domains for k in util[d]})
    layers = sorted({int(k.split(".")[1]) for k in keys if k.split(".")[1].isdigit()})
    projs = list(dict.fromkeys(k.split(".")[-1] for k in keys))
    fig, axes = plt.subplots(1, max(1, len(domains)), figsize=(3.2 * max(1, len(domains)), 0.16 * len(layers) + 2.2),
                             squeeze=False)
    for ax, d in zip(axes[0], domains):
        grid = [[max(util[d].get(f"layers.{layer}.{p}", [float("nan")])) for p in projs] for layer in layers]
        im = ax.imshow(grid, cmap="magma", aspect="auto")
        ax.set_xticks(range(len(projs)), projs, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(0, len(layers), max(1, len(layers) // 8)), layers[::max(1, len(layers) // 8)], fontsize=7)
        ax.set_title(f"{d}: top expert share", fontsize=9)
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _save(fig, path)


def plot_three_panels(losses: Mapping[str, Mapping[str, float | None]], path: str | os.PathLike,
                      base: Mapping[str, float | None] | None = None, title: str = "held-out loss per domain") -> Path:
    """One panel per mode (``{mode: {domain: loss}}``, e.g. prefix / ungated / routed), a bar per domain with its
    value, on a shared y axis; ``base`` losses drawn as a dashed line over each bar (paper 5.3)."""
    modes = list(losses)
    domains = list(dict.fromkeys(d for per in losses.values() for d in per))
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, max(1, len(modes)), figsize=(3.4 * max(1, len(modes)), 3.6), sharey=True,
                             squeeze=False)
    for ax, mode in zip(axes[0], modes):
        vals = [losses[mode].get(d) for d in domains]
        heights = [v if v is not None and math.isfinite(v) else 0.0 for v in vals]
        bars = ax.bar(range(len(domains)), heights, color=[colors(i % 10) for i in range(len(domains))])
        for b, v in zip(bars, vals):
            if v is not None and math.isfinite(v):
                ax.text(b.get_x() + b.get_width() / 2, v * 0.98, f"{v:.3f}", ha="center", va="top", fontsize=7,
                        color="white")  # inside the bar: the base line sits above or just below its top
        if base:
            for i, d in enumerate(domains):
                v = base.get(d)
                if v is not None and math.isfinite(v):
                    ax.hlines(v, i - 0.4, i + 0.4, colors="black", linestyles="dashed", linewidth=1,
                              label="base" if i == 0 else None)
        ax.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
        ax.set_title(mode)
    axes[0][0].set_ylabel("completion loss (lower is better)")
    if base:
        axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
