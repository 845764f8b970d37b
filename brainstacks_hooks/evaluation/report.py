"""``brainstacks report RUN_DIR``: one Markdown report of a run with its tables and plots.

Everything is read from the run directory (:class:`~brainstacks_hooks.run_dir.RunDir`): the manifest (SFT and
RL rounds, training logs), ``forgetting.json``, ``router/report.json`` (held-out routing, linear probe, loss
table, oracle cross-domain routes, gap signal), ``eval/<mode>/results.json`` (benchmarks, delta to ``base``),
``experiments/three_panels.json`` (paper 5.3: loss and generations in prefix / ungated / routed, written by
``recipes/experiments/three_panels.py``).
The expert utilisation (paper 4.2.3) is the one thing measured here: each domain's ``rows/sft_val`` rows through
its own stacks (``isolated`` mode), counting the top-k selections of every expert of every projection; it is
cached in ``report/expert_utilization.json`` (delete it, or pass ``--recompute``, to measure again).

Output: ``RUN_DIR/report/report.md`` and PNGs beside it, each written atomically; rerunning replaces them. A
part whose inputs are missing (no router yet, no evaluation) says so and names the command that makes it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..run_dir import FORGETTING_FILE, SFT_VAL, RunDir
from ..utils.io import atomic_write_bytes, atomic_write_json, read_json
from ..utils.logging import get_logger

logger = get_logger(__name__)

__all__ = ["REPORT_SUBDIR", "expert_utilization", "write_report"]

REPORT_SUBDIR = "report"
UTILIZATION_FILE = "expert_utilization.json"


# ---------------------------------------------------------------------------------------------- measured here
def expert_utilization(run: RunDir, rows_per_domain: int = 8, batch_size: int = 4) -> dict[str, Any]:
    """Expert selection shares of each domain's stacks on its own validation rows (``isolated`` mode).

    Returns ``{"rows_per_domain": n, "domains": {domain: {target key: [share of expert e]}}}``: the shares of a
    domain are its stacks' counts summed over rounds, normalised per projection (they sum to 1).
    """
    import torch

    from ..data.formatting import encode_rows
    from ..loss import completion_nll

    model, tokenizer = run.load_base()
    stacks = run.open_stacks(model)
    max_length = run.run_config().train.max_length
    out: dict[str, dict[str, list[float]]] = {}
    for domain in run.manifest.domain_order:
        if not stacks.stacks_for(domain):
            continue
        examples, _ = encode_rows(tokenizer, run.read_rows(SFT_VAL, domain)[:rows_per_domain], max_length)
        if not examples:
            continue
        with stacks.isolated(domain), stacks.track_expert_utilization() as util:
            completion_nll(model, examples, tokenizer.pad_token_id, batch_size)
        summed: dict[str, torch.Tensor] = {}
        for per_key in util.values():
            for key, shares in per_key.items():
                summed[key] = summed.get(key, torch.zeros(len(shares))) + torch.tensor(shares)
        out[domain] = {k: (v / v.sum()).tolist() for k, v in summed.items()}
    stacks.detach()
    return {"rows_per_domain": rows_per_domain, "domains": out}


# ---------------------------------------------------------------------------------------------- tables
def format_cell(v: Any, nd: int = 4) -> str:
    """A table cell: ``-`` for a missing or non-finite number, floats with ``nd`` decimals."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(format_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _rounds_section(run: RunDir) -> str:
    m = run.manifest
    rows = []
    for d in m.domain_order:
        for r in m.domain(d).rounds:
            rows.append([d, r.round, r.kind, r.status, r.loss_before, r.best_val_loss, r.frozen_val_loss, r.steps,
                         r.stop_reason, round(r.wall_time_s, 1)])
    return _table(["domain", "round", "kind", "status", "val loss before", "best val", "frozen val", "steps",
                   "stop", "wall s"], rows)


def _rl_section(run: RunDir) -> str | None:
    rows = []
    m = run.manifest
    for d in m.domain_order:
        for r in m.domain(d).rounds:
            if r.rl is None:
                continue
            b, a = r.rl["before"], r.rl["after"]
            extra = [(k, b[k]["mean"], a[k]["mean"]) for k in b if isinstance(b[k], dict) and "mean" in b[k]
                     and k != "score"]
            if "loss" in b:  # DPO: TRL's held-out metrics (the implicit-reward ones are 0 at step 0)
                names = (("dpo loss", "loss"), ("reward margin", "rewards/margins"),
                         ("reward accuracy", "rewards/accuracies"))
                extra += [(name, b.get(key), a.get(key)) for name, key in names]
            extra.append(("sft val loss", b.get("sft_val_loss"), a.get("sft_val_loss")))
            for name, vb, va in [("score", b["score"]["mean"], a["score"]["mean"]), *extra]:
                rows.append([d, r.round, r.kind, r.status, name, vb, va, b["score"].get("n"), r.steps,
                             r.rl.get("s_per_step")])
    if not rows:
        return None
    return _table(["domain", "round", "algo", "status", "held-out metric", "before", "after", "n", "steps", "s/step"],
                  rows)


def _eval_section(run: RunDir) -> str | None:
    results = {}
    if run.eval_dir.is_dir():
        for d in sorted(run.eval_dir.iterdir()):
            f = d / "results.json"
            if f.is_file():
                results[d.name] = read_json(f)
    if not results:
        return None
    modes = ["base", *[m for m in results if m != "base"]] if "base" in results else list(results)
    modes = [m for m in modes if m in results]
    keys = []
    for mode in modes:
        for task, metrics in results[mode]["metrics"].items():
            for metric in metrics:
                if (task, metric) not in keys:
                    keys.append((task, metric))
    rows = []
    for task, metric in keys:
        cells: list[Any] = [task, metric]
        base = results.get("base", {}).get("metrics", {}).get(task, {}).get(metric)
        for mode in modes:
            v = results[mode]["metrics"].get(task, {}).get(metric)
            if v is None:
                cells.append("-")
                continue
            text = f"{v['value']:.3f} ± {v['stderr']:.3f}" if v.get("stderr") is not None else f"{v['value']:.3f}"
            if mode != "base" and base is not None:
                text += f" ({v['value'] - base['value']:+.3f})"
            cells.append(text)
        rows.append(cells)
    def wall(r: dict[str, Any]) -> float:
        w = r.get("wall_time_s", 0.0)
        return float(sum(w.values()) if isinstance(w, dict) else w)

    limits = ", ".join(f"{m}: limit {results[m].get('limit')}, {wall(results[m]):.0f} s" for m in modes)
    return _table(["task", "metric", *modes], rows) + f"\n\n({limits}; delta to base in parentheses)"


def _three_panels_section(run: RunDir) -> str:
    """The three-panel tables of ``experiments/three_panels.json``, or the command that makes them."""
    from .three_panels import EXPERIMENTS_SUBDIR, THREE_PANELS_COMMAND, THREE_PANELS_STEM, panels_markdown

    path = run.path / EXPERIMENTS_SUBDIR / f"{THREE_PANELS_STEM}.json"
    if not path.is_file():
        return f"Not measured yet (`{THREE_PANELS_COMMAND.format(run=run.path)}`)."
    record = read_json(path)
    png = path.with_suffix(".png")
    image = f"../{EXPERIMENTS_SUBDIR}/{png.name}" if png.is_file() else None
    body = panels_markdown(record, heading=None, image=image, compact=True, max_chars=300).rstrip()
    return body + f"\n\n(from `{path.relative_to(run.path)}`, {record.get('created')})"


def _router_sections(report: dict[str, Any]) -> list[str]:
    parts = []
    h, p = report.get("held_out") or {}, report.get("linear_probe") or {}
    domains = [k.removeprefix("top1_") for k in h if k.startswith("top1_") and k != "top1_margin"]
    rows = [["top-1 vs source domain", h.get("top1"), p.get("top1")],
            ["mean margin top - runner-up", h.get("top1_margin"), p.get("top1_margin")],
            ["mean spread highest - lowest", h.get("score_spread"), p.get("score_spread")],
            *[[f"top-1 {d}", h.get(f"top1_{d}"), p.get(f"top1_{d}")] for d in domains]]
    parts.append(f"Held-out prompts (n={h.get('n')}), router vs a linear probe on the same features and rows:\n\n"
                 + _table(["metric", "router", "linear probe"], rows))
    vl = report.get("val_losses") or {}
    if vl:
        cols = ["base", "prefix", "isolated", "ungated", "routed", "oracle", "recovered_fraction",
                "oracle_cross_fitted", "recovered_cross_fitted"]
        parts.append("Loss table (held-out oracle rows; recovered = (ungated - routed) / (ungated - oracle); "
                     "oracle_cross_fitted: the oracle's route picked on half of each answer's tokens, scored on the "
                     "other half):\n\n"
                     + _table(["domain", *cols], [[d, *[v.get(c) for c in cols]] for d, v in vl.items()]))
    cd = (report.get("cross_domain") or {}).get("per_domain") or {}
    if cd:
        rows = [[d, v["n"], v.get("own_only"), v.get("own_with_others"), v.get("excludes_own"), v.get("empty"),
                 ", ".join(f"{r} ({n})" for r, n in v.get("top_routes", [])[:4])] for d, v in cd.items()]
        parts.append("Oracle cross-domain routes (paper 5.1: which stacks lower each prompt's loss most):\n\n"
                     + _table(["domain", "n", "own only", "own + others", "excludes own", "no stack", "top routes"],
                              rows))
    gap = report.get("gap")
    if gap:
        trained, untrained = format_cell(gap.get("trained_domains"), 3), format_cell(gap.get("untrained_domains"), 3)
        parts.append(f"Gap flag (every score at or below the gate): raised for a fraction {trained} "
                     f"of {gap.get('n_trained', 0)} in-domain prompts and {untrained} of "
                     f"{gap.get('n_untrained', 0)} prompts of untrained domains.")
    return parts


# ---------------------------------------------------------------------------------------------- plots
def _loss_curves(run: RunDir) -> dict[str, list[tuple[int, float]]]:
    curves = {}
    for d in run.manifest.domain_order:
        for r in run.manifest.domain(d).rounds:
            pts = [(int(h["step"]), float(h["loss"])) for h in r.train_log if "loss" in h and "step" in h]
            if pts:
                curves[f"{d} r{r.round} ({r.kind}, {r.status})"] = pts
    return curves


def write_report(run_dir: str | os.PathLike, utilization_rows: int = 8, recompute: bool = False,
                 measure_utilization: bool = True) -> Path:
    """Write ``RUN_DIR/report/report.md`` and its plots (see the module docstring); returns the Markdown path."""
    from . import plots

    run = RunDir.open(run_dir)
    out = run.path / REPORT_SUBDIR
    out.mkdir(parents=True, exist_ok=True)
    m = run.manifest
    md = [f"# Brainstacks run report: `{run.path.name}`", "",
          f"Model `{m.config['model']['name_or_path']}` ({m.config['model']['backend']}), domains "
          f"{', '.join(m.domain_order)}; {len(run.stack_identity())} stacks; manifest updated {m.updated}.", ""]

    md += ["## SFT and RL rounds", "", _rounds_section(run), ""]
    curves = _loss_curves(run)
    if curves:
        plots.plot_loss_curves(curves, out / "loss_curves.png", title="training loss per round")
        md += ["![loss curves](loss_curves.png)", ""]
    rl = _rl_section(run)
    md += ["## RL refinement", "", rl or "No RL rounds (`brainstacks rl grpo|dpo CONFIG`).", ""]

    md += ["## Forgetting", ""]
    forgetting = run.path / FORGETTING_FILE
    if forgetting.is_file():
        f = read_json(forgetting)
        plots.plot_forgetting(f["rows"], out / "forgetting.png")
        md += ["```", json.dumps(f.get("summary"), indent=1), "```", "", "![forgetting](forgetting.png)", ""]
    else:
        md += ["No forgetting matrix yet (written by `brainstacks train` after each domain).", ""]

    md += ["## Routing", ""]
    router_report = run.router_dir / "report.json"
    if router_report.is_file():
        rr = read_json(router_report)
        for part in _router_sections(rr):
            md += [part, ""]
        summary = rr.get("test_routes_summary") or {}
        if summary:
            src = list(summary)
            cols = list(next(iter(summary.values()))["mean_score"])
            grid = [[summary[s]["mean_score"].get(c, float("nan")) for c in cols] for s in src]
            plots.plot_matrix(grid, src, cols, out / "routing_heatmap.png",
                              "mean router score: prompt domain (rows) x stack domain")
            md += ["![routing heatmap](routing_heatmap.png)", ""]
    else:
        md += [f"No router yet (`brainstacks router {run.path}`).", ""]

    md += ["## Benchmarks", "", _eval_section(run) or f"No evaluation yet (`brainstacks eval {run.path} --tasks "
                                                        "... --mode base`, then `--mode routed`).", ""]

    md += ["## Three panels: prefix, ungated, routed (paper 5.3)", "", _three_panels_section(run), ""]

    md += ["## Expert utilisation", ""]
    cache = out / UTILIZATION_FILE
    util = None
    if cache.is_file() and not recompute:
        util = read_json(cache)
    elif measure_utilization:
        util = expert_utilization(run, utilization_rows)
        atomic_write_json(cache, util)
    if util and util["domains"]:
        plots.plot_expert_utilization(util["domains"], out / "expert_utilization.png")
        rows = []
        for d, per in util["domains"].items():
            tops = [max(v) for v in per.values()]
            rows.append([d, len(per), sum(tops) / len(tops), min(tops), max(tops)])
        md += [f"Each domain's validation rows ({util['rows_per_domain']}) through its own stacks; share of the most "
               "used expert per projection (1/E balanced, 1/k when the same top-k take every token):", "",
               _table(["domain", "projections", "mean top share", "min", "max"], rows), "",
               "![expert utilisation](expert_utilization.png)", ""]
    else:
        md += ["Not measured (`brainstacks report RUN_DIR` measures it; `--no-utilization` skips it).", ""]
    path = out / "report.md"
    atomic_write_bytes(path, "\n".join(md).encode())
    logger.info("report: %s", path)
    return path
