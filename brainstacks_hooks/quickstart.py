"""The quickstart pipeline: SFT on 3 domains -> meta-router -> routed generation, on the embedded SmolLM2.

``brainstacks quickstart`` (or ``make quickstart``) runs it end to end from ``BRAINSTACKS_DATA_DIR``;
``--fast`` uses a smaller config for a few-minute look. Each phase's wall time is recorded in
``<output_dir>/quickstart.json`` next to the generations of the paper's five sample prompts in base,
ungated and routed modes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import load_config
from .configs import config_path
from .utils.io import atomic_write_json
from .utils.logging import get_logger

logger = get_logger(__name__)

#: The paper's five sample prompts (sections 4.3 and 5.3).
PAPER_PROMPTS = (
    "Explain how a neural network learns, in simple terms.",
    "Write a Python function that reverses a string.",
    "What are the common symptoms of type 2 diabetes?",
    "A train travels 120 km in 2 hours. What is its average speed in km/h?",
    "A patient must take 500 mg of a medicine per day, split into 3 equal doses. How many mg is each dose?",
)
MODES = ("base", "ungated", "routed")


@dataclass
class QuickstartResult:
    """Outputs and timings of one quickstart run."""

    run_dir: Path
    timings_s: dict[str, float] = field(default_factory=dict)
    generations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    router_report: dict[str, Any] = field(default_factory=dict)


def quickstart_configs(fast: bool) -> tuple[Path, Path]:
    """Paths of the quickstart's SFT and router configs (``--fast``: the smaller pair), shipped in the package."""
    if fast:
        return config_path("quickstart_fast"), config_path("router_quickstart_fast")
    return config_path("quickstart_cpu"), config_path("router_quickstart")


def run_quickstart(fast: bool = False, overrides: list[str] | None = None, max_new_tokens: int | None = None,
                   echo: Any = print) -> QuickstartResult:
    """Run the whole pipeline and return what it produced (``echo`` prints the human-readable parts).

    ``max_new_tokens`` of the sample generations defaults to 48 (32 with ``fast``).
    """
    max_new_tokens = max_new_tokens or (32 if fast else 48)
    from .inference.routed_model import GenerationSettings, RoutedModel
    from .router.pipeline import RouterPipelineConfig, train_router_for_run
    from .training.config import RunConfig
    from .training.outer_loop import run_sft, summary_table

    t_all = time.perf_counter()
    sft_path, router_path = quickstart_configs(fast)
    config = load_config(RunConfig, sft_path, overrides)
    result = QuickstartResult(Path(config.output_dir))

    t = time.perf_counter()
    run = run_sft(config)
    result.timings_s["sft"] = time.perf_counter() - t
    echo("\n== SFT ==\n" + summary_table(run.manifest))

    t = time.perf_counter()
    router_cfg = load_config(RouterPipelineConfig, router_path, [f"run_dir={run.run_dir}"])
    routed = train_router_for_run(run.run_dir, router_cfg, model=run.stacks.model, tokenizer=run.tokenizer,
                                  stacks=run.stacks)
    result.timings_s["router"] = time.perf_counter() - t
    result.router_report = routed.report
    echo("\n== Router ==\n" + router_summary(routed.report))

    t = time.perf_counter()
    model, tok = run.stacks.model, run.tokenizer
    run.stacks.detach()  # the RoutedModel attaches its own hooks and loads stacks from disk on demand
    rm = RoutedModel.from_run(run.run_dir, model=model, tokenizer=tok, require_router=True)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    for mode in MODES:
        gens = rm.generate(list(PAPER_PROMPTS), mode=mode, settings=settings)
        result.generations[mode] = [{"prompt": g.prompt, "text": g.text, "explain": g.explain.to_dict()}
                                    for g in gens]
    result.timings_s["generation"] = time.perf_counter() - t
    echo(f"\n== Generation (greedy, {max_new_tokens} new tokens) ==")
    for i, prompt in enumerate(PAPER_PROMPTS):
        route = result.generations["routed"][i]["explain"]
        weights = ", ".join(f"{d}={w:.2f}" for d, w in route["weights"].items()) or "none"
        echo(f"\n### {prompt}\nroute: {weights}{'  (gap)' if route['gap'] else ''}")
        for mode in MODES:
            text = " ".join(result.generations[mode][i]["text"].split())
            echo(f"  [{mode:>7}] {text[:200]}")
    result.timings_s["total"] = time.perf_counter() - t_all
    echo("\nwall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in result.timings_s.items()))
    atomic_write_json(result.run_dir / "quickstart.json",
                      {"timings_s": result.timings_s, "generations": result.generations, "fast": fast})
    return result


def router_summary(report: dict[str, Any]) -> str:
    """The router's summary table (held-out accuracy, gap signal, loss table; see ``router/report.json``)."""
    from .router.report import summary_table

    return summary_table(report)
