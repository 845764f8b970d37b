"""Serving under mixed traffic (issue: serving speed): route-switch cost and a stream of routed prompts.

    python benchmarks/bench_serving.py RUN_DIR [--parts switch,traffic] [--prompts 24] [--new-tokens 16]

RUN_DIR is a finished quickstart with its router (``runs/quickstart`` after ``make quickstart``). The stacks are
served the way :class:`~brainstacks_hooks.inference.routed_model.RoutedModel` serves them (a
:class:`~brainstacks_hooks.inference.store.StackStore` on the run's ``stacks/``, budget ``auto``). Two variants of
the frozen compute are measured side by side in this one process:

* ``pool``: the default; stacks stay in resident pool slots, a switch between cached routes copies nothing.
* ``copy on switch``: the pools are cleared whenever the route's stack set changes, so the first forward copies
  every stack of the new route per projection: the work the earlier design (a grouped copy per route,
  concatenated on the first forward after a switch) did on every switch.

**switch**: one held-out prompt of about ``--switch-tokens`` (45) tokens; for each transition A -> B, route A is
activated and run twice, then B is activated and its first forward timed, then three more forwards of B
(steady). The ratio first / steady is reported (median over ``--repeats``; target <= 1.1).

**traffic**: held-out prompts (``rows/router_test``, all domains interleaved) routed by the run's router and served
one at a time (route, activate, greedy generation of exactly ``--new-tokens`` tokens), in stream order (routes
switch as the router decides) and sorted by route (an oracle that switches once per distinct route), plus the
base model on the same prompts and mixed-route batches of ``--batch`` prompts. Tokens/s and latency percentiles.
The generations of ``pool`` and ``copy on switch`` are compared token for token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

from _common import heldout_prompts, print_header, table

from brainstacks_hooks.data.formatting import encode_prompt_batch
from brainstacks_hooks.inference.routed_model import GenerationSettings, RoutedModel
from brainstacks_hooks.run_dir import RunDir


def _route_key(w: dict[str, float]) -> str:
    return json.dumps(sorted(w.items()))


def bench_switch(rm: RoutedModel, prompt: str, repeats: int) -> list[list[str]]:
    domains = rm.store.domains
    d0, d_last = domains[0], domains[-1]
    all_on = {d: 1.0 for d in domains}
    reweighted = {d: 0.3 + 0.6 * i / max(1, len(domains) - 1) for i, d in enumerate(domains)}
    transitions = [("base -> all", {}, all_on), (f"{d0} -> all", {d0: 1.0}, all_on),
                   (f"all -> {d0}", all_on, {d0: 1.0}), (f"{d0} -> {d_last}", {d0: 1.0}, {d_last: 1.0}),
                   ("all -> all, weights only", all_on, reweighted)]
    enc = encode_prompt_batch(rm.tokenizer, [prompt])
    stacks, store = rm.stacks, rm.store

    def forward() -> float:
        t0 = time.perf_counter()
        rm.model(**enc)
        return time.perf_counter() - t0

    for _, a, b in transitions:  # every stack cached, every pool slot written once
        for w in (a, b):
            store.activate(w)
            forward()
    rows = []
    with torch.no_grad():
        for name, a, b in transitions:
            ratios: dict[str, list[float]] = {"pool": [], "copy on switch": []}
            firsts: dict[str, list[float]] = {"pool": [], "copy on switch": []}
            for _ in range(repeats):
                for variant in ratios:
                    store.activate(a)
                    forward()
                    forward()
                    t0 = time.perf_counter()
                    store.activate(b)
                    if variant == "copy on switch" and set(a) != set(b):
                        stacks.clear_group_cache()
                    first = time.perf_counter() - t0 + forward()
                    steady = statistics.median([forward() for _ in range(3)])
                    ratios[variant].append(first / steady)
                    firsts[variant].append(first * 1000)
            rows.append([name] + [f"{statistics.median(firsts[v]):.0f} ms / **{statistics.median(ratios[v]):.2f}x**"
                                  for v in ratios])
    return rows


def _serve(rm: RoutedModel, prompts: list[str], settings: GenerationSettings, switch_sets: list[bool] | None = None,
           mode: str = "routed") -> tuple[list[float], list[str], int]:
    """Serve ``prompts`` one at a time; ``switch_sets[i]``: clear the pools first (copy-on-switch variant)."""
    latencies, texts, tokens = [], [], 0
    for i, p in enumerate(prompts):
        if switch_sets is not None and switch_sets[i]:
            rm.stacks.clear_group_cache()
        t0 = time.perf_counter()
        g = rm.generate(p, mode, settings)[0]
        latencies.append(time.perf_counter() - t0)
        texts.append(g.text)
        tokens += g.new_tokens
    return latencies, texts, tokens


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def bench_traffic(rm: RoutedModel, prompts: list[str], new_tokens: int, batch: int) -> list[list[str]]:
    settings = GenerationSettings(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    routes = [r.weights for r in rm.route(prompts)]
    order = sorted(range(len(prompts)), key=lambda i: _route_key(routes[i]))
    switches = sum(1 for a, b in itertools.pairwise(routes) if set(a) != set(b))
    for p in prompts[:4]:  # warm-up (the first generations of a process are several times slower)
        rm.generate(p, "base", settings)
        rm.generate(p, "routed", settings)
    results = {}
    with torch.no_grad():
        results["base model (no stacks)"] = _serve(rm, prompts, settings, mode="base")
        results["routed, stream order, pool"] = _serve(rm, prompts, settings)
        changed = [True] + [set(a) != set(b) for a, b in itertools.pairwise(routes)]
        results["routed, stream order, copy on switch"] = _serve(rm, prompts, settings, changed)
        results["routed, sorted by route (oracle: no switches)"] = _serve(rm, [prompts[i] for i in order], settings)
        lat, tok = [], 0
        for i in range(0, len(prompts), batch):
            t0 = time.perf_counter()
            gens = rm.generate(prompts[i : i + batch], "routed", settings, mixed_batches=True)
            lat += [time.perf_counter() - t0] * len(gens)
            tok += sum(g.new_tokens for g in gens)
        results[f"routed, mixed-route batches of {batch}"] = (lat, [], tok)
    base_tps = None
    rows = []
    for name, (lat, _, tok) in results.items():
        wall = sum(lat) if "batches" not in name else sum(lat[::batch])
        tps = tok / wall
        base_tps = base_tps or tps
        rows.append([name, f"{tps:.2f}", f"{tps / base_tps:.2f}", f"{1000 * _pct(lat, 0.5):.0f}",
                     f"{1000 * _pct(lat, 0.9):.0f}"])
    same = results["routed, stream order, pool"][1] == results["routed, stream order, copy on switch"][1]
    rows.append([f"prompts {len(prompts)}, distinct routes {len({_route_key(r) for r in routes})}, "
                 f"stack-set switches in stream order {switches}; pool == copy-on-switch outputs: {same}",
                 "", "", "", ""])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--parts", default="switch,traffic")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--switch-tokens", type=int, default=45, help="prompt length of the switch part")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print_header("Serving under mixed traffic: route switches and a routed stream", args)
    run = RunDir.open(args.run_dir)
    rm = RoutedModel.from_run(run, require_router=True)
    prompts = heldout_prompts(run, rm.store.domains, args.prompts)
    parts = set(args.parts.split(","))
    if "switch" in parts:  # the held-out prompt whose encoding is closest to --switch-tokens
        lengths = [encode_prompt_batch(rm.tokenizer, [p])["input_ids"].shape[1] for p in prompts]
        best = min(range(len(prompts)), key=lambda i: abs(lengths[i] - args.switch_tokens))
        n_tok = lengths[best]
        print(table(bench_switch(rm, prompts[best], args.repeats),
                    [f"transition ({n_tok}-token prompt): first forward", "pool: ms / first / steady",
                     "copy on switch: ms / first / steady"]))
        print()
    if "traffic" in parts:
        print(table(bench_traffic(rm, prompts, args.new_tokens, args.batch),
                    ["served one prompt at a time", "tokens/s", "vs base", "latency p50 ms", "latency p90 ms"]))


if __name__ == "__main__":
    main()
