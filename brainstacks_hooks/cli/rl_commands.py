"""``brainstacks rl dpo|grpo CONFIG [overrides]``: per-domain RL refinement of a finished SFT run."""

from __future__ import annotations

import argparse


def _rl_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="algorithm", metavar="{dpo,grpo}", required=True)
    for algo, what in (("dpo", "DPO on the domain's new active stack (reference = the frozen stacks)"),
                       ("grpo", "GRPO with verifiable rewards on the domain's new active stack")):
        a = sub.add_parser(algo, help=what, description=what)
        a.add_argument("config", help=f"YAML RL config: a file or a shipped name (rl_{algo}_*; `brainstacks configs`)")
        a.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run_dir=runs/x trainer.max_steps=8")


def _rl(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..errors import ConfigError
    from ..rl.config import RLConfig

    config = load_config(RLConfig, args.config, args.overrides)  # a bad config fails before the heavy imports
    if config.algorithm != args.algorithm:
        raise ConfigError(f"{args.config} is a {config.algorithm} config; run `brainstacks rl {config.algorithm} "
                          f"{args.config}` (or set algorithm={args.algorithm})")
    from ..models.backend_bnb import import_peft_without_bitsandbytes

    import_peft_without_bitsandbytes()
    from ..rl.round import run_rl, summary_table
    from ..run_dir import RunDir
    from ..utils.distributed import is_main_process

    results = run_rl(config, progress=not args.quiet)  # torchrun / accelerate launch: every process (DDP)
    if not is_main_process():  # the main process reports
        return 0
    run = RunDir.open(config.run_dir)
    print(summary_table(run.manifest))
    if not results:
        print(f"\n{config.domain}: its {config.algorithm} rounds are already recorded (rounds={config.rounds}); "
              "nothing trained")
    else:
        print(f"\nmanifest: {run.manifest_path}   round records: {run.path / 'rl'}")
    return 0
