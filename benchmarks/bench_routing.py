"""Router overhead as a share of a routed generation (issue: Routed inference; target under 2 %).

    python benchmarks/bench_routing.py RUN_DIR [--new-tokens 32,128] [--repeats 3] [--threads N]

RUN_DIR is a finished quickstart (or any run with ``router/``), e.g. ``runs/quickstart`` after
``make quickstart``. Each of the paper's five sample prompts is generated one at a time through
:class:`~brainstacks_hooks.inference.routed_model.RoutedModel` in ``routed`` mode, greedy, with exactly
``--new-tokens`` new tokens (``min_new_tokens`` = ``max_new_tokens``). The explain timings split every
call into routing (``route_ms``: tokenisation, base-only features, router forward and gating), stack
activation (cache hits after the first call) and generation; the share is routing / (routing +
activation + generation), per prompt, and the median over prompts and repeats is reported for every
length in the same process. A ``base`` mode generation of the same prompts (hooks attached, no stacks)
is timed next to it for the decode speed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_header, table

from brainstacks_hooks.inference.routed_model import GenerationSettings, RoutedModel
from brainstacks_hooks.quickstart import PAPER_PROMPTS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--new-tokens", default="32,128")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print_header("Router overhead in routed generation", args)
    rm = RoutedModel.from_run(args.run_dir, require_router=True)
    lengths = [int(x) for x in args.new_tokens.split(",")]
    rm.generate(PAPER_PROMPTS[0], "routed", GenerationSettings(max_new_tokens=4))  # warm-up (loads stacks)

    rows = []
    for n in lengths:
        s = GenerationSettings(max_new_tokens=n, min_new_tokens=n)
        shares, route_ms, gen_ms, routed_tps, base_tps = [], [], [], [], []
        for _ in range(args.repeats):
            for prompt in PAPER_PROMPTS:
                (g,) = rm.generate(prompt, "routed", s)
                t = g.explain.timings
                routing = t["route_ms"]  # wall time of RoutedModel.route: tokenise, features, router, gating
                total = routing + t["load_ms"] + t["generate_ms"]
                shares.append(routing / total)
                route_ms.append(routing)
                gen_ms.append(t["generate_ms"])
                routed_tps.append(g.new_tokens / (t["generate_ms"] / 1000))
                (b,) = rm.generate(prompt, "base", s)
                base_tps.append(b.new_tokens / (b.explain.timings["generate_ms"] / 1000))
        rows.append([str(n), f"{statistics.median(route_ms):.0f}", f"{statistics.median(gen_ms):.0f}",
                     f"{100 * statistics.median(shares):.2f} % ({100 * min(shares):.2f}-{100 * max(shares):.2f})",
                     f"{statistics.median(routed_tps):.1f}", f"{statistics.median(base_tps):.1f}"])
        print(f"new tokens {n}: routing share median {100 * statistics.median(shares):.2f} %", flush=True)
    print()
    print(table(rows, ["new tokens", "routing ms", "generation ms", "routing share (min-max)",
                       "routed tok/s", "base tok/s"]))
    print(f"\nroute timings keys of the last call: {sorted(g.explain.timings)}")
    print(f"store: {rm.store.stats()}")


if __name__ == "__main__":
    main()
