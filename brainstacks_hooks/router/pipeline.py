"""The meta-router as a pipeline step after SFT: oracle, features, training, evaluation (paper 3.6, 5.1, 5.3).

``train_router_for_run(run_dir, config)`` works on a finished SFT run directory (``manifest.json`` and the
``stacks/`` folder that :meth:`BrainStacks.save` wrote) and leaves everything under ``run_dir/router``::

    router.json, router.safetensors   the router (:func:`~.serialization.save_router`)
    oracle_cache/                     per-domain oracle losses (:class:`~.oracle.OracleCache`)
    feature_cache/                    base-model features (:class:`~.features.FeatureCache`)
    report.json                       metrics, cross-domain table, timings, prefix/ungated/routed losses
    val_routes.json                   the route and loss of every validation example
    cross_domain.png                  plot of the cross-domain table

**Examples.** Every domain contributes single-domain (prompt, answer) pairs:

* *router training*: a seeded sample of ``samples_per_domain`` of the domain's SFT **train** rows (after
  the run's decontamination, so a row reassigned to another domain counts for that domain);
* *router validation*: the domain's SFT **validation** rows (a seeded sample of ``val_samples_per_domain``
  when set). These are also the rows whose losses are reported in prefix, ungated and routed modes.

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
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import statistics
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import from_dict, to_dict
from ..constants import MANIFEST_FILE, STACKS_INDEX_FILE
from ..data.formatting import build_messages, encode_prompt
from ..errors import ConfigError, DataError, StackLoadError
from ..utils.io import atomic_write_json, read_json
from ..utils.logging import get_logger
from ..utils.seeding import seeded_sample_indices
from .config import RouterConfig
from .gating import Route, route_features, route_prompts
from .model import MetaRouter
from .oracle import OracleExample, cross_domain_analysis, plot_cross_domain, run_oracle_on_stacks
from .serialization import load_router, save_router
from .train import (
    RouterData,
    RouterTrainResult,
    evaluate_router,
    merge_duplicate_prompts,
    prompt_key,
    train_router,
)

logger = get_logger(__name__)

REPORT_FORMAT_VERSION = 1
ROUTER_SUBDIR = "router"
REPORT_FILE = "report.json"
VAL_ROUTES_FILE = "val_routes.json"
PLOT_FILE = "cross_domain.png"
#: Source-domain tag of synthetic mixed examples (their oracle cache file and analysis group).
MIXED_SOURCE = "_mixed"
LOSS_MODES = ("prefix", "ungated", "routed", "base")


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


# --------------------------------------------------------------------------------------------- run loading
def read_run_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The manifest of a finished SFT run; raises :class:`StackLoadError` when missing or unfinished."""
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST_FILE
    if not path.is_file():
        raise StackLoadError(f"{path}: not found (is {run_dir} an SFT run directory?)")
    manifest = read_json(path)
    order = list(manifest.get("domain_order", []))
    pending = [d for d in order if manifest.get("domains", {}).get(d, {}).get("status") != "done"]
    if not order or pending:
        raise StackLoadError(f"{path}: SFT is not finished (domains not done: {pending or 'all'}); "
                             "rerun the train command to resume it")
    if not (run_dir / "stacks" / STACKS_INDEX_FILE).is_file():
        raise StackLoadError(f"{run_dir / 'stacks'}: no saved stacks ({STACKS_INDEX_FILE} missing)")
    return manifest


def run_config_from_manifest(manifest: Mapping[str, Any]) -> Any:
    """The :class:`~brainstacks_hooks.training.config.RunConfig` a run was trained with."""
    from ..training.config import RunConfig

    return from_dict(RunConfig, dict(manifest["config"]))


def load_run_base(run_config: Any) -> tuple[Any, Any]:
    """Load the base model and tokenizer named by a run config (model name, backend, dtype, revision)."""
    from ..models.loading import load_base_model

    m = run_config.model
    return load_base_model(m.name_or_path, backend=m.backend, dtype=m.dtype, revision=m.revision,
                           max_seq_length=m.max_seq_length)


def router_fingerprint(model: Any, stack_config: Any) -> dict[str, Any]:
    """Base fingerprint the router is keyed by: the stacks' fingerprint, computable without attaching hooks.

    Equals ``BrainStacks.fingerprint_dict()`` of stacks attached to ``model`` with ``stack_config``, so
    the bare base model (``brainstacks route``) and the model with stacks agree.
    """
    from ..models.fingerprint import ModelFingerprint
    from ..models.targets import find_target_modules

    stacks = getattr(model, "_brainstacks", None)
    if stacks is not None:
        return stacks.fingerprint_dict()
    return ModelFingerprint.from_model(model, find_target_modules(model, stack_config.target_modules)).to_dict()


# ------------------------------------------------------------------------------------------------ examples
def user_text(instruction: str, input: str = "") -> str:
    """The user turn of a prompt (instruction, then input after a blank line): the router's prompt key."""
    return build_messages(instruction, input)[-1]["content"]


def _row_key(row: Mapping[str, Any]) -> str:
    return prompt_key(user_text(row["instruction"], row.get("input", "") or ""))


def load_run_rows(run_config: Any, tokenizer: Any) -> tuple[dict[str, list[dict]], dict[str, list[dict]], dict]:
    """Raw train and validation rows per domain, exactly the run's SFT data (after decontamination).

    :func:`~brainstacks_hooks.training.data.prepare_run_data` decides which examples the run used; the raw
    rows (instruction, input, output) are looked up by id, so a row reassigned by decontamination counts
    for its new domain. Validation rows keep the encoded example under ``"encoded"``.

    Returns:
        ``(train_rows, val_rows, data_report)``.
    """
    from ..data.sources import load_domain_rows
    from ..training.data import prepare_run_data

    data = prepare_run_data(run_config, tokenizer)
    by_id: dict[str, dict[str, Any]] = {}
    for dom in run_config.domains:
        if dom.hf_sources:
            rows, _ = load_domain_rows(dom.name, "train", hf_sources=dom.hf_sources, seed=run_config.seed)
            splits = [rows]
        else:
            splits = [load_domain_rows(dom.name, split, data_dir=run_config.data_dir, n=n, seed=run_config.seed)[0]
                      for split, n in (("train", dom.train_samples), ("val", dom.val_samples))]
        for rows in splits:
            for r in rows:
                by_id.setdefault(r["id"], r)

    def lookup(examples: list[dict[str, Any]], keep_encoded: bool) -> list[dict[str, Any]]:
        out = []
        for e in examples:
            if e["id"] not in by_id:
                raise DataError(f"example {e['id']!r} of the run has no raw row (data changed since SFT?)")
            row = dict(by_id[e["id"]])
            if keep_encoded:
                row["encoded"] = e
            out.append(row)
        return out

    train = {d: lookup(v, False) for d, v in data.train.items()}
    val = {d: lookup(v, True) for d, v in data.val.items()}
    return train, val, data.report


def build_mixed_examples(
    pools: Mapping[str, Sequence[Mapping[str, Any]]],
    n_pairs: int,
    seed: int,
    tokenizer: Any = None,
    max_prompt_tokens: int | None = None,
    max_draws: int = 20,
) -> list[OracleExample]:
    """Deterministic synthetic two-domain examples (rules in the module docstring).

    Args:
        pools: Rows (``instruction``, ``input``, ``output``) per domain, in domain order.
        n_pairs: Number of mixed examples wanted (fewer when draws keep failing).
        seed: Seed of the row draws.
        tokenizer, max_prompt_tokens: When both are given, joined prompts longer than this many tokens
            (as :func:`encode_prompt` renders them) are redrawn.
        max_draws: Draws per pair before it is given up.

    Returns:
        :class:`OracleExample` list with source ``MIXED_SOURCE`` and labels ``(a, b)``.
    """
    domains = [d for d, rows in pools.items() if rows]
    pairs = list(itertools.combinations(domains, 2))
    if not pairs or n_pairs <= 0:
        return []
    rng = random.Random(seed)
    out: list[OracleExample] = []
    seen: set[str] = set()
    for k in range(n_pairs):
        a, b = pairs[k % len(pairs)]
        if (k // len(pairs)) % 2:
            a, b = b, a
        for _ in range(max_draws):
            ra, rb = rng.choice(list(pools[a])), rng.choice(list(pools[b]))
            instruction = f"{user_text(ra['instruction'], ra.get('input', ''))}\n\n" \
                          f"{user_text(rb['instruction'], rb.get('input', ''))}"
            if prompt_key(instruction) in seen:
                continue
            if tokenizer is not None and max_prompt_tokens is not None:
                if len(encode_prompt(tokenizer, instruction)["input_ids"]) > max_prompt_tokens:
                    continue
            seen.add(prompt_key(instruction))
            output = f"{ra['output']}\n\n{rb['output']}"
            out.append(OracleExample.make(MIXED_SOURCE, instruction, "", output, labels=(a, b)))
            break
        else:
            logger.warning("mixed pair %d (%s+%s): no short enough unique prompt in %d draws", k, a, b, max_draws)
    return out


def _single_example(domain: str, row: Mapping[str, Any]) -> OracleExample:
    return OracleExample.make(domain, row["instruction"], row.get("input", "") or "", row["output"])


def _prompt_of(e: OracleExample) -> str:
    return user_text(e.instruction, e.input)


@dataclass
class RouterExamples:
    """The router's examples, split by prompt (see the module docstring).

    Attributes:
        train: Training oracle examples (single-domain, then mixed).
        val: Validation oracle examples (single-domain, then mixed).
        val_rows: The validation rows per domain (with their ``"encoded"`` SFT example) for the loss table.
        info: Counts for the report.
    """

    train: list[OracleExample]
    val: list[OracleExample]
    val_rows: dict[str, list[dict[str, Any]]]
    info: dict[str, Any]


def build_router_examples(
    cfg: RouterPipelineConfig,
    domains: Sequence[str],
    train_rows: Mapping[str, Sequence[dict[str, Any]]],
    val_rows: Mapping[str, Sequence[dict[str, Any]]],
    tokenizer: Any = None,
) -> RouterExamples:
    """Sample single-domain rows, build mixed prompts and keep every validation prompt out of training.

    Raises:
        DataError: a prompt ended up on both sides (a guard; unreachable by construction).
    """
    rc = cfg.router
    val_sel = {d: [val_rows[d][i] for i in seeded_sample_indices(len(val_rows[d]), cfg.val_samples_per_domain,
                                                                 cfg.seed + 1)]
               for d in domains if d in val_rows}
    val_keys = {_row_key(r) for rows in val_sel.values() for r in rows}
    n_overlap = 0
    train_pool: dict[str, list[dict[str, Any]]] = {}
    for d in domains:
        rows = [r for r in train_rows.get(d, []) if _row_key(r) not in val_keys]
        n_overlap += len(train_rows.get(d, [])) - len(rows)
        train_pool[d] = rows
    if n_overlap:
        logger.info("dropped %d train rows whose prompt is also a validation prompt", n_overlap)
    train_single = [_single_example(d, rows[i]) for d, rows in train_pool.items()
                    for i in seeded_sample_indices(len(rows), cfg.train_samples, cfg.seed)]
    val_single = [_single_example(d, r) for d, rows in val_sel.items() for r in rows]
    # a mixed prompt must fit the router's window and leave the oracle room for 16 answer tokens
    max_mixed = max(1, min(rc.seq_len, rc.oracle_max_length - 16))
    train_mixed = build_mixed_examples(train_pool, cfg.mixed_pairs, cfg.seed, tokenizer, max_mixed)
    val_mixed = build_mixed_examples(val_sel, cfg.val_mixed_pairs, cfg.seed + 1, tokenizer, max_mixed)
    train, val = train_single + train_mixed, val_single + val_mixed
    both = {prompt_key(_prompt_of(e)) for e in train} & {prompt_key(_prompt_of(e)) for e in val}
    if both:
        raise DataError(f"{len(both)} prompts on both sides of the router split")
    info = {
        "oracle_train_single": dict(Counter(e.domain for e in train_single)),
        "oracle_train_mixed": len(train_mixed),
        "val_single": {d: len(rows) for d, rows in val_sel.items()},
        "val_mixed": len(val_mixed),
        "train_rows_dropped_as_val_prompts": n_overlap,
    }
    return RouterExamples(train, val, val_sel, info)


# ------------------------------------------------------------------------------------------------- metrics
def label_metrics(
    probs: torch.Tensor, domains: Sequence[str], labels: Sequence[Sequence[str]], is_mixed: torch.Tensor
) -> dict[str, float]:
    """Router accuracy against the labels (not the oracle targets).

    * ``single_top1_label``: over single-domain rows, the fraction whose most probable domain is the
      source domain;
    * ``mixed_set_label``: over mixed rows, the fraction whose predicted set ``{d : p_d > 0.5}`` equals the
      label set (both domains) exactly.

    Metrics without rows are NaN.
    """
    single = [i for i in range(len(labels)) if not bool(is_mixed[i])]
    mixed = [i for i in range(len(labels)) if bool(is_mixed[i])]
    nan = float("nan")
    top1 = (sum(domains[int(probs[i].argmax())] in labels[i] for i in single) / len(single)) if single else nan
    sets = (sum({d for d, p in zip(domains, probs[i].tolist()) if p > 0.5} == set(labels[i]) for i in mixed)
            / len(mixed)) if mixed else nan
    return {"single_top1_label": top1, "mixed_set_label": sets}


def recovered_fraction(prefix: float, ungated: float, routed: float, eps: float = 1e-4) -> float | None:
    """``(ungated - routed) / (ungated - prefix)``, or ``None`` when ungated is not worse than prefix by eps."""
    den = ungated - prefix
    if not math.isfinite(den) or den <= eps:
        return None
    return (ungated - routed) / den


@torch.no_grad()
def example_nll(model: Any, example: Mapping[str, Any], bf16: bool) -> tuple[float, int]:
    """Summed completion NLL and completion-token count of one encoded example (no padding).

    The same quantity as :func:`~brainstacks_hooks.training.validation.completion_nll` for a batch of one
    (fp32 cross-entropy of the autocast logits), computed only at labelled positions, which is much
    cheaper for large vocabularies. Runs in the stacks' current mode.
    """
    from ..training.validation import autocast_context, eval_mode

    device = next(model.parameters()).device
    ids = torch.as_tensor(list(example["input_ids"]), dtype=torch.long, device=device)[None]  # [1, L]
    labels = torch.as_tensor(list(example["labels"]), dtype=torch.long, device=device)[1:]  # [L-1]
    keep = labels != -100
    with eval_mode(model), autocast_context(model, bf16):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits  # [1, L, V]
    nll = torch.nn.functional.cross_entropy(logits[0, :-1][keep].float(), labels[keep], reduction="sum")
    return float(nll), int(keep.sum())


def evaluate_val_losses(
    stacks: Any,
    val_examples: Mapping[str, Sequence[Mapping[str, Any]]],
    routes: Mapping[str, Sequence[Route]],
    bf16: bool,
    progress: bool = True,
) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, float]]]]:
    """Per-domain token-weighted completion loss in prefix, ungated, routed and base modes.

    Args:
        stacks: The :class:`BrainStacks`.
        val_examples: Encoded validation examples per domain (``input_ids``, ``labels``).
        routes: The route of each example, aligned with ``val_examples``.
        bf16: bf16 autocast.
        progress: tqdm bar over domains' examples.

    Returns:
        ``(table, per_example)``: ``table[d]`` has ``n_examples``, ``n_tokens``, one loss per mode and
        ``recovered_fraction``; ``per_example[d][i]`` the per-mode mean losses of example ``i``.
    """
    table: dict[str, dict[str, Any]] = {}
    per_example: dict[str, list[dict[str, float]]] = {}
    model = stacks.model
    total = sum(len(v) for v in val_examples.values())
    bar = tqdm(total=total, desc="router eval losses", disable=not progress)
    for d, exs in val_examples.items():
        sums = dict.fromkeys(LOSS_MODES, 0.0)
        n_tok = 0
        rows = []
        for ex, route in zip(exs, routes[d]):
            row: dict[str, float] = {}
            for mode in LOSS_MODES:
                if mode == "prefix":
                    ctx = stacks.prefix(d)
                elif mode == "ungated":
                    ctx = stacks.ungated()
                elif mode == "routed":
                    ctx = stacks.routed(route.weights)
                else:
                    ctx = stacks.base_only()
                with ctx:
                    s, c = example_nll(model, ex, bf16)
                sums[mode] += s
                row[mode] = s / max(c, 1)
            n_tok += c
            rows.append(row)
            bar.update(1)
        losses = {m: sums[m] / max(n_tok, 1) for m in LOSS_MODES}
        table[d] = {"n_examples": len(exs), "n_tokens": n_tok, **losses,
                    "recovered_fraction": recovered_fraction(losses["prefix"], losses["ungated"], losses["routed"])}
        per_example[d] = rows
    bar.close()
    return table, per_example


def _route_summary(routes: Sequence[Route], domains: Sequence[str], top_k: int = 3) -> dict[str, Any]:
    n = max(len(routes), 1)
    sets = Counter("+".join(r.gated_on) or "(none)" for r in routes)
    return {
        "n": len(routes),
        "mean_score": {d: sum(r.scores[d] for r in routes) / n for d in domains},
        "gated_on_fraction": {d: sum(d in r.weights for r in routes) / n for d in domains},
        "top_gated_sets": [[k, c] for k, c in sets.most_common(top_k)],
        "gap_fraction": sum(r.gap for r in routes) / n,
    }


def _stats_ms(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"n": len(values), "mean": statistics.fmean(values), "median": statistics.median(values),
            "min": min(values), "max": max(values)}


@torch.no_grad()
def measure_timing(
    stacks: Any,
    tokenizer: Any,
    router: MetaRouter,
    meta: Mapping[str, Any],
    prompts: Sequence[tuple[str, str]],
    generation_prompts: int,
    generation_tokens: int,
) -> dict[str, Any]:
    """Per-prompt routing latency (features + router, batch of one) and routed generation time.

    The first prompt is routed once untimed (warm-up). Generation is greedy with exactly
    ``generation_tokens`` new tokens (``min_new_tokens`` = ``max_new_tokens``) in ``routed`` mode.
    """
    out: dict[str, Any] = {"device": str(next(stacks.model.parameters()).device),
                           "threads": torch.get_num_threads()}
    if not prompts:
        return out
    route_prompts(stacks, tokenizer, router, meta, [prompts[0]], batch_size=1)  # warm-up
    feats, rtr, routes = [], [], []
    for p in prompts:
        (route,) = route_prompts(stacks, tokenizer, router, meta, [p], batch_size=1)
        feats.append(route.timings["features_ms"])
        rtr.append(route.timings["router_ms"])
        routes.append(route)
    out["features_ms_per_prompt"] = _stats_ms(feats)
    out["router_ms_per_prompt"] = _stats_ms(rtr)
    out["route_ms_per_prompt"] = _stats_ms([f + r for f, r in zip(feats, rtr)])
    gen: list[float] = []
    model = stacks.model
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        for p, route in list(zip(prompts, routes))[:generation_prompts]:
            ids = torch.tensor([encode_prompt(tokenizer, p[0], p[1])["input_ids"]],
                               device=next(model.parameters()).device)
            with stacks.routed(route.weights):
                t0 = time.perf_counter()
                new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=generation_tokens, min_new_tokens=generation_tokens,
                                     pad_token_id=pad)
                gen.append((time.perf_counter() - t0) * 1000.0)
            if new.shape[1] - ids.shape[1] != generation_tokens:
                logger.warning("generation produced %d tokens, not %d", new.shape[1] - ids.shape[1],
                               generation_tokens)
    finally:
        model.train(was_training)
    out["generation_tokens"] = generation_tokens
    out["generate_ms_per_prompt"] = _stats_ms(gen)
    if gen and out["route_ms_per_prompt"]:
        out["route_over_generate"] = out["route_ms_per_prompt"]["median"] / statistics.median(gen)
    return out


# ----------------------------------------------------------------------------------------------- pipeline
def _resolve(run_dir: str | Path, config: RouterPipelineConfig | RouterConfig | None) -> RouterPipelineConfig:
    if config is None:
        return RouterPipelineConfig(run_dir=str(run_dir))
    if isinstance(config, RouterConfig):
        return RouterPipelineConfig(run_dir=str(run_dir), router=config)
    return dataclasses.replace(config, run_dir=str(run_dir))


def _load_models(run_dir: Path, run_config: Any, model: Any, tokenizer: Any, stacks: Any) -> tuple[Any, Any]:
    from ..models.loading import prepare_tokenizer, resolve_model_path
    from ..stacks.brainstacks import BrainStacks

    if stacks is None and model is not None:
        stacks = getattr(model, "_brainstacks", None)
    if stacks is None:
        if model is None:
            model, tokenizer = load_run_base(run_config)
        stacks = BrainStacks.load(model, run_dir / "stacks")
    if tokenizer is None:
        from ..models.backend_hf import load_tokenizer

        name = resolve_model_path(run_config.model.name_or_path)
        tokenizer = prepare_tokenizer(load_tokenizer(name, revision=run_config.model.revision))
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
    run_dir = Path(run_dir)
    out_dir = run_dir / ROUTER_SUBDIR
    manifest = read_run_manifest(run_dir)
    run_config = run_config_from_manifest(manifest)
    stacks, tokenizer = _load_models(run_dir, run_config, model, tokenizer, stacks)
    domains = list(stacks.domains)
    missing = [d for d in manifest["domain_order"] if d not in domains]
    if missing:
        logger.warning("domains without accepted stacks are not routable: %s", missing)
    bf16 = run_config.train.bf16 if cfg.eval_bf16 is None else cfg.eval_bf16
    fingerprint = router_fingerprint(stacks.model, run_config.stack)
    recipe = rc.feature_recipe()

    # ---- rows and examples
    train_rows, val_rows, _ = load_run_rows(run_config, tokenizer)
    ex = build_router_examples(cfg, domains, train_rows, val_rows, tokenizer)
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
    meta = save_router(router, rc, out_dir, feature_recipe=recipe, base_fingerprint=fingerprint)

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
        "val_routes_summary": {d: _route_summary(rs, domains) for d, rs in routes.items()},
        "val_losses": loss_table,
        "losses_bf16": bf16,
        "manifest_prefix_loss": {d: manifest["domains"][d].get("final_prefix_loss") for d in domains},
        "timing": timing,
        "total_s": time.perf_counter() - t_start,
    }
    report = _json_safe(report)
    atomic_write_json(out_dir / REPORT_FILE, report)
    atomic_write_json(out_dir / VAL_ROUTES_FILE, _json_safe(val_routes))
    logger.info("router report written to %s", out_dir / REPORT_FILE)
    return RouterRunResult(router, meta, report, out_dir, result, list(data.subset(train_idx).prompts),
                           list(vdata.prompts), val_routes)


def _json_safe(obj: Any) -> Any:
    """NaN and infinities become ``None`` (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------------- routing
def load_run_router(run_dir: str | Path, *, model: Any = None, tokenizer: Any = None,
                    device: str = "cpu") -> tuple[MetaRouter, dict[str, Any], Any, Any]:
    """Load the base model of a run (no stacks) and its router, checking the router's base fingerprint.

    Returns:
        ``(router, meta, model, tokenizer)``.
    """
    run_dir = Path(run_dir)
    manifest = read_json(run_dir / MANIFEST_FILE) if (run_dir / MANIFEST_FILE).is_file() else None
    if manifest is None:
        raise StackLoadError(f"{run_dir / MANIFEST_FILE}: not found (is {run_dir} an SFT run directory?)")
    run_config = run_config_from_manifest(manifest)
    if model is None:
        model, tokenizer = load_run_base(run_config)
    router, meta = load_router(run_dir / ROUTER_SUBDIR, router_fingerprint(model, run_config.stack), device)
    return router, meta, model, tokenizer


def route_prompt(run_dir: str | Path, instruction: str, input: str = "", *, model: Any = None,
                 tokenizer: Any = None) -> Route:
    """Route one prompt with a run's router: base-only features, router scores, gating and the gap flag."""
    router, meta, model, tokenizer = load_run_router(run_dir, model=model, tokenizer=tokenizer)
    (route,) = route_prompts(model, tokenizer, router, meta, [(instruction, input)], batch_size=1)
    return route


# ------------------------------------------------------------------------------------------------- summary
def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def summary_table(report: Mapping[str, Any]) -> str:
    """Readable summary of a router report: accuracy, the loss table, the cross-domain table, timings."""
    v, r, t = report["validation"], report["router"], report["timing"]
    lines = [
        f"router: {report['router_dir']}  (best epoch {r['best_epoch']}/{r['epochs']}, {r['n_params']:,} params)",
        f"validation prompts: single-domain top-1 {_fmt(v['single_top1'])} vs oracle targets, "
        f"{_fmt(v['single_top1_label'])} vs source domain (n={v['n_single']}); "
        f"mixed-set match {_fmt(v['mixed_set'])} vs oracle, {_fmt(v['mixed_set_label'])} vs labels "
        f"(n={v['n_mixed']})",
        "",
        f"{'domain':<10} {'prefix':>8} {'ungated':>8} {'routed':>8} {'base':>8} {'recovered':>9}  "
        f"{'excl.own':>8}  oracle top routes",
    ]
    cross = report["cross_domain"].get("per_domain", {})
    for d, row in report["val_losses"].items():
        c = cross.get(d, {})
        routes = ", ".join(f"{k} {n}" for k, n in c.get("top_routes", [])[:3])
        lines.append(f"{d:<10} {_fmt(row['prefix']):>8} {_fmt(row['ungated']):>8} {_fmt(row['routed']):>8} "
                     f"{_fmt(row['base']):>8} {_fmt(row['recovered_fraction'], '.2f'):>9}  "
                     f"{_fmt(c.get('excludes_own'), '.2f'):>8}  {routes}")
    f, rt, g = t.get("features_ms_per_prompt"), t.get("router_ms_per_prompt"), t.get("generate_ms_per_prompt")
    timing = (f"timing (median per prompt): features {_fmt(f and f['median'], '.1f')} ms + router "
              f"{_fmt(rt and rt['median'], '.2f')} ms")
    if g:
        timing += f"; generating {t['generation_tokens']} tokens {_fmt(g['median'], '.0f')} ms"
    lines += ["", timing,
              "(recovered = (ungated - routed) / (ungated - prefix); excl.own = oracle routes without the "
              "prompt's own domain)"]
    return "\n".join(lines)
