"""Forward (eval, no grad) with 0, 2, 5, 10 frozen MoE-LoRA stacks vs the bare base model, on the embedded SmolLM2.

Every variant is a copy of the same model that shares the base weights (only the modules and hooks are
copied), so all variants live in this process; each run of a variant is timed between two runs of the bare
base model and its ratio taken against them (see ``_common.py``):

* ``base``: the model with no hooks at all;
* ``hooks, 0 stacks``: BrainStacks attached, no stack (the hook returns at once);
* ``N grouped`` / ``N per-stack``: N frozen stacks (4 experts x r16, random non-zero B), with
  ``StackConfig.group_frozen`` True (one grouped matmul pair per projection) or False (one module per stack);
* ``N sparse``: grouped with ``StackConfig.frozen_compute="sparse"`` (the B side over the top-k experts only,
  ``torch._grouped_mm`` + scatter-add; its own copy of the stacks so the dense pools are not rebuilt);
* ``N grouped, bf16 stacks``: as above with ``frozen_dtype="bfloat16"`` (stacks stored and computed in bf16,
  the paper's half-precision frozen stacks), for the largest N and 5.

Run in float32 and under bfloat16 autocast. Batch ``--batch`` x ``--seq`` tokens.

    python benchmarks/bench_frozen_forward.py            # full run (batch 4 x 256)
    python benchmarks/bench_frozen_forward.py --quick    # CI-sized smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (
    bracketed,
    load_model,
    macs_per_token,
    make_batch,
    print_header,
    summary,
    table,
)

from brainstacks_hooks import BrainStacks, StackConfig

TARGET_N, TARGET = 5, 1.5
DTYPES = ("fp32", "bf16")


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of the module tree that shares every parameter and buffer with ``model``."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def with_frozen_stacks(base: torch.nn.Module, n: int, frozen_dtype: str, seed: int = 0):
    """A shared copy of ``base`` with BrainStacks attached and ``n`` frozen stacks with random non-zero B."""
    model = shared_copy(base)
    stacks = BrainStacks.attach(model, StackConfig(frozen_dtype=frozen_dtype))
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        stacks.new_stack(f"d{i}")
        with torch.no_grad():
            for _, m in stacks.active.items():
                m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.02)
                m.router.copy_(torch.randn(m.router.shape, generator=g))
        stacks.freeze_active()
    model.eval()
    return model, stacks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--counts", default="2,5,10", help="comma list of frozen-stack counts (0 is always run)")
    p.add_argument("--steps", type=int, default=2, help="timed forwards per variant and repetition")
    p.add_argument("--repeats", type=int, default=5, help="repetitions (the median ratio is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards per variant before the repetitions")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32 (float32) and bf16 (bf16 autocast)")
    p.add_argument("--no-bf16-stacks", action="store_true", help="skip the frozen_dtype=bfloat16 variants")
    p.add_argument("--no-sparse", action="store_true", help="skip the frozen_compute=sparse variants")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="CI-sized: batch 1 x 32 tokens, counts 2,5, 1 step, 2 repeats")
    args = p.parse_args()
    if args.quick:
        args.batch, args.seq, args.counts, args.steps, args.repeats = 1, 32, "2,5", 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = sorted({int(c) for c in args.counts.split(",") if c.strip()} - {0})
    dtypes = [d for d in args.dtypes.split(",") if d]
    if not set(dtypes) <= set(DTYPES):
        p.error(f"--dtypes must be a comma list of {DTYPES}")

    print_header("Forward with N frozen stacks vs the bare base model", args)
    base, _ = load_model()
    batch = make_batch(base.config.vocab_size, args.batch, args.seq)
    batch.pop("labels")
    macs = macs_per_token(base, args.seq)
    share = macs["stack_eval"] / macs["base"]
    print(f"multiply-accumulates per token: base {macs['base'] / 1e6:.1f}M "
          f"(projections {macs['projections'] / 1e6:.1f}M), "
          f"one frozen stack {macs['stack_eval'] / 1e6:.1f}M = {100 * share:.1f}% of the base")
    models: dict[str, tuple[torch.nn.Module, BrainStacks | None, bool]] = {"base": (base, None, True)}
    models["hooks, 0 stacks"] = (*with_frozen_stacks(base, 0, "auto"), True)
    for n in counts:
        model, stacks = with_frozen_stacks(base, n, "auto")
        models[f"{n} grouped"] = (model, stacks, True)
        models[f"{n} per-stack"] = (model, stacks, False)
        if not args.no_sparse:
            model, stacks = with_frozen_stacks(base, n, "auto")
            stacks.config.frozen_compute = "sparse"
            models[f"{n} sparse"] = (model, stacks, True)
    if not args.no_bf16_stacks:
        for n in sorted({c for c in counts if c in (TARGET_N, max(counts))}):
            models[f"{n} grouped, bf16 stacks"] = (*with_frozen_stacks(base, n, "bfloat16"), True)
    some = next((s for _, s, _ in models.values() if s is not None and s.frozen_stacks), None)
    if some is not None:
        st = some.frozen_stacks[0]
        print(f"one frozen stack: {st.num_parameters():,} parameters, {st.nbytes() / 2**20:.1f} MiB ({st.dtype})")

    def forward_fn(name: str, dtype: str):
        model, stacks, group = models[name]

        def run() -> None:
            if stacks is not None:
                stacks.config.group_frozen = group
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
            with torch.no_grad(), ctx:
                model(**batch, use_cache=False)

        return run

    verdicts = []
    for dt in dtypes:
        base_fn = forward_fn("base", dt)
        fns = {name: forward_fn(name, dt) for name in models if name != "base"}
        for fn in [base_fn, *fns.values()]:  # warm-up: allocator, grouped weights, autocast
            for _ in range(args.warmup):
                fn()
        print(f"\ntiming {dt}: {args.repeats} repetitions x {args.steps} forwards, each variant between two base runs")
        base_times, times, ratios = bracketed(base_fn, fns, args.repeats, args.steps, label="base")
        rows = [["base (no hooks)", f"{statistics.median(base_times):.3f}", "1", "1", "1"]]
        for name in fns:
            med, lo, hi = summary(ratios[name])
            n = int(name.split()[0]) if name[0].isdigit() else 0
            rows.append([name, f"{statistics.median(times[name]):.3f}", f"**{med:.3f}x** ({lo:.2f}-{hi:.2f})",
                         f"{min(times[name]) / min(base_times):.3f}x", f"{1 + n * share:.2f}x"])
        print(f"\nForward of {args.batch} x {args.seq} tokens, {dt}:\n")
        print(table(rows, ["variant", "s (median)", "vs base: median ratio (min-max)", "ratio of min times",
                           "MAC ratio"]))
        for n in counts:
            g, u = ratios[f"{n} grouped"], ratios[f"{n} per-stack"]
            med = statistics.median(a / b for a, b in zip(g, u))
            verdicts.append(f"{dt}: {n} stacks grouped / per-stack = {med:.3f}x")
        for name in (f"{TARGET_N} grouped", f"{TARGET_N} grouped, bf16 stacks"):
            if name in ratios:
                med = statistics.median(ratios[name])
                verdicts.append(f"{dt}: {name} = {med:.3f}x base (target <= {TARGET}x: "
                                f"{'met' if med <= TARGET else 'MISSED'})")
    print("\n" + "\n".join(verdicts))


if __name__ == "__main__":
    main()
