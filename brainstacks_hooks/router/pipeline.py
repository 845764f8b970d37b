"""The meta-router as a pipeline step after SFT: oracle, features, training, evaluation (paper 3.6, 5.1, 5.3).

``train_router_for_run(run_dir, config)`` works on a finished SFT run directory (opened with
:class:`~brainstacks_hooks.run_dir.RunDir`: its manifest, the rows SFT recorded and its ``stacks/``) and leaves
everything under ``run_dir/router``::

    router.json, router.safetensors   the router (:func:`~.serialization.save_router`)
    oracle_cache/                     per-domain oracle losses (:class:`~.oracle.OracleCache`)
    feature_cache/                    base-model features (:class:`~.features.FeatureCache`)
    report.json                       metrics, cross-domain table, timings, prefix/ungated/routed losses
    val_routes.json                   the route and loss of every validation example
    cross_domain.png                  plot of the cross-domain table

**Examples.** Every domain contributes single-domain (prompt, answer) pairs:

* *router training*: a seeded sample of ``samples_per_domain`` of the domain's SFT **train** rows as the run
  recorded them (``rows/sft_train.jsonl``, after decontamination, so a row reassigned to another domain
  counts for that domain);
* *router validation*: the domain's SFT **validation** rows (``rows/sft_val.jsonl``; a seeded sample of
  ``val_samples_per_domain`` when set). These are also the rows whose losses are reported in prefix,
  ungated and routed modes.

Prompts are compared by their user text (instruction plus input, whitespace-normalised): a training row
whose prompt is also a validation prompt is dropped, so no prompt is on both sides.

**Mixed prompts** (for the ``mixed_set`` metric and multi-domain targets) are synthetic and built
deterministically: pair ``k`` takes the ``k``-th domain pair of ``itertools.combinations(domains, 2)``
(cycling; the order of the two parts alternates every cycle), draws one row of each domain with
``random.Random(seed)`` from the same side (train rows for training, validation rows for validation), and
joins them: the instruction is ``user_text(a) + "\\n\\n" + user_text(b)`` and the answer is
``output(a) + "\\n\\n" + output(b)``. Its label is both domains. Pairs whose joined prompt is longer than
the router's ``seq_len`` tokens (or than ``oracle_max_length - 16``, leaving the oracle room for the
answer) are redrawn, since the router would not see the first part; duplicates are dropped. Nothing more
clever is done: these prompts are a proxy for genuinely multi-domain requests, and their oracle targets
(which stacks actually lower the loss of the concatenated answer) may well differ from the label.

**Oracle and training.** The outcome oracle (:func:`~.oracle.run_oracle_on_stacks`; exhaustive search for
up to ``exhaustive_max_domains`` domains) scores every example, training and validation, with its disk
cache. Features are computed once through the feature cache. The router is trained on the training rows
with the validation rows as its explicit validation split (checkpoint selection by the composite score).

**Metrics** on validation prompts (see :func:`label_metrics`): ``single_top1`` and ``mixed_set`` as
defined in :mod:`.train` (against the oracle targets) and ``single_top1_label`` / ``mixed_set_label``
against the labels (the source domain; both domains of a mixed prompt).

**Losses** (paper 5.3). For every validation example of domain ``d`` the completion loss is measured in
``prefix(d)`` (the condition ``d`` was trained under), ``ungated`` (every stack at weight 1), ``routed``
(the trained router's route of this prompt after :func:`~.gating.apply_gating`, run as
``stacks.routed(route.weights)``) and ``base_only``; per domain they are token-weighted means. Every mode
is evaluated one example at a time, so all modes see identical shapes. ``recovered_fraction =
(ungated - routed) / (ungated - prefix)`` is reported when ungated is worse than prefix by more than
1e-4 (otherwise there is nothing to recover and it is ``None``).

The pieces live in their own modules: :mod:`.examples` (rows, mixed prompts, split), :mod:`.metrics`,
:mod:`.mode_losses` (the loss table), :mod:`.report` (files and summary); routing a prompt from a run
without any of this is :mod:`.serving`. The ids of the rows the oracle and the router used are recorded in
``rows/router.json``.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import to_dict
from ..data.formatting import encode_rows
from ..errors import ConfigError
from ..run_dir import SFT_TRAIN, SFT_VAL, RunDir
from ..utils.io import atomic_write_json
from ..utils.logging import get_logger
from .config import RouterConfig
from .examples import MIXED_SOURCE, _prompt_of, build_mixed_examples, build_router_examples, user_text
from .gating import Route, route_features
from .metrics import label_metrics, measure_timing, recovered_fraction, route_summary
from .mode_losses import LOSS_MODES, evaluate_val_losses, example_nll
from .model import MetaRouter
from .oracle import cross_domain_analysis, plot_cross_domain, run_oracle_on_stacks
from .report import PLOT_FILE, REPORT_FILE, REPORT_FORMAT_VERSION, VAL_ROUTES_FILE, json_safe, summary_table
from .serialization import save_router
from .serving import load_run_router, route_prompt, router_fingerprint
from .train import RouterData, RouterTrainResult, evaluate_router, merge_duplicate_prompts, prompt_key, train_router

logger = get_logger(__name__)

ROUTER_SUBDIR = "router"

__all__ = [
    "LOSS_MODES",
    "MIXED_SOURCE",
    "PLOT_FILE",
    "REPORT_FILE",
    "VAL_ROUTES_FILE",
    "RouterPipelineConfig",
    "RouterRunResult",
    "build_mixed_examples",
    "example_nll",
    "load_run_router",
    "recovered_fraction",
    "route_prompt",
    "summary_table",
    "train_router_for_run",
    "user_text",
]


@dataclass
class RouterPipelineConfig:
    """Settings of :func:`train_router_for_run` (YAML-loadable with :func:`brainstacks_hooks.config.load_config`).

    Args:
        run_dir: Finished SFT run directory (``manifest.json`` + ``stacks/``).
        router: Router, oracle and gating settings (paper defaults).
        samples_per_domain: Training (oracle) examples per domain drawn from its SFT train rows;
            ``None`` uses ``router.oracle_samples_per_domain``.
        val_samples_per_domain: Validation rows per domain (router validation and the loss table);
            ``None`` uses all of the run's validation rows.
        mixed_pairs: Synthetic mixed prompts for router training (see the module docstring).
        val_mixed_pairs: Synthetic mixed prompts built from validation rows (the ``mixed_set`` metric).
        eval_bf16: bf16 autocast for the oracle and the loss table; ``None`` follows the run's ``train.bf16``
            (the precision of the SFT evaluator, so oracle, SFT and loss-table losses are comparable).
        timing_prompts: Validation prompts routed one at a time to time features + router.
        generation_prompts: Prompts whose routed generation is timed (0 disables).
        generation_tokens: New tokens generated per timed prompt.
        seed: Seed of the row samples and of the mixed pairs.
        device: Router training device (``None``: the base model's device).
        progress: Show tqdm bars.

    Batch sizes are the router's (``router.oracle_batch_size``, ``router.feature_batch_size`` and
    ``router.batch_size`` for training); the loss table runs one example at a time (see the module docstring).
    """

    run_dir: str = "runs/quickstart"
    router: RouterConfig = field(default_factory=RouterConfig)
    samples_per_domain: int | None = None
    val_samples_per_domain: int | None = None
    mixed_pairs: int = 32
    val_mixed_pairs: int = 12
    eval_bf16: bool | None = None
    timing_prompts: int = 8
    generation_prompts: int = 2
    generation_tokens: int = 64
    seed: int = 42
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.router, Mapping):
            self.router = RouterConfig.from_dict(dict(self.router))
        for name in ("samples_per_domain", "val_samples_per_domain"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1 or null (got {v})")
        for name in ("mixed_pairs", "val_mixed_pairs", "timing_prompts", "generation_prompts"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.generation_tokens < 1:
            raise ConfigError(f"generation_tokens must be >= 1 (got {self.generation_tokens})")

    @property
    def train_samples(self) -> int:
        """Training examples per domain (``samples_per_domain`` or the router's oracle setting)."""
        return self.samples_per_domain or self.router.oracle_samples_per_domain

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        d = to_dict(self)
        d["router"] = self.router.to_dict()
        return d


@dataclass
class RouterRunResult:
    """What :func:`train_router_for_run` returns.

    Attributes:
        router: The trained router (best epoch, eval mode).
        meta: The ``router.json`` dictionary.
        report: The ``report.json`` dictionary.
        router_dir: ``run_dir/router``.
        train_result: Training history and split.
        train_prompts, val_prompts: Prompt texts (user text) on each side of the router split.
        val_routes: Route and per-mode losses of every validation example.
    """

    router: MetaRouter
    meta: dict[str, Any]
    report: dict[str, Any]
    router_dir: Path
    train_result: RouterTrainResult
    train_prompts: list[str]
    val_prompts: list[str]
    val_routes: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- pipeline
def _resolve(run_dir: str | Path, config: RouterPipelineConfig | RouterConfig | None) -> RouterPipelineConfig:
    if config is None:
        return RouterPipelineConfig(run_dir=str(run_dir))
    if isinstance(config, RouterConfig):
        return RouterPipelineConfig(run_dir=str(run_dir), router=config)
    return dataclasses.replace(config, run_dir=str(run_dir))


def _load_models(run: RunDir, model: Any, tokenizer: Any, stacks: Any) -> tuple[Any, Any]:
    if stacks is None and model is not None:
        stacks = getattr(model, "_brainstacks", None)
    if stacks is None:
        if model is None:
            model, tokenizer = run.load_base()
        stacks = run.open_stacks(model)
    if tokenizer is None:
        tokenizer = run.load_tokenizer()
    return stacks, tokenizer


def train_router_for_run(
    run_dir: str | Path,
    config: RouterPipelineConfig | RouterConfig | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    stacks: Any = None,
) -> RouterRunResult:
    """Train, save and evaluate the meta-router of a finished SFT run (see the module docstring).

    Args:
        run_dir: The SFT run directory; outputs go to ``run_dir/router``.
        config: A :class:`RouterPipelineConfig`, or a bare :class:`RouterConfig` (pipeline defaults);
            its ``run_dir`` is replaced by ``run_dir``.
        model: Optional base model (stacks are loaded onto it from ``run_dir/stacks`` unless attached).
        tokenizer: Optional tokenizer (loaded from the run's model when missing).
        stacks: Optional :class:`BrainStacks` holding the run's frozen stacks (e.g. ``run_sft(...).stacks``).

    Returns:
        A :class:`RouterRunResult`; ``report.json`` holds the same report.
    """
    t_start = time.perf_counter()
    cfg = _resolve(run_dir, config)
    rc = cfg.router
    run = RunDir.open(run_dir, require_finished=True)
    run_dir = run.path
    out_dir = run.router_dir
    manifest = run.manifest
    run_config = run.run_config()
    stacks, tokenizer = _load_models(run, model, tokenizer, stacks)
    domains = list(stacks.domains)
    missing = [d for d in manifest.domain_order if d not in domains]
    if missing:
        logger.warning("domains without accepted stacks are not routable: %s", missing)
    bf16 = run_config.train.bf16 if cfg.eval_bf16 is None else cfg.eval_bf16
    fingerprint = router_fingerprint(stacks.model, run_config.stack)
    recipe = rc.feature_recipe()

    # ---- rows and examples
    train_rows = run.rows_by_domain(SFT_TRAIN)
    val_rows = run.rows_by_domain(SFT_VAL)
    for d, rows in val_rows.items():  # the encoded examples SFT validated on: same encoder, same rows
        encoded, _ = encode_rows(tokenizer, rows, run_config.train.max_length)
        by_id = {e["id"]: e for e in encoded}
        val_rows[d] = [{**r, "encoded": by_id[r["id"]]} for r in rows if r["id"] in by_id]
    ex = build_router_examples(cfg, domains, train_rows, val_rows, tokenizer)
    run.write_ids("router", {  # oracle examples by content id; validation rows by their row id
        "oracle_train": [e.example_id for e in ex.train], "oracle_val": [e.example_id for e in ex.val],
        "val_rows": [r["id"] for rows in ex.val_rows.values() for r in rows]})
    train_examples, val_examples, val_sel = ex.train, ex.val, ex.val_rows
    val_keys_all = {prompt_key(_prompt_of(e)) for e in val_examples}

    # ---- oracle
    t0 = time.perf_counter()
    oracle = run_oracle_on_stacks(stacks, tokenizer, train_examples + val_examples, rc,
                                  cache_dir=out_dir / "oracle_cache", progress=cfg.progress, bf16=bf16)
    oracle_s = time.perf_counter() - t0
    records = oracle.records
    by_id = {e.example_id: e for e in train_examples + val_examples}

    # ---- features (router rows, then every validation prompt for routing)
    row_prompts = [(by_id[r.example_id].instruction, by_id[r.example_id].input) for r in records]
    eval_prompts = {d: [(r["instruction"], r.get("input", "") or "") for r in rows] for d, rows in val_sel.items()}
    flat_eval = [p for ps in eval_prompts.values() for p in ps]
    from .features import FeatureCache

    cache = FeatureCache(out_dir / "feature_cache")
    t0 = time.perf_counter()
    feats, mask = cache.get_or_compute(stacks, tokenizer, row_prompts + flat_eval, recipe, fingerprint=fingerprint,
                                       batch_size=rc.feature_batch_size, progress=cfg.progress)
    features_s = time.perf_counter() - t0
    n = len(records)

    # ---- router training
    data = RouterData(feats[:n], mask[:n], oracle.targets(domains), [user_text(*p) for p in row_prompts],
                      torch.tensor([len(r.labels) > 1 for r in records]), domains)
    labels = {prompt_key(user_text(*p)): list(r.labels) for p, r in zip(row_prompts, records)}
    data, n_conflicts = merge_duplicate_prompts(data)
    val_idx = [i for i, p in enumerate(data.prompts) if prompt_key(p) in val_keys_all]
    train_idx = [i for i, p in enumerate(data.prompts) if prompt_key(p) not in val_keys_all]
    device = cfg.device or str(next(stacks.model.parameters()).device)
    t0 = time.perf_counter()
    result = train_router(data, rc, device=device, split=(train_idx, val_idx), progress=cfg.progress)
    train_s = time.perf_counter() - t0
    router = result.router
    meta = save_router(router, rc, out_dir, feature_recipe=recipe, base_fingerprint=fingerprint,
                       stacks=run.stack_index().identity())

    # ---- validation metrics
    vm = evaluate_router(router, data, 64, device, indices=val_idx)
    vdata = data.subset(val_idx)
    probs = router.predict(vdata.features.to(device), vdata.attention_mask.to(device)).float().cpu()
    lm = label_metrics(probs, domains, [labels[prompt_key(p)] for p in vdata.prompts], vdata.is_mixed)

    # ---- cross-domain analysis (single-domain oracle examples, train and validation)
    singles = [r for r in records if r.domain != MIXED_SOURCE]
    analysis = cross_domain_analysis(singles)
    mixed_analysis = cross_domain_analysis([r for r in records if r.domain == MIXED_SOURCE])
    plot_path = out_dir / PLOT_FILE
    if singles:
        plot_cross_domain(analysis, plot_path)

    # ---- routed losses on every validation example
    feats_eval, mask_eval = feats[n:], mask[n:]
    routes_flat = route_features(router, feats_eval, mask_eval, rc.chat_floor, rc.chat_domain, rc.gate_threshold) \
        if flat_eval else []
    routes: dict[str, list[Route]] = {}
    pos = 0
    for d, ps in eval_prompts.items():
        routes[d] = routes_flat[pos: pos + len(ps)]
        pos += len(ps)
    enc = {d: [r["encoded"] for r in rows] for d, rows in val_sel.items()}
    t0 = time.perf_counter()
    loss_table, per_example = evaluate_val_losses(stacks, enc, routes, bf16, cfg.progress)
    eval_s = time.perf_counter() - t0
    val_routes = [
        {"domain": d, "id": row["id"], "prompt": user_text(row["instruction"], row.get("input", "") or "")[:200],
         "weights": route.weights, "scores": route.scores, "gated_on": route.gated_on, "gap": route.gap,
         "losses": per_example[d][i]}
        for d, rows in val_sel.items() for i, (row, route) in enumerate(zip(rows, routes[d]))
    ]

    # ---- timing
    # round-robin over domains, so every domain's prompts are timed
    interleaved = [p for group in itertools.zip_longest(*eval_prompts.values()) for p in group if p is not None]
    timing_prompts = interleaved[: cfg.timing_prompts]
    timing = measure_timing(stacks, tokenizer, router, meta, timing_prompts, cfg.generation_prompts,
                            cfg.generation_tokens)
    timing.update({"oracle_s": oracle_s, "features_s": features_s, "router_train_s": train_s, "loss_eval_s": eval_s,
                   "features_computed": cache.misses,
                   "features_batched_ms_per_prompt": features_s * 1000.0 / cache.misses if cache.misses else None})

    report = {
        "format_version": REPORT_FORMAT_VERSION,
        "run_dir": str(run_dir),
        "router_dir": str(out_dir),
        "domains": domains,
        "config": cfg.to_dict(),
        "data": {
            **ex.info,
            "oracle_skipped": len(oracle.skipped),
            "merged_duplicate_prompts": n_conflicts,
            "router_rows": {"train": len(train_idx), "val": len(val_idx)},
            "prompt_overlap": len({prompt_key(p) for p in data.subset(train_idx).prompts}
                                  & {prompt_key(p) for p in vdata.prompts}),
        },
        "oracle": {"n_cached": oracle.n_cached, "n_computed": oracle.n_computed,
                   "search": "exhaustive" if len(domains) <= rc.exhaustive_max_domains else "greedy",
                   "n_skipped": len(oracle.skipped)},
        "router": {"best_epoch": result.best_epoch, "epochs": rc.epochs, "best_composite": result.best_score,
                   "n_params": meta["n_params"], "history": result.history_dicts()},
        "validation": {**vm, **lm, "n_single": int((~vdata.is_mixed).sum()), "n_mixed": int(vdata.is_mixed.sum())},
        "cross_domain": analysis,
        "cross_domain_mixed": mixed_analysis,
        "cross_domain_plot": PLOT_FILE if singles else None,
        "val_routes_summary": {d: route_summary(rs, domains) for d, rs in routes.items()},
        "val_losses": loss_table,
        "losses_bf16": bf16,
        "manifest_prefix_loss": {d: manifest.domain(d).final_prefix_loss for d in domains},
        "timing": timing,
        "total_s": time.perf_counter() - t_start,
    }
    report = json_safe(report)
    atomic_write_json(out_dir / REPORT_FILE, report)
    atomic_write_json(out_dir / VAL_ROUTES_FILE, json_safe(val_routes))
    logger.info("router report written to %s", out_dir / REPORT_FILE)
    return RouterRunResult(router, meta, report, out_dir, result, list(data.subset(train_idx).prompts),
                           list(vdata.prompts), val_routes)
