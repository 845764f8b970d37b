"""MoE-LoRA vs a single LoRA at matched parameters (paper 4.1, Table 1), on one domain of a run's recorded rows.

    python recipes/experiments/moe_vs_lora.py runs/quickstart --domain math --steps 40 --eval-steps 10

Both arms train one stack on the base model with the same rows (``rows/sft_train`` / ``rows/sft_val`` of the
domain), steps, learning rate, batch, seed and evaluator: MoE-LoRA = 4 rsLoRA experts of rank 16, noisy top-2,
load-balance loss (the paper's stack); LoRA = 1 expert of rank 64 (the same A/B parameter count; a 1-expert,
top-1 stack is exactly PEFT's rsLoRA, ``tests/stacks/test_peft_equivalence.py``). Prints validation loss per
eval step and wall time per arm, writes ``<run>/experiments/moe_vs_lora.{json,png}``.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import TrainerCallback

from brainstacks_hooks.data.formatting import encode_rows
from brainstacks_hooks.evaluation.plots import plot_loss_curves
from brainstacks_hooks.loss import evaluate_loss
from brainstacks_hooks.run_dir import SFT_TRAIN, SFT_VAL, RunDir
from brainstacks_hooks.stacks.brainstacks import BrainStacks
from brainstacks_hooks.stacks.config import StackConfig
from brainstacks_hooks.training.trainer import build_trainer, sft_config
from brainstacks_hooks.utils.io import atomic_write_json
from brainstacks_hooks.utils.seeding import seed_everything

ARMS = {
    "MoE-LoRA (4 experts x r16, top-2)": dict(num_experts=4, top_k=2, rank=16),
    "LoRA (1 expert x r64)": dict(num_experts=1, top_k=1, rank=64),
}


class ValCurve(TrainerCallback):
    """Validation loss (train mode: the stack being trained) every ``every`` steps."""

    def __init__(self, stacks, examples, pad, every, bf16):
        self.stacks, self.examples, self.pad, self.every, self.bf16 = stacks, examples, pad, every, bf16
        self.points: list[tuple[int, float]] = []

    def evaluate(self, step: int) -> None:
        with self.stacks.train_mode():
            self.points.append((step, evaluate_loss(self.stacks.model, self.examples, self.pad, 8, self.bf16)))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.evaluate(state.global_step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--domain", default="math")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-steps", type=int, default=10)
    ap.add_argument("--learning-rate", type=float, default=None, help="default: the run's train.learning_rate")
    ap.add_argument("--val-rows", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    run = RunDir.open(args.run_dir)
    cfg = run.run_config()
    tr = cfg.train
    model, tok = run.load_base()
    train, _ = encode_rows(tok, run.read_rows(SFT_TRAIN, args.domain), tr.max_length)
    val, _ = encode_rows(tok, run.read_rows(SFT_VAL, args.domain)[: args.val_rows], tr.max_length)
    results = {}
    for name, arm in ARMS.items():
        seed_everything(args.seed)
        stacks = BrainStacks.attach(model, StackConfig(**{**cfg.stack.to_dict(), **arm}))
        stack = stacks.new_stack(args.domain)
        n_params = sum(p.numel() for n, p in stack.named_parameters() if n.split(".")[-1] in ("A", "B"))
        n_router = sum(p.numel() for n, p in stack.named_parameters() if n.split(".")[-1] in ("router", "noise"))
        curve = ValCurve(stacks, val, tok.pad_token_id, args.eval_steps, tr.bf16)
        curve.evaluate(0)
        sc = sft_config(tr, str(run.path / "experiments" / "trainer"), args.seed, args.learning_rate, args.steps)
        trainer = build_trainer(stacks, tok, train, sc, callbacks=[curve])
        t0 = time.time()
        trainer.train()
        wall = time.time() - t0
        results[name] = {"points": curve.points, "wall_s": round(wall, 1), "s_per_step": round(wall / args.steps, 2),
                         "adapter_params": n_params, "router_params": n_router}
        print(f"{name}: A/B params {n_params:,} (+{n_router:,} router/noise), val "
              + " ".join(f"{s}:{v:.4f}" for s, v in curve.points) + f", {wall:.0f} s ({wall / args.steps:.2f} s/step)")
        del trainer
        stacks.detach()
        torch.manual_seed(args.seed)
    out = run.path / "experiments"
    atomic_write_json(out / "moe_vs_lora.json", {"domain": args.domain, "steps": args.steps,
                                                "learning_rate": args.learning_rate or tr.learning_rate,
                                                "train_rows": len(train), "val_rows": len(val), "arms": results})
    plot_loss_curves({k: v["points"] for k, v in results.items()}, out / "moe_vs_lora.png",
                     title=f"{args.domain}: validation loss, MoE-LoRA vs LoRA (matched A/B parameters)",
                     ylabel="val loss")
    print(f"wrote {out / 'moe_vs_lora.json'} and {out / 'moe_vs_lora.png'}")


if __name__ == "__main__":
    main()
