"""Training step of one MoE-LoRA stack vs one PEFT LoRA of matched size, on the embedded SmolLM2 (CPU).

MoE-LoRA: 4 experts x rank 16, top-2, noisy router, load-balance loss, on all 7 projections (BrainStacks
hooks). LoRA: PEFT rank 64 with ``use_rslora`` on the same 7 projections. One step = forward + backward +
AdamW step, on a batch of ``--batch`` x ``--seq`` tokens, in float32 and under bfloat16 autocast.

Time: both variants in this process, each MoE-LoRA step run between two LoRA steps (see ``_common.py``);
the median of the ratios MoE/LoRA is the headline. Memory: every variant in its own child process; peak
RSS during the steps.

    python benchmarks/bench_moe_vs_lora.py                 # full run (batch 4 x 256)
    python benchmarks/bench_moe_vs_lora.py --quick         # CI-sized smoke run
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
    emit_child_result,
    load_model,
    macs_per_token,
    make_batch,
    memory_probe,
    print_header,
    run_child,
    summary,
    table,
)

from brainstacks_hooks import BrainStacks, StackConfig
from brainstacks_hooks.constants import DEFAULT_TARGET_MODULES

TIME_TARGET = 1.3
MEMORY_TARGET = 1.2
DTYPES = ("fp32", "bf16")


def build_variant(base: torch.nn.Module, kind: str):
    """Returns ``(model, trainable parameters)`` with a MoE-LoRA stack (``moe``) or a PEFT LoRA (``lora``)."""
    if kind == "moe":
        stacks = BrainStacks.attach(base, StackConfig())  # paper defaults: 4 x r16, top-2, all 7 projections
        stacks.new_stack("bench")
        return base, stacks.trainable_parameters()
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=64, lora_alpha=16, use_rslora=True, lora_dropout=0.0, bias="none",
                        target_modules=list(DEFAULT_TARGET_MODULES), task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    return model, [p for p in model.parameters() if p.requires_grad]


def make_step(model: torch.nn.Module, params: list[torch.nn.Parameter], batch: dict, dtype: str):
    """One training step (forward + backward + AdamW) as a closure."""
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
        with ctx:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def child(args) -> None:
    """Memory of one variant: set up, reset the RSS high-water mark, run warm-up + timed steps."""
    kind, dtype = args.child.split(":")
    base, _ = load_model()
    model, params = build_variant(base, kind)
    batch = make_batch(base.config.vocab_size, args.batch, args.seq)
    step = make_step(model, params, batch, dtype)
    result = memory_probe(lambda: [step() for _ in range(args.warmup + args.steps)])
    result["params"] = sum(p.numel() for p in params)
    emit_child_result(result)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant and repetition")
    p.add_argument("--repeats", type=int, default=7, help="repetitions (the median ratio is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before the first repetition")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32 (float32) and bf16 (bf16 autocast)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant child processes for memory")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="CI-sized: batch 1 x 32 tokens, 1 step, 2 repetitions")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.batch, args.seq, args.steps, args.repeats, args.warmup = 1, 32, 1, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    dtypes = [d for d in args.dtypes.split(",") if d]
    if not set(dtypes) <= set(DTYPES):
        p.error(f"--dtypes must be a comma list of {DTYPES}")

    print_header("MoE-LoRA stack vs PEFT LoRA r=64: training step", args)
    base, _ = load_model()
    batch = make_batch(base.config.vocab_size, args.batch, args.seq)
    macs = macs_per_token(base, args.seq)
    # step ~ base forward + input-gradient backward (2x base) + adapter forward, input and weight grads (3x)
    est = (2 * macs["base"] + 3 * macs["stack_train"]) / (2 * macs["base"] + 3 * macs["lora"])
    print(f"multiply-accumulates per token (forward): base {macs['base'] / 1e6:.1f}M, MoE-LoRA "
          f"{macs['stack_train'] / 1e6:.2f}M, LoRA r64 {macs['lora'] / 1e6:.2f}M; "
          f"MAC estimate of the step ratio {est:.3f}x")
    models = {kind: build_variant(copy.deepcopy(base), kind) for kind in ("moe", "lora")}
    del base
    n_params = {kind: sum(p.numel() for p in params) for kind, (_, params) in models.items()}
    print(f"trainable parameters: MoE-LoRA {n_params['moe']:,}  LoRA r64 {n_params['lora']:,}  "
          f"(ratio {n_params['moe'] / n_params['lora']:.3f})")

    rows, verdicts = [], []
    for dt in dtypes:
        moe_step = make_step(*models["moe"], batch, dt)
        lora_step = make_step(*models["lora"], batch, dt)
        for _ in range(args.warmup):  # allocator, AdamW state
            moe_step()
            lora_step()
        print(f"timing {dt}: {args.repeats} repetitions x {args.steps} steps, each MoE-LoRA run between two LoRA runs")
        lora_times, times, ratios = bracketed(lora_step, {"moe": moe_step}, args.repeats, args.steps, label="lora")
        med, lo, hi = summary(ratios["moe"])
        t_moe, t_lora = statistics.median(times["moe"]), statistics.median(lora_times)
        rows.append([dt, f"{t_moe:.3f}", f"{t_lora:.3f}", f"**{med:.3f}x** ({lo:.2f}-{hi:.2f})",
                     f"{min(times['moe']) / min(lora_times):.3f}x"])
        verdicts.append(f"step time {dt}: {med:.3f}x (target <= {TIME_TARGET}x: "
                        f"{'met' if med <= TIME_TARGET else 'MISSED'})")
    print("\n" + table(rows, ["dtype", "MoE-LoRA step s (median)", "LoRA step s (median)",
                             "median ratio (min-max)", "ratio of min times"]))

    if not args.no_memory:
        script = os.path.abspath(__file__)
        common = ["--batch", str(args.batch), "--seq", str(args.seq), "--steps", "1", "--warmup", "1"]
        if args.threads:
            common += ["--threads", str(args.threads)]
        mem_rows = []
        for dt in dtypes:
            res = {kind: run_child(script, [*common, "--child", f"{kind}:{dt}"]) for kind in ("moe", "lora")}
            peak = res["moe"]["peak_mib"] / res["lora"]["peak_mib"]
            extra = res["moe"]["peak_over_before_mib"] / res["lora"]["peak_over_before_mib"]
            mem_rows.append([dt, f"{res['moe']['peak_mib']:.0f}", f"{res['lora']['peak_mib']:.0f}", f"**{peak:.3f}x**",
                             f"{res['moe']['peak_over_before_mib']:.0f}", f"{res['lora']['peak_over_before_mib']:.0f}",
                             f"{extra:.3f}x"])
            verdicts.append(f"peak memory {dt}: {peak:.3f}x (target <= {MEMORY_TARGET}x: "
                            f"{'met' if peak <= MEMORY_TARGET else 'MISSED'}); step-only memory {extra:.3f}x")
        print("\nPeak RSS of 2 training steps, each variant in its own process (MiB):\n")
        print(table(mem_rows, ["dtype", "MoE peak", "LoRA peak", "ratio", "MoE peak - RSS before steps",
                               "LoRA peak - RSS before steps", "ratio"]))
    print("\n" + "\n".join(verdicts))


if __name__ == "__main__":
    main()
