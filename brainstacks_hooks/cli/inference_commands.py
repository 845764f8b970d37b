"""``brainstacks generate`` and ``brainstacks chat``: routed generation from a run directory."""

from __future__ import annotations

import argparse
import json
import sys


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory (manifest.json, stacks/, router/)")
    p.add_argument("--mode", default="routed", help="routed | ungated | base | prefix:DOMAIN | isolated:DOMAIN")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--budget-mb", type=float, default=None,
                   help="device budget of the stack cache in MiB (stacks + their pool slots); default: half the "
                        "free GPU memory / a quarter of the available RAM; 0 = unlimited")


def _settings(args: argparse.Namespace):
    from ..inference.routed_model import GenerationSettings

    return GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                              temperature=args.temperature, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty)


def check_mode(mode: str, domains: list[str] | None = None) -> None:
    """Reject a malformed ``--mode`` (and, given the run's domains, one naming a domain the run lacks).

    Raises:
        ConfigError: e.g. ``unknown domain 'nosuch' in mode 'prefix:nosuch'; known domains: chat, code, math``.
    """
    if mode == "routed":
        return
    from ..stacks.modes import Mode, domain_weights

    parsed = Mode.parse(mode)
    if domains is not None:
        domain_weights(parsed, list(domains))


def _load(args: argparse.Namespace):
    from ..inference.routed_model import RoutedModel

    check_mode(args.mode)  # a typo in the mode fails before the model loads

    budget = "auto" if args.budget_mb is None else (int(args.budget_mb * 2**20) or None)
    return RoutedModel.from_run(args.run_dir, budget_bytes=budget, require_router=args.mode == "routed")


def route_line(explain) -> str:
    """``route: chat=0.41 math=0.93 | stacks: chat/r0, math/r0 | loaded 1, cached 1 | 812 ms``."""
    weights = " ".join(f"{d}={w:.2f}" for d, w in explain.weights.items()) or "(no stacks)"
    gap = "  GAP: no domain claims this prompt" if explain.gap else ""
    t = explain.timings
    return (f"[{explain.mode}] route: {weights}{gap} | stacks: {', '.join(explain.stacks_used) or '-'} | "
            f"loaded {len(explain.loaded)}, cached {len(explain.cache_hits)} | "
            + (f"route {t['route_ms']:.0f} ms, " if "route_ms" in t else "")
            + f"generate {t.get('generate_ms', 0):.0f} ms")


def _generate_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")


def _generate(args: argparse.Namespace) -> int:
    model = _load(args)
    check_mode(args.mode, model.store.domains)
    for g in model.generate(args.prompt, mode=args.mode, settings=_settings(args)):
        if args.json:
            print(json.dumps({"prompt": g.prompt, "text": g.text, "explain": g.explain.to_dict()}))
        else:
            print(f"### {g.prompt}\n{route_line(g.explain)}\n{g.text}\n")
    return 0


def _chat_args(p: argparse.ArgumentParser) -> None:
    _common(p)


def _chat(args: argparse.Namespace) -> int:
    from ..errors import BrainstacksError
    from ..inference.routed_model import Generation

    model = _load(args)
    check_mode(args.mode, model.store.domains)
    settings = _settings(args)
    print("brainstacks chat: one prompt per line; ':mode ungated' switches mode; ':quit' exits.", flush=True)
    mode = args.mode
    for line in sys.stdin:
        prompt = line.strip()
        if not prompt:
            continue
        if prompt in (":quit", ":q"):
            break
        if prompt.startswith(":mode "):
            requested = prompt.split(None, 1)[1]
            try:
                check_mode(requested, model.store.domains)
            except BrainstacksError as e:
                print(f"error: {e} (mode stays {mode})", flush=True)
                continue
            mode = requested
            print(f"(mode: {mode})", flush=True)
            continue
        try:
            for piece in model.stream(prompt, mode=mode, settings=settings):
                if isinstance(piece, Generation):
                    print(f"\n{route_line(piece.explain)}", flush=True)
                else:
                    print(piece, end="", flush=True)
        except BrainstacksError as e:  # a corrupt stack file or bad mode: report it and keep serving
            print(f"\nerror: {e}", flush=True)
    return 0


def _quickstart_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fast", action="store_true", help="smaller config: a few-minute look")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 48 (32 with --fast)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the SFT config, e.g. output_dir=runs/qs2")


def _quickstart(args: argparse.Namespace) -> int:
    from ..models.backend_bnb import import_peft_without_bitsandbytes
    from ..quickstart import run_quickstart

    import_peft_without_bitsandbytes()  # the quickstart uses the hf backend: no bitsandbytes
    run_quickstart(fast=args.fast, overrides=args.overrides, max_new_tokens=args.max_new_tokens)
    return 0
