"""Decode speed with 0, 1, 2, 4 active frozen stacks vs the bare base (issue: Routed inference).

    python benchmarks/bench_decode.py [--new-tokens 48] [--repeats 3] [--threads 2] [--frozen-dtypes float32,bfloat16]

Greedy generation with the KV cache on the embedded SmolLM2 (fp32 on CPU), frozen stacks stored in fp32 and
in bf16. Each configuration is timed interleaved with the base in ``base_only`` mode (hooks attached, no
stacks) in the same process; the ratio is the median over repeats of (tokens/s with stacks) / (tokens/s of
the base run right before it). The bare base without hooks is timed at the start and at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from brainstacks_hooks import BrainStacks, StackConfig
from brainstacks_hooks.data.formatting import format_prompt
from brainstacks_hooks.models.loading import load_base_model

PROMPT = "Write a Python function that reverses a string."


def tokens_per_s(model, enc, new_tokens: int, pad: int) -> float:
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=pad)
    n = out.shape[1] - enc["input_ids"].shape[1]
    return n / (time.perf_counter() - t)


def build_stacks(model, n: int, frozen_dtype: str) -> BrainStacks:
    """Attach and freeze ``n`` stacks with random (non-zero) B, so they really compute."""
    stacks = BrainStacks.attach(model, StackConfig(frozen_dtype=frozen_dtype))
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        stacks.new_stack(f"d{i}")
        with torch.no_grad():
            for _, m in stacks.active.items():
                m.B.copy_(torch.randn(m.B.shape, generator=gen) * 0.01)
        stacks.freeze_active()
    return stacks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--counts", default="0,1,2,4")
    ap.add_argument("--frozen-dtypes", default="float32,bfloat16", help="storage dtypes of the frozen stacks")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_base_model("smollm2-135m-instruct", dtype="float32")
    model.eval()
    enc = tok([format_prompt(tok, PROMPT)], return_tensors="pt", add_special_tokens=False)
    counts = [int(c) for c in args.counts.split(",")]
    print(f"torch threads: {torch.get_num_threads()}, new tokens: {args.new_tokens}, repeats: {args.repeats}, "
          f"load average at start: {os.getloadavg()[0]:.2f}")
    tokens_per_s(model, enc, 4, tok.pad_token_id)  # warm-up
    raw = statistics.median(tokens_per_s(model, enc, args.new_tokens, tok.pad_token_id) for _ in range(args.repeats))
    print(f"bare base without hooks, at the start: {raw:.1f} tok/s")
    print(f"{'frozen dtype':>12} {'active stacks':>13} {'tok/s':>8} {'base tok/s':>10} {'ratio':>6}")
    for frozen_dtype in args.frozen_dtypes.split(","):
        stacks = build_stacks(model, max(counts), frozen_dtype)
        for n in counts:
            ratios, speeds, bases = [], [], []
            for _ in range(args.repeats):
                with stacks.base_only():  # reference right before each variant run: hooks on, no stacks
                    base = tokens_per_s(model, enc, args.new_tokens, tok.pad_token_id)
                with stacks.routed({f"d{i}": 1.0 for i in range(n)}):
                    speed = tokens_per_s(model, enc, args.new_tokens, tok.pad_token_id)
                ratios.append(speed / base)
                speeds.append(speed)
                bases.append(base)
            print(f"{frozen_dtype:>12} {n:>13} {statistics.median(speeds):>8.1f} {statistics.median(bases):>10.1f} "
                  f"{statistics.median(ratios):>6.2f}", flush=True)
        stacks.detach()
    raw_end = statistics.median(tokens_per_s(model, enc, args.new_tokens, tok.pad_token_id)
                                for _ in range(args.repeats))
    print(f"bare base without hooks, at the end: {raw_end:.1f} tok/s")
    print("ratio = median over repeats of (tok/s with the stacks) / (tok/s in base_only mode right before it);")
    print("base_only runs the 210 hooks with nothing to add: compare its tok/s with the bare base lines")


if __name__ == "__main__":
    main()
