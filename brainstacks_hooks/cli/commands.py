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
    p.add_argument("config", help="YAML run config: a file or a shipped config name (`brainstacks configs`)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20 output_dir=runs/x")


def _train(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..training.config import RunConfig

    config = load_config(RunConfig, args.config, args.overrides)  # a bad config fails before the heavy imports
    from ..models.backend_bnb import import_peft_without_bitsandbytes

    import_peft_without_bitsandbytes()  # bitsandbytes only for the bnb4 backend (see its docstring)
    from ..training.outer_loop import run_sft, summary_table

    refine = None
    if any(d.rl for d in config.domains):  # RL rounds inside the curriculum (paper order), see DomainConfig.rl
        from ..rl.round import refine_domain as refine
    run = run_sft(config, refine=refine)
    from ..utils.distributed import is_main_process

    if not is_main_process():  # torchrun / accelerate launch: the main process reports
        return 0
    print(summary_table(run.manifest))
    print(f"\nstacks: {run.run_dir / 'stacks'}   manifest: {run.run.manifest_path}   "
          f"forgetting: {run.run_dir / 'forgetting.png'}")
    return 0


def _build_commands() -> list[Command]:
    from . import inference_commands as inf

    return [
        Command("train", "SFT: inner and outer loop over the configured domains (resumes from output_dir)",
                _train_args, _train),
        Command("generate", "generate for prompts from a run (routed by default; --mode for comparisons)",
                inf._generate_args, inf._generate),
        Command("chat", "interactive routed chat on a run directory (shows each turn's route)",
                inf._chat_args, inf._chat),
        Command("quickstart", "the whole pipeline on the embedded SmolLM2: SFT -> router -> routed generation",
                inf._quickstart_args, inf._quickstart),
    ]


COMMANDS: list[Command] = _build_commands()


def _allow_intermixed(p: argparse.ArgumentParser) -> None:
    """Let positionals follow options in this subparser (``RUN_DIR --config YAML key=value``).

    Plain argparse matches ``overrides`` (``nargs="*"``) as empty before ``--config`` and then rejects the
    overrides after it; :meth:`argparse.ArgumentParser.parse_known_intermixed_args` parses them in any order.
    """

    def parse_known_args(args=None, namespace=None):
        del p.parse_known_args  # the intermixed parser calls the class's parse_known_args itself
        try:
            return p.parse_known_intermixed_args(args, namespace)
        finally:
            p.parse_known_args = parse_known_args  # type: ignore[method-assign]

    p.parse_known_args = parse_known_args  # type: ignore[method-assign]


def _router_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="finished SFT run directory (manifest.json and stacks/)")
    p.add_argument("--config", help="YAML router pipeline config: a file or a shipped name (router_quickstart)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. router.epochs=4 mixed_pairs=16")
    _allow_intermixed(p)


def _router(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..router.pipeline import REPORT_FILE, RouterPipelineConfig, summary_table, train_router_for_run
    from ..utils.distributed import is_main_process

    config = load_config(RouterPipelineConfig, args.config, args.overrides)
    result = train_router_for_run(args.run_dir, config)  # torchrun: every process, sharded (see its docstring)
    if not is_main_process():  # the main process reports
        return 0
    print(summary_table(result.report))
    print(f"\nrouter: {result.router_dir}   report: {result.router_dir / REPORT_FILE}")
    return 0


def _route_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory holding manifest.json and router/ (after `brainstacks router`)")
    p.add_argument("prompt", help="the instruction to route")
    p.add_argument("--input", default="", help="optional input text appended to the instruction")
    p.add_argument("--json", action="store_true", help="print the route as JSON")


def _route(args: argparse.Namespace) -> int:
    import json

    from ..router.gating import route_prompts
    from ..router.serving import load_run_router

    router, meta, model, tokenizer = load_run_router(args.run_dir)
    (route,) = route_prompts(model, tokenizer, router, meta, [(args.prompt, args.input)], batch_size=1)
    out = {"weights": route.weights, "scores": route.scores, "gated_on": route.gated_on, "gap": route.gap,
           "gate_threshold": meta["gate_threshold"], "chat_floor": meta["chat_floor"],
           "chat_domain": meta["chat_domain"], "timings_ms": route.timings}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'domain':<12} {'score':>7} {'weight':>7}  on")
    for d, s in route.scores.items():
        w = route.weights.get(d)
        print(f"{d:<12} {s:>7.3f} {'-' if w is None else f'{w:.3f}':>7}  {'yes' if w is not None else ''}")
    print(f"gated on: {', '.join(route.gated_on) or '(none)'}   gap: {route.gap} (every raw score <= "
          f"{meta['gate_threshold']})   features {route.timings['features_ms']:.1f} ms, router "
          f"{route.timings['router_ms']:.2f} ms")
    return 0


def _configs_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="configs_command", metavar="{cp}")
    cp = sub.add_parser("cp", help="copy a shipped config out for editing", description="copy a shipped config "
                        "out for editing; pass the copy's path to `brainstacks train` or `--config`")
    cp.add_argument("name", help="shipped config name, e.g. quickstart_cpu")
    cp.add_argument("dest", help="destination file, or a directory to copy NAME.yaml into")


def _configs(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from ..configs import config_path, describe_config, list_configs
    from ..errors import ConfigError

    if args.configs_command is None:
        for name in list_configs():
            print(f"{name:<24} {describe_config(name)}")
        return 0
    src = config_path(args.name)
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists():
        raise ConfigError(f"{dest} already exists; not overwriting it")
    if not dest.parent.is_dir():
        raise ConfigError(f"cannot copy to {dest}: directory {dest.parent} does not exist")
    shutil.copyfile(src, dest)
    print(f"copied {src.name} to {dest}")
    return 0


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory written by brainstacks-hooks 0.1 (layout 1: each stack stored twice)")


def _convert(args: argparse.Namespace) -> int:
    from ..run_dir import RunDir

    run = RunDir.convert_legacy(args.run_dir)
    n = len(run.stack_identity())
    print(f"{run.path}: layout 2, {n} stacks, each stored once ({run.stacks_dir}); retrain the router if "
          "`brainstacks route` refuses it")
    return 0


COMMANDS += [
    Command("convert-run", "convert a run directory of the old layout in place (keeps every stack, drops duplicates)",
            _convert_args, _convert),
    Command("configs", "list the configs shipped in the package; `configs cp NAME DEST` copies one out to edit",
            _configs_args, _configs),
    Command("router", "train the meta-router of a finished SFT run (oracle, features, training, report)",
            _router_args, _router),
    Command("route", "route one prompt with a run's router: weights per domain, gated-on domains, gap flag",
            _route_args, _route),
]

from . import eval_commands as _ev  # noqa: E402, I001
COMMANDS += [Command("eval", "lm-eval benchmarks of a run under one mode (routed, base, ungated, prefix:D, "
                     "isolated:D), with the delta to base", _ev._eval_args, _ev._eval)]

from . import rl_commands as _rl  # noqa: E402, I001
COMMANDS += [Command("rl", "per-domain RL refinement of a finished run: `rl dpo|grpo CONFIG` (a new stack of the "
                     "domain, accepted on a held-out metric)", _rl._rl_args, _rl._rl)]
COMMANDS += [Command("report", "one Markdown report of a run (rounds, RL, forgetting, routing, benchmarks, expert "
                     "utilisation) with PNG plots, in RUN_DIR/report/", _ev._report_args, _ev._report)]
