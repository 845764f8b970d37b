"""``brainstacks eval``: lm-evaluation-harness benchmarks of a run under one mode, with the delta to ``base``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory (manifest.json, stacks/, router/ for --mode routed)")
    p.add_argument("--tasks", required=True,
                   help="comma-separated task names, e.g. bs_arc_easy,bs_gsm8k ('all': every shipped task)")
    p.add_argument("--mode", default="routed", help="routed | base | ungated | prefix:DOMAIN | isolated:DOMAIN")
    p.add_argument("--limit", type=float, default=None,
                   help="seeded subset per task: N documents (or a fraction < 1); default: every document")
    p.add_argument("--seed", type=int, default=1234, help="seed of the --limit subset and of the evaluation")
    p.add_argument("--data-dir", default=None, help="directory holding eval/*.jsonl (default: $BRAINSTACKS_DATA_DIR)")
    p.add_argument("--batch-size", type=int, default=8, help="fixed lm-eval batch size (never auto)")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest input in tokens (default: min(2048, the model's max positions))")
    p.add_argument("--out-dir", default=None, help="output folder (default: RUN_DIR/eval/<mode>)")
    p.add_argument("--grouped-routes", action="store_true",
                   help="routed mode: one lm-eval pass per distinct route instead of mixed-route batches "
                        "(each batch row under its own request's route)")


def _task_list(text: str) -> list[str]:
    from ..evaluation.tasks import TASK_NAMES

    names = [t.strip() for t in text.split(",") if t.strip()]
    return list(TASK_NAMES) if names == ["all"] else names


def _base_record(out_dir: Path, mode: str) -> dict[str, Any] | None:
    """The ``results.json`` of ``base`` mode next to ``out_dir`` (``RUN_DIR/eval/base`` by default), if any."""
    path = out_dir.parent / "base" / "results.json"
    if mode == "base" or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def summary_table(metrics: dict[str, dict[str, dict[str, Any]]], base: dict[str, Any] | None = None) -> str:
    """``task | metric | value | stderr [| base | delta]`` as an aligned text table."""
    head = ["task", "metric", "value", "stderr"] + (["base", "delta"] if base is not None else [])
    rows = [head]
    for task, per in metrics.items():
        for metric, m in per.items():
            row = [task, metric, _fmt(m.get("value")), _fmt(m.get("stderr"))]
            if base is not None:
                b = ((base.get(task) or {}).get(metric) or {}).get("value")
                v = m.get("value")
                row += [_fmt(b), _fmt(v - b if v is not None and b is not None else None, signed=True)]
            rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _eval(args: argparse.Namespace) -> int:
    from ..evaluation.harness import evaluate_run

    limit: float | int | None = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    record = evaluate_run(args.run_dir, _task_list(args.tasks), args.mode, limit=limit, data_dir=args.data_dir,
                          batch_size=args.batch_size, seed=args.seed, out_dir=args.out_dir,
                          max_length=args.max_length, mixed_batches=not args.grouped_routes)
    from ..utils.distributed import is_main_process

    if not is_main_process():  # torchrun / accelerate launch: the main process reports
        return 0
    out = Path(args.out_dir) if args.out_dir else Path(args.run_dir) / "eval" / args.mode.replace(":", "-")
    base_record = _base_record(out, args.mode)
    base = base_record.get("metrics") if base_record else None
    print(f"\nmode {args.mode}" + (f", seeded subset --limit {limit} (seed {args.seed})" if limit else ""))
    print(summary_table(record["metrics"], base))
    if base_record is not None:
        shared = [t for t in record["tasks"] if t in (base_record.get("metrics") or {})]
        same_docs = all((record.get("samples") or {}).get(t) == (base_record.get("samples") or {}).get(t)
                        for t in shared)
        if not same_docs:
            print("note: base was evaluated on other documents (another --limit or --seed): the delta mixes subsets")
    print(f"\nresults: {out / 'results.json'}" + ("" if base is not None or args.mode == "base"
                                                   else "   (run --mode base for the delta to base)"))
    return 0


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory (any phase: the report says what is missing)")
    p.add_argument("--utilization-rows", type=int, default=8, help="validation rows per domain for expert utilisation")
    p.add_argument("--recompute", action="store_true", help="measure the expert utilisation again (else cached)")
    p.add_argument("--no-utilization", action="store_true", help="skip the expert utilisation (no model load)")


def _report(args: argparse.Namespace) -> int:
    from ..evaluation.report import write_report

    path = write_report(args.run_dir, utilization_rows=args.utilization_rows, recompute=args.recompute,
                        measure_utilization=not args.no_utilization)
    print(f"report: {path}")
    return 0
