"""The three-panel result (paper 5.3): prefix vs ungated vs routed, as held-out loss and as generations.

The paper shows the same prompts after the first domains (every stack fine), after all domains with every
stack firing (``ungated``: cross-domain interference) and with the meta-router gating them (``routed``).
:func:`three_panels` measures both halves of that on a finished run with a router:

* **Loss panel**: per-domain token-weighted completion loss on held-out rows (``rows/router_test``, rows
  neither SFT nor the router trained on) in ``prefix`` (each domain under the stacks up to itself in
  training order: the condition it was trained and validated under), ``ungated`` and ``routed`` (each row
  under its own route), with ``base`` beside them. By default (``losses="auto"``) this is the loss table
  the router pipeline recorded in ``router/report.json`` (the same evaluator,
  :func:`~brainstacks_hooks.router.mode_losses.evaluate_val_losses`, on the router's held-out oracle rows);
  ``losses="recompute"`` measures it again on the first ``rows_per_domain`` rows of each domain (those that
  fit the run's ``train.max_length``).
* **Generation panel**: greedy generations for fixed prompts (the paper's five by default) through
  :meth:`RoutedModel.generate <brainstacks_hooks.inference.routed_model.RoutedModel.generate>` in
  ``prefix:D`` (``D``: the first trained domain by default, the paper's "after chat" panel), ``ungated`` and
  ``routed``, each prompt's route recorded.

:func:`write_three_panels` writes ``RUN_DIR/experiments/three_panels.{json,md,png}`` atomically (the PNG:
one panel per mode, a bar per domain); ``brainstacks report`` shows the JSON when it exists.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..run_dir import ROUTER_TEST, RunDir
from ..utils.io import atomic_write_bytes, atomic_write_json, read_json
from ..utils.logging import get_logger
from .report import format_cell

logger = get_logger(__name__)

__all__ = [
    "EXPERIMENTS_SUBDIR",
    "LOSS_SOURCES",
    "PANELS",
    "THREE_PANELS_COMMAND",
    "THREE_PANELS_STEM",
    "panel_generations",
    "panel_losses",
    "panels_markdown",
    "three_panels",
    "write_three_panels",
]

#: The three panels, in the paper's order.
PANELS = ("prefix", "ungated", "routed")
#: Where the loss panel comes from: the router report when it has the table (``auto``), only there
#: (``report``), or measured again (``recompute``).
LOSS_SOURCES = ("auto", "report", "recompute")
EXPERIMENTS_SUBDIR = "experiments"
THREE_PANELS_STEM = "three_panels"
#: The command that writes ``RUN_DIR/experiments/three_panels.json`` (``{run}``: the run directory).
THREE_PANELS_COMMAND = "python recipes/experiments/three_panels.py {run}"
FORMAT_VERSION = 1
_LOSS_KEYS = ("n_examples", "n_tokens", "base", "prefix", "isolated", "ungated", "routed")


def _report_losses(run: RunDir, domains: Sequence[str]) -> dict[str, Any] | None:
    """The loss table of ``router/report.json`` for exactly ``domains``, or ``None``."""
    path = run.router_dir / "report.json"
    if not path.is_file():
        return None
    report = read_json(path)
    table = report.get("val_losses") or {}
    if sorted(table) != sorted(domains):
        logger.info("router report's loss table covers %s, the run's stacks %s: recomputing", sorted(table),
                    sorted(domains))
        return None
    return {"source": "router_report", "file": str(path.relative_to(run.path)), "rows": ROUTER_TEST,
            "rows_per_domain": None, "bf16": report.get("losses_bf16"),
            "domains": {d: {k: table[d].get(k) for k in _LOSS_KEYS} for d in domains}}


def panel_losses(run: RunDir, rm: Any, source: str = "auto", rows_per_domain: int = 20,
                 progress: bool = True) -> dict[str, Any]:
    """The loss panel: ``{"source", "rows", "rows_per_domain", "bf16", "domains": {d: {mode: loss, ...}}}``.

    Args:
        run: the run directory.
        rm: its :class:`RoutedModel` (routes and stacks; recomputing attaches every stack of the store).
        source: one of :data:`LOSS_SOURCES`.
        rows_per_domain: recompute on the first this many ``rows/router_test`` rows of each domain that fit
            the run's ``train.max_length``.
        progress: a tqdm bar while recomputing.

    Raises:
        ConfigError: unknown ``source``; ``source="report"`` without a matching table in the router report;
            no held-out rows to recompute on.
    """
    from ..data.formatting import encode_rows
    from ..router.mode_losses import evaluate_val_losses

    if source not in LOSS_SOURCES:
        raise ConfigError(f"unknown loss source {source!r}; valid: {', '.join(LOSS_SOURCES)}")
    domains = list(rm.store.domains)
    if source != "recompute":
        recorded = _report_losses(run, domains)
        if recorded is not None:
            return recorded
        if source == "report":
            raise ConfigError(f"{run.router_dir / 'report.json'}: no loss table for the domains {domains}; "
                              f"train the router (`brainstacks router {run.path}`) or recompute the losses")
    if rows_per_domain < 1:
        raise ConfigError(f"rows_per_domain must be >= 1 (got {rows_per_domain})")
    if not run.has_rows(ROUTER_TEST):
        raise ConfigError(f"{run.path}: no held-out rows (rows/{ROUTER_TEST}.jsonl) to measure the losses on")
    max_length = run.run_config().train.max_length
    by_domain = run.rows_by_domain(ROUTER_TEST)
    examples: dict[str, list[dict[str, Any]]] = {}
    pairs: dict[str, list[tuple[str, str]]] = {}
    for d in domains:
        for row in by_domain.get(d, []):
            if len(examples.get(d, [])) >= rows_per_domain:
                break
            encoded, _ = encode_rows(rm.tokenizer, [row], max_length)  # longer than max_length: skipped
            if encoded:
                examples.setdefault(d, []).append(encoded[0])
                pairs.setdefault(d, []).append((row["instruction"], row.get("input", "") or ""))
    if not examples:
        raise ConfigError(f"{run.path}: no rows/{ROUTER_TEST} rows of the domains {domains} fit "
                          f"{max_length} tokens")
    routes = {d: rm.route(p) for d, p in pairs.items()}
    bf16 = bool(run.run_config().train.bf16)
    rm.store.activate(dict.fromkeys(domains, 1.0), set_mode=False)  # all stacks attached: the modes select
    table, _ = evaluate_val_losses(rm.stacks, examples, routes, bf16, progress)
    return {"source": "recomputed", "file": None, "rows": ROUTER_TEST, "rows_per_domain": rows_per_domain,
            "bf16": bf16, "domains": {d: {k: table[d].get(k) for k in _LOSS_KEYS} for d in table}}


def panel_generations(rm: Any, prompts: Sequence[str], prefix_domain: str, new_tokens: int) -> dict[str, Any]:
    """The generation panel: greedy outputs of every prompt in ``prefix:<prefix_domain>``, ungated, routed.

    Returns ``{"modes": {panel: mode}, "new_tokens", "prompts": [{"prompt", "route", "outputs": {panel: text},
    "new_tokens": {panel: n}}]}``.
    """
    from ..inference.routed_model import GenerationSettings

    if not prompts:
        raise ConfigError("the generation panel needs at least one prompt")
    if new_tokens < 1:
        raise ConfigError(f"new_tokens must be >= 1 (got {new_tokens})")
    modes = {"prefix": f"prefix:{prefix_domain}", "ungated": "ungated", "routed": "routed"}
    settings = GenerationSettings(max_new_tokens=new_tokens)
    out = [{"prompt": p, "route": None, "outputs": {}, "new_tokens": {}} for p in prompts]
    for panel, mode in modes.items():
        for rec, g in zip(out, rm.generate(list(prompts), mode=mode, settings=settings), strict=True):
            rec["outputs"][panel] = g.text
            rec["new_tokens"][panel] = g.new_tokens
            if panel == "routed":
                e = g.explain
                rec["route"] = {"weights": dict(e.weights), "gated_on": list(e.gated_on), "gap": bool(e.gap)}
    return {"modes": modes, "new_tokens": new_tokens, "prompts": out}


def three_panels(run_dir: str | os.PathLike, prompts: Sequence[str] | None = None, new_tokens: int = 48,
                 losses: str = "auto", rows_per_domain: int = 20, prefix_domain: str | None = None,
                 rm: Any = None, progress: bool = True) -> dict[str, Any]:
    """Measure both panels on a finished run with a router (see the module docstring); writes nothing.

    Args:
        run_dir: the run directory.
        prompts: the generation prompts (default: the paper's five, ``quickstart.PAPER_PROMPTS``).
        new_tokens: greedy tokens per generation.
        losses: where the loss panel comes from (:data:`LOSS_SOURCES`).
        rows_per_domain: held-out rows per domain when the losses are recomputed.
        prefix_domain: the domain of the generation panel's ``prefix`` mode (default: the first trained one).
        rm: an already built :class:`RoutedModel` of this run (default: built from the run, unlimited budget).
        progress: tqdm bars.

    Returns:
        The record :func:`write_three_panels` saves as JSON.

    Raises:
        RunDirError: not a finished run directory. ConfigError: no router, unknown domain or loss source, bad
            counts.
    """
    from ..inference.routed_model import RoutedModel
    from ..quickstart import PAPER_PROMPTS

    t0 = time.perf_counter()
    run = RunDir.open(run_dir, require_finished=True)
    prompts = list(PAPER_PROMPTS if prompts is None else prompts)
    if losses not in LOSS_SOURCES:  # checked before the model loads
        raise ConfigError(f"unknown loss source {losses!r}; valid: {', '.join(LOSS_SOURCES)}")
    if prefix_domain is not None and prefix_domain not in run.manifest.domain_order:
        raise ConfigError(f"unknown prefix domain {prefix_domain!r}; the run's domains: "
                          f"{', '.join(run.manifest.domain_order)}")
    if rm is None:
        rm = RoutedModel.from_run(run, budget_bytes=None, require_router=True)
    if rm.router is None:
        raise ConfigError(f"{run.router_dir}: no trained router; run `brainstacks router {run.path}` first")
    domains = list(rm.store.domains)
    prefix_domain = prefix_domain or (domains[0] if domains else None)
    if prefix_domain not in domains:
        raise ConfigError(f"unknown prefix domain {prefix_domain!r}; the run's domains: {', '.join(domains)}")
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    loss_panel = panel_losses(run, rm, losses, rows_per_domain, progress)
    losses_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    gen_panel = panel_generations(rm, prompts, prefix_domain, new_tokens)
    gen_s = time.perf_counter() - t2
    return {
        "format_version": FORMAT_VERSION,
        "run_dir": str(run.path),
        "domains": domains,
        "panels": list(PANELS),
        "losses": loss_panel,
        "generations": gen_panel,
        "stack_identity": run.stack_identity(),
        "wall_time_s": {"load": round(load_s, 2), "losses": round(losses_s, 2), "generation": round(gen_s, 2),
                        "total": round(time.perf_counter() - t0, 2)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def panels_markdown(record: dict[str, Any], heading: str | None = "#", image: str | None = None,
                    compact: bool = False, max_chars: int | None = None) -> str:
    """The record as Markdown: the loss table, then every prompt's route and its three generations.

    Args:
        record: a :func:`three_panels` record.
        heading: the Markdown heading prefix of the title (``None``: no title, as inside the run report).
        image: a link to the PNG to embed, if any.
        compact: each generation on one line, whitespace collapsed (else verbatim in a fenced block, so
            the line structure of generated code stays visible).
        max_chars: cut each generation to this many characters (``None``: whole).
    """
    lp, gp = record["losses"], record["generations"]
    src = ("`router/report.json` (the router's held-out oracle rows)" if lp["source"] == "router_report"
           else f"recomputed on the first {lp['rows_per_domain']} rows per domain")
    lines = [f"{heading} Three panels (paper 5.3): `{Path(record['run_dir']).name}`", ""] if heading else []
    lines += [f"Per-domain completion loss on held-out `rows/{lp['rows']}` rows, {src}; prefix = each domain under "
              "the stacks up to itself (its training condition), routed = each row under its own route:", "",
              "| domain | n | base | prefix | ungated | routed | routed - ungated |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for d, v in lp["domains"].items():
        delta = v["routed"] - v["ungated"] if v.get("routed") is not None and v.get("ungated") is not None else None
        lines.append(f"| {d} | {v.get('n_examples')} | {format_cell(v.get('base'))} | {format_cell(v.get('prefix'))} | "
                     f"{format_cell(v.get('ungated'))} | {format_cell(v.get('routed'))} | "
                     + ("-" if delta is None else f"{delta:+.4f}") + " |")
    if image:
        lines += ["", f"![three panels]({image})"]
    modes = gp["modes"]
    lines += ["", f"Greedy generations, {gp['new_tokens']} new tokens at most, in "
              + ", ".join(f"`{m}`" for m in modes.values()) + ":"]
    for rec in gp["prompts"]:
        route = rec.get("route") or {}
        weights = ", ".join(f"{d}={w:.2f}" for d, w in (route.get("weights") or {}).items()) or "none"
        lines += ["", f"**{rec['prompt']}**  ", f"route: {weights}" + ("  (gap)" if route.get("gap") else "")]
        for panel, mode in modes.items():
            text = str(rec["outputs"].get(panel, ""))
            text = " ".join(text.split()) if compact else text.strip("\n")
            if max_chars is not None and len(text) > max_chars:
                text = text[:max_chars] + " ..."
            if compact:
                lines += [f"- `{mode}`: {text or '(empty)'}"]
            else:
                lines += [f"- `{mode}`:", "", "  ~~~text", *[f"  {x}" for x in (text or "(empty)").split("\n")],
                          "  ~~~"]
    w = record.get("wall_time_s") or {}
    lines += ["", "wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in w.items())]
    return "\n".join(lines) + "\n"


def write_three_panels(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                       **kwargs: Any) -> dict[str, Path]:
    """Run :func:`three_panels` and write ``three_panels.{json,md,png}`` atomically.

    ``out_dir`` defaults to ``RUN_DIR/experiments``; ``kwargs`` go to :func:`three_panels`. Returns the paths
    by suffix (``json``, ``md``, ``png``).
    """
    from .plots import plot_three_panels

    record = three_panels(run_dir, **kwargs)
    out = Path(out_dir) if out_dir is not None else Path(record["run_dir"]) / EXPERIMENTS_SUBDIR
    paths = {ext: out / f"{THREE_PANELS_STEM}.{ext}" for ext in ("json", "md", "png")}
    record["files"] = {ext: p.name for ext, p in paths.items()}
    lp = record["losses"]["domains"]
    plot_three_panels({panel: {d: v.get(panel) for d, v in lp.items()} for panel in PANELS},
                      paths["png"], base={d: v.get("base") for d, v in lp.items()},
                      title=f"{Path(record['run_dir']).name}: held-out completion loss per domain")
    atomic_write_bytes(paths["md"], panels_markdown(record, image=paths["png"].name).encode("utf-8"))
    atomic_write_json(paths["json"], record)  # last: the JSON marks a complete set
    logger.info("three panels written to %s", paths["json"])
    return paths
