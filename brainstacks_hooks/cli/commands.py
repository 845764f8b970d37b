"""Subcommands of the ``brainstacks`` CLI, one small class each."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """A subcommand: name, help text, argument registration and the function that runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config (see recipes/configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20 output_dir=runs/x")


def _train(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..training.config import RunConfig
    from ..training.outer_loop import run_sft, summary_table

    config = load_config(RunConfig, args.config, args.overrides)
    run = run_sft(config)
    print(summary_table(run.manifest))
    print(f"\nstacks: {run.run_dir / 'stacks'}   manifest: {run.manifest.path}   "
          f"forgetting: {run.run_dir / 'forgetting.png'}")
    return 0


COMMANDS: list[Command] = [
    Command("train", "SFT: inner and outer loop over the configured domains (resumes from output_dir)",
            _train_args, _train),
]
