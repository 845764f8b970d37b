"""Mixed-route batches (issue: router that routes): oracle throughput and routed generation of a mixed batch.

    python benchmarks/bench_mixed_routes.py RUN_DIR [--oracle-examples 9] [--prompts 6] [--new-tokens 32]

RUN_DIR is a finished quickstart with its router (``runs/quickstart`` after ``make quickstart``). Everything is
measured side by side in this one process, alternating the two variants twice:

* **Oracle**: the same oracle examples (``rows/router_train``, the first of each domain, no cache) through
  :func:`~brainstacks_hooks.router.oracle.run_oracle_on_stacks` with mixed-route batches (every candidate route of
  an example in one forward, ``oracle_batch_size`` rows) vs the per-route path (one forward per route over a
  batch of examples). Examples per minute and the ratio new / old.
* **Routed generation**: held-out test prompts (``rows/router_test``) routed by the run's router, generated in one
  left-padded batch where every row runs its own route (``stacks.routed_rows``) vs the same batch with one
  shared route (the union of the routes): tokens/s and the ratio mixed / shared (target >= 0.8).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import heldout_prompts, print_header, table

from brainstacks_hooks.data.formatting import encode_prompt_batch
from brainstacks_hooks.inference.routed_model import RoutedModel
from brainstacks_hooks.router.config import RouterConfig
from brainstacks_hooks.router.examples import _single_example
from brainstacks_hooks.router.oracle import run_oracle_on_stacks
from brainstacks_hooks.router.serialization import read_router_meta
from brainstacks_hooks.run_dir import ROUTER_TRAIN, RunDir


def bench_oracle(run: RunDir, n: int, repeats: int) -> list[list[str]]:
    model, tok = run.load_base()
    stacks = run.open_stacks(model)
    rc = RouterConfig.from_dict(dict(read_router_meta(run.router_dir)["router_config"]))
    rows = run.rows_by_domain(ROUTER_TRAIN)
    per = max(1, n // len(stacks.domains))
    examples = [_single_example(d, r) for d in stacks.domains for r in rows.get(d, [])[:per]]
    speeds: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeats):
        for mixed in (True, False):
            t0 = time.perf_counter()
            res = run_oracle_on_stacks(stacks, tok, examples, rc, cache_dir=None, progress=False,
                                       bf16=run.run_config().train.bf16, mixed_batches=mixed)
            speeds[mixed].append(res.n_computed / (time.perf_counter() - t0) * 60)
    new, old = statistics.median(speeds[True]), statistics.median(speeds[False])
    stacks.detach()
    return [["oracle examples/min (mixed-route batches)", f"{new:.1f}"],
            ["oracle examples/min (one forward per route)", f"{old:.1f}"],
            ["ratio new / old", f"{new / old:.2f}"], ["examples", str(len(examples))],
            ["rows per forward (oracle_batch_size)", str(rc.oracle_batch_size)]]


def bench_generation(run: RunDir, n: int, new_tokens: int, repeats: int) -> list[list[str]]:
    rm = RoutedModel.from_run(run, require_router=True)
    prompts = heldout_prompts(run, rm.store.domains, n)
    routes = [r.weights for r in rm.route(prompts)]
    union: dict[str, float] = {}
    for w in routes:
        for d, v in w.items():
            union[d] = max(union.get(d, 0.0), v)
    rm.store.activate(union, set_mode=False)
    enc = encode_prompt_batch(rm.tokenizer, prompts)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=rm.tokenizer.pad_token_id)
    tps: dict[str, list[float]] = {"mixed": [], "shared": []}
    with torch.no_grad():
        for _ in range(repeats):
            for name in ("mixed", "shared"):
                ctx = rm.stacks.routed_rows(routes) if name == "mixed" else rm.stacks.routed(union)
                with ctx:
                    t0 = time.perf_counter()
                    rm.model.generate(**enc, **kw)
                    tps[name].append(len(prompts) * new_tokens / (time.perf_counter() - t0))
    mixed, shared = statistics.median(tps["mixed"]), statistics.median(tps["shared"])
    n_routes = len({tuple(sorted(w.items())) for w in routes})
    return [["tokens/s, batch of mixed routes", f"{mixed:.1f}"], ["tokens/s, same batch, one shared route",
            f"{shared:.1f}"], ["ratio mixed / shared", f"{mixed / shared:.2f}"],
            ["prompts / distinct routes / new tokens", f"{len(prompts)} / {n_routes} / {new_tokens}"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--oracle-examples", type=int, default=9)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print_header("Mixed-route batches: oracle throughput and routed generation", args)
    run = RunDir.open(args.run_dir)
    print(table(bench_oracle(run, args.oracle_examples, args.repeats), ["oracle", "value"]))
    print()
    print(table(bench_generation(run, args.prompts, args.new_tokens, args.repeats), ["routed generation", "value"]))


if __name__ == "__main__":
    main()
