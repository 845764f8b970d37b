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
    """Readable summary of a router report: held-out accuracy beside the linear probe, gap signal, the loss
    table against the per-example oracle, the cross-domain table and timings."""
    v, r, t = report["validation"], report["router"], report["timing"]
    h, p, g = report.get("held_out", {}), report.get("linear_probe", {}), report.get("gap", {})
    lines = [
        f"router: {report['router_dir']}  (best epoch {r['best_epoch']}/{r['epochs']}, {r['n_params']:,} params)",
        f"held-out prompts (n={h.get('n', 0)}, never trained on): top-1 {_fmt(h.get('top1'))} vs source domain "
        f"(margin {_fmt(h.get('top1_margin'), '.2f')}, spread {_fmt(h.get('score_spread'), '.2f')}); "
        f"linear probe {_fmt(p.get('top1'))}",
        f"held-out oracle rows: top-1 {_fmt(v.get('single_top1'))} vs oracle targets (n={v.get('n_single', 0)}), "
        f"mixed-set match {_fmt(v.get('mixed_set'))} (n={v.get('n_mixed', 0)}), BCE {_fmt(v.get('val_bce'))}, "
        f"calibration error {_fmt(v.get('calibration'))}",
        f"gap flag raised: {_fmt(g.get('trained_domains'), '.2f')} of trained-domain prompts, "
        f"{_fmt(g.get('untrained_domains'), '.2f')} of untrained-domain prompts (n={g.get('n_untrained', 0)})",
        "",
        f"{'domain':<10} {'prefix':>8} {'own':>8} {'ungated':>8} {'routed':>8} {'oracle':>8} {'x-fit':>8} "
        f"{'base':>8} {'recovered':>9} {'vs x-fit':>8}  oracle top routes",
    ]
    cross = report["cross_domain"].get("per_domain", {})
    for d, row in report["val_losses"].items():
        c = cross.get(d, {})
        routes = ", ".join(f"{k} {n}" for k, n in c.get("top_routes", [])[:3])
        lines.append(f"{d:<10} {_fmt(row['prefix']):>8} {_fmt(row.get('isolated')):>8} {_fmt(row['ungated']):>8} "
                     f"{_fmt(row['routed']):>8} {_fmt(row.get('oracle')):>8} "
                     f"{_fmt(row.get('oracle_cross_fitted')):>8} {_fmt(row['base']):>8} "
                     f"{_fmt(row['recovered_fraction'], '.2f'):>9} {_fmt(row.get('recovered_cross_fitted'), '.2f'):>8}"
                     f"  {routes}")
    f, rt, gen = t.get("features_ms_per_prompt"), t.get("router_ms_per_prompt"), t.get("generate_ms_per_prompt")
    timing = (f"timing (median per prompt): features {_fmt(f and f['median'], '.1f')} ms + router "
              f"{_fmt(rt and rt['median'], '.2f')} ms")
    if gen:
        timing += f"; generating {t['generation_tokens']} tokens {_fmt(gen['median'], '.0f')} ms"
    if t.get("oracle_examples_per_min"):
        timing += f"; oracle {t['oracle_examples_per_min']:.1f} examples/min"
    lines += ["", timing,
              "(own = the domain's stacks alone; oracle = best route per example; recovered = (ungated - routed) / "
              "(ungated - oracle); x-fit = the oracle's route picked on half of each answer's tokens and scored on "
              "the other half, a reference for what a route choice gains beyond noise; vs x-fit = (ungated - routed) / "
              "(ungated - x-fit); '-' = not computed or ungated not worse (no gap))"]
    return "\n".join(lines)
