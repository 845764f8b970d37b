"""The three-panel result (paper 5.3): prefix vs ungated vs routed, as held-out loss and as generations.

    python recipes/experiments/three_panels.py runs/quickstart --new-tokens 48
    python recipes/experiments/three_panels.py runs/quickstart --losses recompute --rows 20 \\
        --prompts "Write a Python function that reverses a string." "What is 12 * 7?"

Needs a finished run with a router (``brainstacks router RUN_DIR`` / ``make quickstart``). Loss panel: each
trained domain's completion loss on held-out ``rows/router_test`` rows in prefix (the domain under the stacks
up to itself), ungated and routed mode, with base beside them; by default the loss table the router pipeline
recorded in ``router/report.json``, ``--losses recompute`` measures it again on ``--rows`` rows per domain.
Generation panel: greedy generations for fixed prompts (the paper's five by default) in ``prefix:D`` (``D``:
``--prefix-domain``, default the first trained domain), ungated and routed. Prints the tables and writes
``RUN_DIR/experiments/three_panels.{json,md,png}`` (``brainstacks report`` shows them).
"""

from __future__ import annotations

import argparse
import sys
import time

from brainstacks_hooks.errors import BrainstacksError
from brainstacks_hooks.evaluation.three_panels import LOSS_SOURCES, panels_markdown, write_three_panels
from brainstacks_hooks.utils.io import read_json


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--prompts", nargs="+", default=None, help="generation prompts (default: the paper's five)")
    ap.add_argument("--new-tokens", type=int, default=48, help="greedy tokens per generation")
    ap.add_argument("--losses", choices=LOSS_SOURCES, default="auto",
                    help="loss panel from the router report (auto: when it has the table) or recomputed")
    ap.add_argument("--rows", type=int, default=20, help="held-out rows per domain when the losses are recomputed")
    ap.add_argument("--prefix-domain", default=None, help="domain of the prefix generations (default: the first)")
    ap.add_argument("--out-dir", default=None, help="output folder (default: RUN_DIR/experiments)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    try:
        paths = write_three_panels(args.run_dir, out_dir=args.out_dir, prompts=args.prompts,
                                   new_tokens=args.new_tokens, losses=args.losses, rows_per_domain=args.rows,
                                   prefix_domain=args.prefix_domain)
    except BrainstacksError as e:  # a user error: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(panels_markdown(read_json(paths["json"])))
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
