"""The router report: file names, strict-JSON cleaning and the readable summary table."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

REPORT_FORMAT_VERSION = 1
REPORT_FILE = "report.json"
VAL_ROUTES_FILE = "val_routes.json"
PLOT_FILE = "cross_domain.png"


def json_safe(obj: Any) -> Any:
    """NaN and infinities become ``None`` (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def summary_table(report: Mapping[str, Any]) -> str:
    """Readable summary of a router report: accuracy, the loss table, the cross-domain table, timings."""
    v, r, t = report["validation"], report["router"], report["timing"]
    lines = [
        f"router: {report['router_dir']}  (best epoch {r['best_epoch']}/{r['epochs']}, {r['n_params']:,} params)",
        f"validation prompts: single-domain top-1 {_fmt(v['single_top1'])} vs oracle targets, "
        f"{_fmt(v['single_top1_label'])} vs source domain (n={v['n_single']}); "
        f"mixed-set match {_fmt(v['mixed_set'])} vs oracle, {_fmt(v['mixed_set_label'])} vs labels "
        f"(n={v['n_mixed']})",
        "",
        f"{'domain':<10} {'prefix':>8} {'ungated':>8} {'routed':>8} {'base':>8} {'recovered':>9}  "
        f"{'excl.own':>8}  oracle top routes",
    ]
    cross = report["cross_domain"].get("per_domain", {})
    for d, row in report["val_losses"].items():
        c = cross.get(d, {})
        routes = ", ".join(f"{k} {n}" for k, n in c.get("top_routes", [])[:3])
        lines.append(f"{d:<10} {_fmt(row['prefix']):>8} {_fmt(row['ungated']):>8} {_fmt(row['routed']):>8} "
                     f"{_fmt(row['base']):>8} {_fmt(row['recovered_fraction'], '.2f'):>9}  "
                     f"{_fmt(c.get('excludes_own'), '.2f'):>8}  {routes}")
    f, rt, g = t.get("features_ms_per_prompt"), t.get("router_ms_per_prompt"), t.get("generate_ms_per_prompt")
    timing = (f"timing (median per prompt): features {_fmt(f and f['median'], '.1f')} ms + router "
              f"{_fmt(rt and rt['median'], '.2f')} ms")
    if g:
        timing += f"; generating {t['generation_tokens']} tokens {_fmt(g['median'], '.0f')} ms"
    lines += ["", timing,
              "(recovered = (ungated - routed) / (ungated - prefix); excl.own = oracle routes without the "
              "prompt's own domain)"]
    return "\n".join(lines)
