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

**Several processes** (``torchrun --nproc_per_node N -m brainstacks_hooks.cli.main router RUN_DIR``): the
three passes over examples, the oracle, the features and the loss table, are sharded by batch (oracle,
features) or by example (loss table) and gathered back in order, so every process holds the features and
targets one process computes (:func:`~brainstacks_hooks.utils.distributed.map_sharded`). The main process reads
and writes the caches, trains the router (small; the others receive it, so all route alike), measures the timings
and writes every file of ``router/``; every process returns the same report.

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
from ..errors import ConfigError, RunDirError
from ..run_dir import ROUTER_TEST, ROUTER_TRAIN, SFT_TRAIN, RunDir
from ..utils import distributed
from ..utils.io import atomic_write_json
from ..utils.logging import get_logger, log_on_main_process_only
from .analysis import cross_domain_analysis, plot_cross_domain
from .config import RouterConfig
from .examples import MIXED_SOURCE, build_mixed_examples, build_router_examples, user_text
from .gating import Route, route_features
from .metrics import (
    gap_summary,
    label_metrics,
    label_top1,
    linear_probe,
    mean_pool,
    measure_timing,
    recovered_fraction,
    route_summary,
)
from .mode_losses import LOSS_MODES, evaluate_val_losses, example_nll
from .model import MetaRouter
from .oracle import run_oracle_on_stacks, targets_tensor
from .report import PLOT_FILE, REPORT_FILE, REPORT_FORMAT_VERSION, VAL_ROUTES_FILE, json_safe, summary_table
from .serialization import save_router
from .serving import load_run_router, route_prompt, router_fingerprint
from .train import (
    RouterData,
    RouterTrainResult,
    evaluate_router,
    merge_duplicate_prompts,
    split_by_prompt,
    train_router,
)

logger = get_logger(__name__)

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
        run_dir: Finished SFT run directory.
        router: Router, oracle and gating settings (paper defaults).
        oracle_rows_per_domain: Oracle (outcome-target) rows per domain from ``rows/router_train`` (rows no
            stack trained on); ``None``: all recorded rows.
        label_rows_per_domain: Label-only rows per domain from ``rows/sft_train`` (features only, target =
            the source domain): cheap rows that teach the router which domain a prompt belongs to.
        test_rows_per_domain: Held-out rows per domain from ``rows/router_test`` for the classification
            metrics and the gap signal; ``None``: all recorded rows.
        test_oracle_rows_per_domain: Of those, how many also get the oracle and the loss table (costly).
        mixed_pairs: Synthetic mixed prompts for training, built from oracle rows (see the module docstring).
        test_mixed_pairs: Synthetic mixed prompts built from test rows (the held-out ``mixed_set`` metric).
        eval_bf16: bf16 autocast for the oracle and the loss table; ``None`` follows the run's ``train.bf16``
            (the precision of the SFT evaluator, so oracle, SFT and loss-table losses are comparable).
        oracle_mixed_batches: Run the candidate routes of an example together in mixed-route forwards.
        timing_prompts: Test prompts routed one at a time to time features + router.
        generation_prompts: Prompts whose routed generation is timed (0 disables).
        generation_tokens: New tokens generated per timed prompt.
        seed: Seed of the row samples and of the mixed pairs.
        device: Router training device (``None``: the base model's device).
        progress: Show tqdm bars.
    """

    run_dir: str = "runs/quickstart"
    router: RouterConfig = field(default_factory=RouterConfig)
    oracle_rows_per_domain: int | None = None
    label_rows_per_domain: int = 200
    test_rows_per_domain: int | None = None
    test_oracle_rows_per_domain: int = 20
    mixed_pairs: int = 32
    test_mixed_pairs: int = 12
    eval_bf16: bool | None = None
    oracle_mixed_batches: bool = True
    timing_prompts: int = 8
    generation_prompts: int = 2
    generation_tokens: int = 64
    seed: int = 42
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.router, Mapping):
            self.router = RouterConfig.from_dict(dict(self.router))
        for name in ("oracle_rows_per_domain", "test_rows_per_domain"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"{name} must be >= 0 or null (got {v})")
        for name in ("label_rows_per_domain", "test_oracle_rows_per_domain", "mixed_pairs", "test_mixed_pairs",
                     "timing_prompts", "generation_prompts"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.generation_tokens < 1:
            raise ConfigError(f"generation_tokens must be >= 1 (got {self.generation_tokens})")

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
        train_prompts: Prompt texts (user text) the router trained on (oracle and label-only rows).
        test_prompts: Held-out prompt texts it was measured on.
        val_routes: Route and per-mode losses of every loss-table example.
    """

    router: MetaRouter
    meta: dict[str, Any]
    report: dict[str, Any]
    router_dir: Path
    train_result: RouterTrainResult
    train_prompts: list[str]
    test_prompts: list[str]
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


def _pairs(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r["instruction"], r.get("input", "") or "") for r in rows]


@dataclass
class RouterInputs:
    """Everything the router trains on and is measured on, prepared once (oracle and features cached).

    ``data`` holds the training rows (oracle rows, then label-only rows, duplicates merged) and ``split`` the
    checkpoint-selection split of them; ``test_*`` are the held-out rows (trained and gap domains).
    """

    ex: Any
    oracle: Any
    train_records: list[Any]
    test_records: list[Any]
    by_id: dict[str, Any]
    data: RouterData
    split: tuple[list[int], list[int]]
    n_conflicts: int
    test_flat: list[tuple[str, dict[str, Any]]]
    test_features: torch.Tensor
    test_mask: torch.Tensor
    test_oracle_prompts: list[tuple[str, str]]
    test_oracle_features: torch.Tensor
    test_oracle_mask: torch.Tensor
    timings: dict[str, float]
    features_computed: int


def prepare_router_inputs(run: RunDir, cfg: RouterPipelineConfig, stacks: Any, tokenizer: Any, *,
                          shard: bool = True) -> RouterInputs:
    """Examples from the run's recorded rows, oracle targets and features (both through their disk caches).

    ``shard``: under several processes the oracle and the features are split over them (collective: every
    process calls it; see the module docstring); a no-op in a single process.
    """
    rc, out_dir, domains = cfg.router, run.router_dir, list(stacks.domains)
    run_config = run.run_config()
    bf16 = run_config.train.bf16 if cfg.eval_bf16 is None else cfg.eval_bf16
    fingerprint = router_fingerprint(stacks.model, run_config.stack)
    recipe = rc.feature_recipe()
    # ---- rows and examples (every test prompt is unseen by SFT and by the router)
    ex = build_router_examples(cfg, domains, run.rows_by_domain(ROUTER_TRAIN), run.rows_by_domain(SFT_TRAIN),
                               run.rows_by_domain(ROUTER_TEST), tokenizer)
    run.write_ids("router", {
        "oracle_train": [e.example_id for e in ex.oracle_train], "test_oracle": [e.example_id for e in ex.test_oracle],
        "label_only": [r["id"] for rows in ex.label_rows.values() for r in rows],
        "test": [r["id"] for rows in (*ex.test.values(), *ex.gap_rows.values()) for r in rows]})

    # ---- oracle: training rows and the test rows of the loss table
    t0 = time.perf_counter()
    oracle = run_oracle_on_stacks(stacks, tokenizer, ex.oracle_train + ex.test_oracle, rc,
                                  cache_dir=out_dir / "oracle_cache", progress=cfg.progress, bf16=bf16,
                                  mixed_batches=cfg.oracle_mixed_batches, shard=shard)
    oracle_s = time.perf_counter() - t0
    records = {r.example_id: r for r in oracle.records}
    train_records = [records[e.example_id] for e in ex.oracle_train if e.example_id in records]
    test_records = [records[e.example_id] for e in ex.test_oracle if e.example_id in records]
    by_id = {e.example_id: e for e in ex.oracle_train + ex.test_oracle}

    # ---- features: training rows (oracle, label-only), then every test prompt
    oracle_prompts = [(by_id[r.example_id].instruction, by_id[r.example_id].input) for r in train_records]
    label_flat = [(d, r) for d, rows in ex.label_rows.items() for r in rows]
    test_flat = [(d, r) for d, rows in (*ex.test.items(), *ex.gap_rows.items()) for r in rows]
    test_oracle_prompts = [(by_id[r.example_id].instruction, by_id[r.example_id].input) for r in test_records]
    all_prompts = (oracle_prompts + _pairs([r for _, r in label_flat]) + _pairs([r for _, r in test_flat])
                   + test_oracle_prompts)
    from .features import FeatureCache

    cache = FeatureCache(out_dir / "feature_cache")
    t0 = time.perf_counter()
    feats, mask = cache.get_or_compute(stacks, tokenizer, all_prompts, recipe, fingerprint=fingerprint,
                                       batch_size=rc.feature_batch_size, progress=cfg.progress, shard=shard)
    features_s = time.perf_counter() - t0
    n_or, n_lab, n_test = len(oracle_prompts), len(label_flat), len(test_flat)
    sl_train, sl_test = slice(0, n_or + n_lab), slice(n_or + n_lab, n_or + n_lab + n_test)
    sl_test_oracle = slice(n_or + n_lab + n_test, len(all_prompts))

    # ---- router training: oracle targets + label-only targets; checkpoint on a prompt split of these rows
    prior = domain_priors(train_records, domains)
    label_targets = torch.stack([prior[d] for d, _ in label_flat]) if label_flat else torch.zeros(0, len(domains))
    targets = torch.cat([targets_for(train_records, domains), label_targets])
    train_texts = [user_text(*p) for p in oracle_prompts] + [user_text(*p) for p in _pairs([r for _, r in label_flat])]
    is_mixed = torch.tensor([len(r.labels) > 1 for r in train_records] + [False] * n_lab)
    data = RouterData(feats[sl_train], mask[sl_train], targets, train_texts, is_mixed, domains)
    data, n_conflicts = merge_duplicate_prompts(data)
    train_idx, val_idx = split_by_prompt(data.prompts, rc.val_fraction, rc.seed, rc.min_val_groups)
    return RouterInputs(ex, oracle, train_records, test_records, by_id, data, (train_idx, val_idx), n_conflicts,
                        test_flat, feats[sl_test], mask[sl_test], test_oracle_prompts, feats[sl_test_oracle],
                        mask[sl_test_oracle], {"oracle_s": oracle_s, "features_s": features_s}, cache.misses)


def held_out_metrics(router: MetaRouter, inputs: RouterInputs, rc: RouterConfig, device: str
                     ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, list[Route]]]:
    """Top-1 against the source domain on held-out prompts (with margin and spread), the linear-probe baseline
    on the same features, and the gap signal; plus the routes of every test prompt by domain."""
    domains, test_flat = list(router.domains), inputs.test_flat
    test_feats, test_mask = inputs.test_features, inputs.test_mask
    probs = router.predict(test_feats.to(device), test_mask.to(device)).float().cpu() if test_flat else None
    in_dom = [i for i, (d, _) in enumerate(test_flat) if d in domains]
    test_labels = [test_flat[i][0] for i in in_dom]
    held_out = {**(label_top1(probs[in_dom], domains, test_labels, rc.top1_margin) if in_dom else {}),
                "n": len(in_dom)}
    data = inputs.data
    probe = None
    if in_dom:
        probe = linear_probe(mean_pool(data.features, data.attention_mask), data.targets.argmax(1),
                             mean_pool(test_feats[in_dom], test_mask[in_dom]), len(domains), seed=rc.seed)
    probe_metrics = {**(label_top1(probe, domains, test_labels, 0.0) if probe is not None else {}), "n": len(in_dom)}
    routes_test = route_features(router, test_feats, test_mask, rc.chat_floor, rc.chat_domain,
                                 rc.gate_threshold) if test_flat else []
    routes_by_test_domain: dict[str, list[Route]] = {}
    for (d, _), route in zip(test_flat, routes_test):
        routes_by_test_domain.setdefault(d, []).append(route)
    return held_out, probe_metrics, gap_summary(routes_by_test_domain, domains), routes_by_test_domain


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

    Under ``torchrun`` every process calls it (see the module docstring); each returns the main process's report.

    Returns:
        A :class:`RouterRunResult`; ``report.json`` holds the same report.

    Raises:
        RunDirError: the run is unfinished, or recorded no router rows (a run from before they existed:
            rerun its train command, which records them and trains nothing).
    """
    t_start = time.perf_counter()
    cfg = _resolve(run_dir, config)
    rc = cfg.router
    run = RunDir.open(run_dir, require_finished=True)
    if not (run.has_rows(ROUTER_TRAIN) and run.has_rows(ROUTER_TEST)):
        raise RunDirError(f"{run.path}: no router rows recorded (rows/{ROUTER_TRAIN}.jsonl); rerun its train "
                          "command (`brainstacks train CONFIG output_dir=...`): it records them and trains nothing")
    run_dir, out_dir, manifest, run_config = run.path, run.router_dir, run.manifest, run.run_config()
    distributed.init_distributed(cpu=_use_cpu(run_config))  # before the model loads (a GPU per process)
    log_on_main_process_only()
    if not distributed.is_main_process():
        cfg = dataclasses.replace(cfg, progress=False)
    stacks, tokenizer = _load_models(run, model, tokenizer, stacks)
    domains = list(stacks.domains)
    missing = [d for d in manifest.domain_order if d not in domains]
    if missing:
        logger.warning("domains without accepted stacks are not routable: %s", missing)
    bf16 = run_config.train.bf16 if cfg.eval_bf16 is None else cfg.eval_bf16
    fingerprint = router_fingerprint(stacks.model, run_config.stack)
    recipe = rc.feature_recipe()

    inputs = prepare_router_inputs(run, cfg, stacks, tokenizer)
    ex, oracle, data, n_conflicts = inputs.ex, inputs.oracle, inputs.data, inputs.n_conflicts
    train_idx, val_idx = inputs.split
    test_records, by_id = inputs.test_records, inputs.by_id
    oracle_s, features_s = inputs.timings["oracle_s"], inputs.timings["features_s"]
    device = cfg.device or str(next(stacks.model.parameters()).device)
    t0 = time.perf_counter()
    result = _shared(distributed.on_main_process(train_router, data, rc, device=device, split=(train_idx, val_idx),
                                                 progress=cfg.progress), device)
    train_s = time.perf_counter() - t0
    router = result.router
    meta = distributed.broadcast_object(distributed.on_main_process(
        save_router, router, rc, out_dir, feature_recipe=recipe, base_fingerprint=fingerprint,
        stacks=run.stack_index().identity()))

    # ---- held-out metrics (rows neither SFT nor the router trained on)
    held_out, probe_metrics, gap, routes_by_test_domain = held_out_metrics(router, inputs, rc, device)
    # against the oracle targets of the test rows (single and mixed)
    n_to = len(test_records)
    odata = RouterData(inputs.test_oracle_features, inputs.test_oracle_mask, targets_for(test_records, domains),
                       [user_text(*p) for p in inputs.test_oracle_prompts],
                       torch.tensor([len(r.labels) > 1 for r in test_records]), domains) if n_to else None
    vm = evaluate_router(router, odata, 64, device, min_margin=rc.top1_margin) if odata is not None else {}
    lm = label_metrics(router.predict(odata.features.to(device), odata.attention_mask.to(device)).float().cpu(),
                       domains, [r.labels for r in test_records], odata.is_mixed) if odata is not None else {}

    # ---- cross-domain analysis (single-domain oracle examples, train and test)
    singles = [r for r in oracle.records if r.domain != MIXED_SOURCE]
    analysis = cross_domain_analysis(singles)
    mixed_analysis = cross_domain_analysis([r for r in oracle.records if r.domain == MIXED_SOURCE])
    plot_path = out_dir / PLOT_FILE
    if singles:
        distributed.on_main_process(plot_cross_domain, analysis, plot_path)

    # ---- loss table on the single-domain test oracle rows
    single_test = [(r, i) for i, r in enumerate(test_records) if r.domain != MIXED_SOURCE]
    routes_to = route_features(router, inputs.test_oracle_features, inputs.test_oracle_mask, rc.chat_floor,
                               rc.chat_domain, rc.gate_threshold) if n_to else []
    enc_rows: dict[str, list[dict[str, Any]]] = {}
    enc_routes: dict[str, list[Route]] = {}
    enc_oracle: dict[str, list[float | None]] = {}
    enc_labels: dict[str, list[tuple[str, ...]]] = {}
    row_ids: dict[str, list[str]] = {}
    for r, i in single_test:
        e = by_id[r.example_id]
        encoded, _ = encode_rows(tokenizer, [{"id": r.example_id, "instruction": e.instruction, "input": e.input,
                                              "output": e.output}], rc.oracle_max_length)
        if not encoded:
            continue
        enc_rows.setdefault(r.domain, []).append(encoded[0])
        enc_routes.setdefault(r.domain, []).append(routes_to[i])
        enc_oracle.setdefault(r.domain, []).append(r.best_loss)
        enc_labels.setdefault(r.domain, []).append(tuple(r.labels))
        row_ids.setdefault(r.domain, []).append(r.example_id)
    t0 = time.perf_counter()
    loss_table, per_example = evaluate_val_losses(stacks, enc_rows, enc_routes, bf16, cfg.progress, enc_oracle,
                                                  shard=True, oracle_config=rc, oracle_labels=enc_labels)
    eval_s = time.perf_counter() - t0
    val_routes = []
    for d in enc_rows:
        for i, route in enumerate(enc_routes[d]):
            e = by_id[row_ids[d][i]]
            val_routes.append({"domain": d, "id": ex.row_ids.get(e.example_id), "example_id": e.example_id,
                               "prompt": user_text(e.instruction, e.input)[:200], "weights": route.weights,
                               "scores": route.scores, "gated_on": route.gated_on, "gap": route.gap,
                               "losses": per_example[d][i]})

    # ---- timing: round-robin over domains, so every domain's prompts are timed
    per_domain_prompts = [_pairs(rows) for rows in ex.test.values()]
    interleaved = [p for group in itertools.zip_longest(*per_domain_prompts) for p in group if p is not None]
    timing = distributed.on_main_process(measure_timing, stacks, tokenizer, router, meta,  # timed once, by the main
                                         interleaved[: cfg.timing_prompts], cfg.generation_prompts,
                                         cfg.generation_tokens) or {}
    timing.update({"oracle_s": oracle_s, "features_s": features_s, "router_train_s": train_s, "loss_eval_s": eval_s,
                   "features_computed": inputs.features_computed, "oracle_computed": oracle.n_computed,
                   "oracle_examples_per_min": oracle.n_computed / oracle_s * 60 if oracle.n_computed else None,
                   "features_batched_ms_per_prompt": features_s * 1000.0 / inputs.features_computed
                   if inputs.features_computed else None})

    report = {
        "format_version": REPORT_FORMAT_VERSION,
        "run_dir": str(run_dir),
        "router_dir": str(out_dir),
        "domains": domains,
        "config": cfg.to_dict(),
        "data": {**ex.info, "oracle_skipped": len(oracle.skipped), "merged_duplicate_prompts": n_conflicts,
                 "router_rows": {"train": len(train_idx), "checkpoint_val": len(val_idx)}},
        "oracle": {"n_cached": oracle.n_cached, "n_computed": oracle.n_computed,
                   "search": "exhaustive" if len(domains) <= rc.exhaustive_max_domains else "greedy",
                   "n_skipped": len(oracle.skipped), "mixed_batches": cfg.oracle_mixed_batches},
        "router": {"best_epoch": result.best_epoch, "epochs": rc.epochs, "best_composite": result.best_score,
                   "n_params": meta["n_params"], "history": result.history_dicts()},
        "held_out": held_out,
        "linear_probe": probe_metrics,
        "validation": {**vm, **lm, "n_single": int((~odata.is_mixed).sum()) if odata is not None else 0,
                       "n_mixed": int(odata.is_mixed.sum()) if odata is not None else 0},
        "gap": gap,
        "cross_domain": analysis,
        "cross_domain_mixed": mixed_analysis,
        "cross_domain_plot": PLOT_FILE if singles else None,
        "test_routes_summary": {d: route_summary(rs, domains) for d, rs in routes_by_test_domain.items()},
        "val_losses": loss_table,
        "losses_bf16": bf16,
        "manifest_prefix_loss": {d: manifest.domain(d).final_prefix_loss for d in domains},
        "timing": timing,
        "total_s": time.perf_counter() - t_start,
    }
    report = distributed.broadcast_object(json_safe(report))  # the main process's timings on every process
    distributed.on_main_process(_write_report, out_dir, report, json_safe(val_routes))
    return RouterRunResult(router, meta, report, out_dir, result, list(data.subset(train_idx).prompts),
                           [user_text(*p) for p in _pairs([r for _, r in inputs.test_flat])], val_routes)


def _use_cpu(run_config: Any) -> bool:
    """The run's ``train.use_cpu`` when set, else no GPU (as SFT decides; gloo on the CPU, nccl on GPUs)."""
    flag = run_config.train.use_cpu
    return flag if flag is not None else not torch.cuda.is_available()


def _shared(result: RouterTrainResult | None, device: str) -> RouterTrainResult:
    """Several processes: the main process's trained router on every process (on this process's ``device``)."""
    if distributed.is_initialized():
        if result is not None:
            result.router.to("cpu")  # pickled for the broadcast: a CUDA tensor would come back on the main's GPU
        result = distributed.broadcast_object(result)
        result.router.to(device)
    return result  # type: ignore[return-value]


def _write_report(out_dir: Path, report: dict[str, Any], val_routes: Any) -> None:
    atomic_write_json(out_dir / REPORT_FILE, report)
    atomic_write_json(out_dir / VAL_ROUTES_FILE, val_routes)
    logger.info("router report written to %s", out_dir / REPORT_FILE)


def domain_priors(records: list[Any], domains: list[str]) -> dict[str, torch.Tensor]:
    """Target of a label-only row of each domain: the mean oracle target of that domain's oracle rows.

    A label-only row has no oracle run of its own; its source domain's typical outcome (which stacks help that
    domain's prompts, e.g. ``math: 1.0, code: 0.5``) is a better target than the bare label, which would
    teach the router to route every prompt to its own domain only. A domain without oracle rows gets its
    one-hot label.
    """
    out = {}
    for i, d in enumerate(domains):
        own = [r for r in records if r.domain == d]
        out[d] = targets_for(own, domains).mean(0) if own else torch.eye(len(domains))[i]
    return out


def targets_for(records: list[Any], domains: list[str]) -> torch.Tensor:
    """Final oracle targets ``[N, n_domains]`` of ``records``."""
    return targets_tensor(records, domains).reshape(-1, len(domains))
