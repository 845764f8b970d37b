"""Null space vs no null space (paper 4.2.2): markdown tables from two finished SFT runs.

    brainstacks train quickstart_cpu output_dir=runs/quickstart
    brainstacks train quickstart_cpu null_space.enabled=false output_dir=runs/quickstart_nons
    python recipes/experiments/ns_vs_nons.py runs/quickstart runs/quickstart_nons

Prints, for each run, the per-round validation losses with acceptance decisions and wall times, the
forgetting matrix in prefix / isolated / ungated modes, and the NS vs NoNS comparison of every domain's
loss after each later domain.
"""

from __future__ import annotations

import json
import sys

from brainstacks_hooks.run_dir import RunDir


def load(run_dir: str) -> dict:
    return RunDir.open(run_dir).manifest.to_dict()


def rounds_table(m: dict) -> str:
    out = ["| domain | baseline | round: best val (decision, stop, steps, time) | final prefix loss | wall time |",
           "|---|---:|---|---:|---:|"]
    for name in m["domain_order"]:
        d = m["domains"].get(name, {})
        cells = [f"r{r['round']}: {r['best_val_loss']:.4f} ({r['status']}, {r['stop_reason']}, {r['steps']} steps, "
                 f"{r['wall_time_s']:.0f}s)" for r in d.get("rounds", [])]
        final = d.get("final_prefix_loss")
        out.append(f"| {name} | {d.get('baseline_loss', float('nan')):.4f} | {'<br>'.join(cells)} | "
                   f"{'-' if final is None else f'{final:.4f}'} | {d.get('wall_time_s', 0):.0f}s |")
    return "\n".join(out)


def forgetting_table(m: dict) -> str:
    rows = m.get("forgetting", [])
    afters = [r["after"] for r in rows]
    out = ["| domain | mode | " + " | ".join(f"after {a}" for a in afters) + " |",
           "|---|---|" + "---:|" * len(afters)]
    for name in m["domain_order"]:
        for mode in ("prefix", "isolated", "ungated"):
            vals = [r["losses"].get(name, {}).get(mode) for r in rows]
            out.append(f"| {name} | {mode} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in vals) + " |")
    s = m.get("forgetting_summary", {})
    if s:
        bwt = {k: (None if v is None else round(v, 4)) for k, v in s["backward_transfer"].items()}
        out.append(f"\nmax |prefix loss now - recorded at training time| = {s['max_prefix_drift']:.2e}; "
                   f"backward transfer: {json.dumps(bwt)}")
    return "\n".join(out)


def comparison(ns: dict, nons: dict, mode: str = "ungated") -> str:
    rows_ns = {r["after"]: r["losses"] for r in ns.get("forgetting", [])}
    rows_no = {r["after"]: r["losses"] for r in nons.get("forgetting", [])}
    afters = [a for a in ns["domain_order"] if a in rows_ns and a in rows_no]
    out = [f"| domain ({mode}) | " + " | ".join(f"after {a}: NoNS / NS (delta)" for a in afters) + " |",
           "|---|" + "---|" * len(afters)]
    for name in ns["domain_order"]:
        cells = []
        for a in afters:
            x, y = rows_no[a].get(name, {}).get(mode), rows_ns[a].get(name, {}).get(mode)
            cells.append("-" if x is None or y is None else f"{x:.4f} / {y:.4f} ({y - x:+.4f})")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(ns_dir: str, nons_dir: str) -> None:
    ns, nons = load(ns_dir), load(nons_dir)
    for label, m, d in (("with null space", ns, ns_dir), ("without null space", nons, nons_dir)):
        print(f"### {label} (`{d}`)\n\n{rounds_table(m)}\n\n{forgetting_table(m)}\n")
        cap = m.get("null_space_capacity")
        if cap:
            vals = sorted(cap.values())
            print(f"null-space capacity used per projection: {vals[0]:.3f} to {vals[-1]:.3f} of the output dimension\n")
    for mode in ("ungated", "prefix"):
        print(f"### NS vs NoNS, {mode} mode\n\n{comparison(ns, nons, mode)}\n")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
