"""Decode speed with 0, 1, 2, 4 active frozen stacks vs the bare base (issue: Routed inference).

    python benchmarks/bench_decode.py [--new-tokens 48] [--repeats 3] [--threads 2]

Greedy generation with the KV cache on the embedded SmolLM2 (fp32 on CPU). Each configuration is timed
interleaved with the bare base (hooks detached) in the same process, and the ratio is the median over
repeats of (tokens/s with stacks) / (tokens/s of the base measured right before it).
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--counts", default="0,1,2,4")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_base_model("smollm2-135m-instruct", dtype="float32")
    model.eval()
    enc = tok([format_prompt(tok, PROMPT)], return_tensors="pt", add_special_tokens=False)
    counts = [int(c) for c in args.counts.split(",")]
    # stacks with non-zero B (random, frozen) so they really compute
    stacks = BrainStacks.attach(model, StackConfig())
    gen = torch.Generator().manual_seed(0)
    for i in range(max(counts)):
        stacks.new_stack(f"d{i}")
        with torch.no_grad():
            for _, m in stacks.active.items():
                m.B.copy_(torch.randn(m.B.shape, generator=gen) * 0.01)
        stacks.freeze_active()
    print(f"torch threads: {torch.get_num_threads()}, new tokens: {args.new_tokens}, repeats: {args.repeats}")
    print(f"{'active stacks':>13} {'tok/s':>8} {'base tok/s':>10} {'ratio':>6}")
    tokens_per_s(model, enc, 4, tok.pad_token_id)  # warm-up
    for n in counts:
        ratios, speeds, bases = [], [], []
        for _ in range(args.repeats):
            with stacks.base_only():
                stacks.check_bypass = False
                base = tokens_per_s(model, enc, args.new_tokens, tok.pad_token_id)
            weights = {f"d{i}": 1.0 for i in range(n)}
            with stacks.routed(weights):
                speed = tokens_per_s(model, enc, args.new_tokens, tok.pad_token_id)
            ratios.append(speed / base)
            speeds.append(speed)
            bases.append(base)
        print(f"{n:>13} {statistics.median(speeds):>8.1f} {statistics.median(bases):>10.1f} "
              f"{statistics.median(ratios):>6.2f}")
    print("note: the base column runs with hooks attached in base_only mode (one Python call per projection);")
    stacks.detach()
    raw = statistics.median(tokens_per_s(model, enc, args.new_tokens, tok.pad_token_id) for _ in range(args.repeats))
    print(f"bare base without hooks: {raw:.1f} tok/s")


if __name__ == "__main__":
    main()
