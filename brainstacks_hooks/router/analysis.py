"""Cross-domain analysis of oracle records (paper 5.1): which routes each source domain's prompts prefer."""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from ..utils.io import atomic_write_bytes
from .oracle import OracleRecord


def _route_label(route: Sequence[str]) -> str:
    return "+".join(route) if route else "(none)"


def cross_domain_analysis(
    records: Sequence[OracleRecord | Mapping[str, Any]], top_k: int = 5
) -> dict[str, Any]:
    """Which stacks prompts of each source domain actually use (paper section 5.1).

    Returns:
        ``{"per_domain": {source: stats}, "overall": {...}}`` where stats has ``n``,
        ``excludes_own`` (fraction whose best route does not contain the source domain),
        ``own_with_others`` (contains it together with other domains), ``own_only``, ``empty`` (floor-only
        route), ``soft_fraction``, ``top_routes`` (``[[route, count], ...]``, most frequent first),
        ``mean_base_loss``, ``mean_best_loss`` and ``mean_improvement`` (stacks-off minus best).
    """
    recs = [r if isinstance(r, OracleRecord) else OracleRecord.from_dict(r) for r in records]
    per: dict[str, list[OracleRecord]] = {}
    for r in recs:
        per.setdefault(r.domain, []).append(r)

    def stats(rs: list[OracleRecord], own: str | None) -> dict[str, Any]:
        n = len(rs)
        routes = Counter(_route_label(r.route) for r in rs)
        out: dict[str, Any] = {
            "n": n,
            "empty": sum(not r.route for r in rs) / n,
            "soft_fraction": sum(bool(r.soft) for r in rs) / n,
            "top_routes": [[k, c] for k, c in routes.most_common(top_k)],
            "mean_base_loss": sum(r.base_loss for r in rs) / n,
            "mean_best_loss": sum(r.best_loss for r in rs) / n,
            "mean_improvement": sum(r.base_loss - r.best_loss for r in rs) / n,
        }
        if own is not None:
            out["excludes_own"] = sum(own not in r.route for r in rs) / n
            out["own_with_others"] = sum(own in r.route and len(r.route) > 1 for r in rs) / n
            out["own_only"] = sum(r.route == [own] for r in rs) / n
        return out

    return {
        "per_domain": {d: stats(rs, d) for d, rs in per.items()},
        "overall": stats(recs, None) if recs else {"n": 0},
    }


def plot_cross_domain(analysis: Mapping[str, Any], path: str | os.PathLike | None = None):
    """Grouped bar chart of :func:`cross_domain_analysis`: per source domain, the fraction of prompts
    routed without their own stack, with it plus others, with it alone, and to the floor-only route.

    Returns the matplotlib ``Figure``; also writes a PNG atomically when ``path`` is given.
    """
    from matplotlib.figure import Figure

    per = analysis["per_domain"]
    names = list(per)
    series = [
        ("excludes own", "excludes_own"),
        ("own + others", "own_with_others"),
        ("own only", "own_only"),
        ("no stack (floor)", "empty"),
    ]
    fig = Figure(figsize=(max(5.0, 1.4 * len(names) + 2), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(series)
    for j, (label, key) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [per[d].get(key, 0.0) for d in names], width=width, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{d}\n(n={per[d]['n']})" for d in names])
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of prompts")
    ax.set_title("Oracle routes by source domain")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    if path is not None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120)
        atomic_write_bytes(path, buf.getvalue())
    return fig
