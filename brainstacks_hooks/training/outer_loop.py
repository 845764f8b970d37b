"""Outer loop (paper 3.4): domains in curriculum order, null space between domains, manifest, resume.

``run_sft(config)`` is what ``brainstacks train CONFIG`` and ``recipes/sft_outer_loop.py`` run. Rerunning
the same command after a crash (even ``kill -9``) continues from the last finished round: finished
stacks are verified by checksum and reused, an interrupted round restarts from scratch, and a missing
or corrupt stack file is a clear error. The run directory (layout, manifest, rows, index) is owned by
:class:`~brainstacks_hooks.run_dir.RunDir`.

When a domain ends, the null-space directions its stacks claim are computed from its validation rows and
saved with the stacks, so every later stack (a later domain, an RL round, a domain added after loading the
run) is projected against every earlier domain, the last one included.

Several processes (``torchrun`` / ``accelerate launch``, one per GPU; the HF Trainer runs DDP): the main process
alone prepares the data and writes the run directory; the others wait, then read the rows it recorded and take
its manifest (:meth:`RunDir.sync` after each write), and load the null-space bases it computed. Validation
losses are sharded over the processes and gathered in order (``evaluate_loss(..., shard=True)``), so every
decision taken on them (best-weights rollback and early stop, accepting a round, a domain that failed) is the
same on every process, and so are the stacks they freeze. ``train.batch_size`` is per process. As in any DDP run,
an epoch that is not a multiple of the global batch ends with a batch that accelerate fills up with rows from the
epoch's start (``even_batches``), where one process would take a shorter batch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import TrainingError
from ..loss import evaluate_loss
from ..models.loading import load_base_model
from ..run_config import RunConfig
from ..run_dir import (
    FORGETTING_FILE,
    FORGETTING_PLOT,
    ROUTER_TEST,
    ROUTER_TRAIN,
    SFT_TRAIN,
    SFT_VAL,
    Manifest,
    RoundRecord,
    RunDir,
)
from ..stacks.brainstacks import BrainStacks
from ..utils import distributed
from ..utils.io import atomic_write_json
from ..utils.logging import get_logger, log_on_main_process_only
from ..utils.seeding import seed_everything
from .data import DomainExamples, prepare_run_data, sample_router_rows
from .forgetting import forgetting_row, forgetting_summary
from .inner_loop import run_inner_loop
from .null_space import collect_domain_basis
from .trainer import use_cpu

logger = get_logger(__name__)


@dataclass
class SFTRun:
    """Everything a finished (or resumed) SFT run leaves in memory."""

    stacks: BrainStacks
    tokenizer: Any
    data: DomainExamples
    run: RunDir

    @property
    def manifest(self) -> Manifest:
        return self.run.manifest

    @property
    def run_dir(self) -> Path:
        return self.run.path


def _prepare_data(config: RunConfig, tokenizer: Any, run: RunDir) -> DomainExamples:
    """Rows of a new run are loaded, cleaned and recorded; a resumed run reuses the recorded rows.

    The router's rows (disjoint from SFT's) are recorded too; a run recorded before they existed gets them
    on its next session, without changing anything SFT uses. Several processes: the main process prepares and
    records them, then the others encode the rows it recorded.
    """
    if distributed.world_size() > 1:
        data = distributed.on_main_process(_prepare_data_here, config, tokenizer, run)
        run.sync()
        return data if data is not None else _prepare_data_here(config, tokenizer, run)
    return _prepare_data_here(config, tokenizer, run)


def _prepare_data_here(config: RunConfig, tokenizer: Any, run: RunDir) -> DomainExamples:
    if run.has_rows(SFT_TRAIN) and run.has_rows(SFT_VAL):
        data = prepare_run_data(config, tokenizer, rows=(run.rows_by_domain(SFT_TRAIN), run.rows_by_domain(SFT_VAL)))
    else:
        data = prepare_run_data(config, tokenizer)
        run.write_data_report(data.report)
        run.write_rows(SFT_TRAIN, [r for d in config.domains for r in data.train_rows[d.name]])
        run.write_rows(SFT_VAL, [r for d in config.domains for r in data.val_rows[d.name]])
    if not (run.has_rows(ROUTER_TRAIN) and run.has_rows(ROUTER_TEST)):
        train_ids = {r["id"] for rows in data.train_rows.values() for r in rows}
        val_ids = {r["id"] for rows in data.val_rows.values() for r in rows}
        router_train, router_test, report = sample_router_rows(config, train_ids, val_ids)
        run.write_rows(ROUTER_TRAIN, router_train)
        run.write_rows(ROUTER_TEST, router_test)
        logger.info("router rows set aside (never trained on by a stack): %s",
                    {d: (v["router_train"], v["router_test"]) for d, v in report.items() if d != "decontamination"})
    return data


#: ``refine(run, stacks, tokenizer, domain_config)``: called after a domain's SFT rounds, before its null space
#: (e.g. :func:`brainstacks_hooks.rl.round.refine_domain`, the RL rounds of ``domain_config.rl``).
Refine = Callable[[RunDir, BrainStacks, Any, Any], None]


def run_sft(config: RunConfig, model: Any = None, tokenizer: Any = None, refine: Refine | None = None) -> SFTRun:
    """Train every domain of ``config`` (resuming from ``output_dir`` when it holds this run).

    ``refine`` runs after each domain's SFT rounds (the domain is still ``running``; a crash there resumes
    into it again), before the domain's null space is collected, so what it adds is frozen with the domain.

    Under ``torchrun`` / ``accelerate launch`` the processes train together (see the module docstring).

    Raises:
        RunDirError: ``output_dir`` holds another run or one of the old layout.
        TrainingError: a domain's first round did not lower its validation loss at all.
        StackLoadError: a stack file the manifest lists is missing or corrupt.
    """
    distributed.init_distributed(cpu=use_cpu(config.train))
    log_on_main_process_only()
    seed_everything(config.seed)
    if model is None:
        model, tokenizer = load_base_model(config.model.name_or_path, backend=config.model.backend,
                                           dtype=config.model.dtype, revision=config.model.revision,
                                           max_seq_length=config.model.max_seq_length)
    stacks = BrainStacks.attach(model, config.stack)
    run = RunDir.create_or_resume(config, stacks.fingerprint)
    m = run.manifest
    data = _prepare_data(config, tokenizer, run)
    run.restore_stacks(stacks)

    pad, tr = tokenizer.pad_token_id, config.train
    for index, dom in enumerate(config.domains):
        rec = m.domain(dom.name)
        if rec.status == "done":
            logger.info("%s: done in an earlier session (%d stacks), skipping", dom.name, len(rec.accepted_rounds()))
            if config.null_space.enabled:
                _ensure_null_space(stacks, config, data, run, [dom], pad)
            continue
        t0 = time.time()
        train_ex, val_ex = data.train[dom.name], data.val[dom.name]
        if rec.status == "failed":  # settings changed since: retry the domain from its first round
            rec.rounds = []
        rec.status = "running"
        rec.data = {"n_train": len(train_ex), "n_val": len(val_ex)}
        run.save_manifest()
        if index > 0 and config.null_space.enabled:
            _ensure_null_space(stacks, config, data, run, config.domains[:index], pad)
        elif not config.null_space.enabled:
            stacks.set_null_space(None)
        if rec.baseline_loss is None:
            with stacks.train_mode():
                rec.baseline_loss = evaluate_loss(stacks.model, val_ex, pad, tr.eval_batch_size, tr.bf16, shard=True)
            run.save_manifest()
        accepted = rec.accepted_rounds()
        start = max(r.round for r in rec.rounds) + 1 if rec.rounds else 0
        loss_before = accepted[-1].frozen_val_loss if accepted else rec.baseline_loss
        rejected = any(r.status == "rejected" for r in rec.rounds)

        def on_round_end(result: RoundRecord, stack: Any, name: str = dom.name) -> None:
            distributed.on_main_process(run.save_round, name, result, stack, stacks)
            run.sync()

        if not rejected:
            run_inner_loop(
                stacks, tokenizer, dom.name, train_ex, val_ex, tr, config.inner, run.trainer_dir,
                seed=config.seed, domain_index=index, start_round=start, loss_before=loss_before,
                max_rounds=dom.max_inner_rounds, max_steps=dom.max_steps, learning_rate=dom.learning_rate,
                on_round_end=on_round_end,
            )
        accepted = rec.accepted_rounds()
        rec.wall_time_s = round(rec.wall_time_s + time.time() - t0, 2)
        if not accepted:
            rec.status = "failed"
            run.save_manifest()
            first = rec.rounds[0] if rec.rounds else None
            raise TrainingError(
                f"domain {dom.name!r}: its first round did not lower the validation loss "
                + (f"({first.loss_before:.4f} -> best {first.best_val_loss:.4f}) " if first else "")
                + "so it would have no stack; raise train.max_steps or the learning rate (or fix its data) and "
                "rerun the same command to retry this domain")
        if refine is not None:
            refine(run, stacks, tokenizer, dom)
        last = rec.accepted_rounds()[-1]
        if last.kind == "sft":
            rec.final_prefix_loss = last.frozen_val_loss
        else:  # an RL round's losses are on a sample of the val rows: the domain's final policy on all of them
            with stacks.prefix(dom.name):
                rec.final_prefix_loss = evaluate_loss(stacks.model, val_ex, pad, tr.eval_batch_size, tr.bf16,
                                                      shard=True)
        rec.status = "done"
        run.save_manifest()
        if config.null_space.enabled:
            _ensure_null_space(stacks, config, data, run, [dom], pad)
        _record_forgetting(stacks, config, data, run, dom.name, pad)
        run.sync()  # every process ends the domain with the main process's records (wall times included)
    return SFTRun(stacks, tokenizer, data, run)


def _ensure_null_space(stacks: BrainStacks, config: RunConfig, data: DomainExamples, run: RunDir,
                       domains: list, pad: int) -> None:
    """Compute (or reuse) the basis of each of ``domains`` and hand the merged bases to the stacks.

    Several processes: the main process computes and saves it, the others load that file.
    """
    for dom in domains:
        if dom.name in stacks.null_space_bases or not stacks.stacks_for(dom.name):
            continue

        def collect(name: str = dom.name) -> dict[str, torch.Tensor]:
            bases = collect_domain_basis(stacks, name, data.val[name], pad, config.null_space,
                                         config.train.eval_batch_size, config.train.bf16, seed=config.seed)
            run.save_null_space(name, bases)
            return bases

        bases = distributed.on_main_process(collect)
        run.sync()
        stacks.null_space_bases[dom.name] = bases if bases is not None else run.read_null_space(dom.name)
    stacks.merge_null_space()
    run.manifest.null_space_capacity = {k: round(v, 4) for k, v in stacks.null_space_capacity().items()}
    run.save_manifest()
    _warn_capacity(run.manifest.null_space_capacity)


#: Share of a projection's output width claimed by earlier domains above which a warning is logged.
CAPACITY_WARNING = 0.5


def _warn_capacity(capacity: dict[str, float]) -> None:
    high = {k: v for k, v in capacity.items() if v > CAPACITY_WARNING}
    if high:
        worst = max(high, key=high.get)
        logger.warning("null space: earlier domains claim more than %.0f%% of the output width of %d projections "
                       "(%s: %.0f%%); later stacks have little room there (lower null_space.directions_per_domain)",
                       CAPACITY_WARNING * 100, len(high), worst, high[worst] * 100)


def _record_forgetting(stacks: BrainStacks, config: RunConfig, data: DomainExamples, run: RunDir,
                       after: str, pad: int) -> None:
    tr, m = config.train, run.manifest
    row = forgetting_row(stacks, data.val, pad, tr.eval_batch_size, tr.bf16, shard=True)
    m.set_forgetting(after, {"losses": row})
    recorded = {d: m.domain(d).final_prefix_loss for d in stacks.domains}
    recorded = {d: v for d, v in recorded.items() if v is not None}
    m.forgetting_summary = forgetting_summary(m.forgetting, recorded)
    run.save_manifest()
    if not distributed.is_main_process():
        return
    atomic_write_json(run.path / FORGETTING_FILE, {"rows": m.forgetting, "recorded": recorded,
                                                   "summary": m.forgetting_summary})
    if not any(r["losses"] for r in m.forgetting):
        return  # no domain has accepted stacks yet: nothing to plot
    try:
        from ..evaluation.plots import plot_forgetting

        plot_forgetting(m.forgetting, run.path / FORGETTING_PLOT)
    except ImportError as e:  # matplotlib is a core dependency; keep training if a backend is broken
        logger.warning("could not plot the forgetting matrix: %s", e)


def summary_table(manifest: Manifest) -> str:
    """Readable end-of-run table: domain, stacks, per-round losses, final loss, time."""
    lines = [f"{'domain':<10} {'stacks':>6}  {'val losses (baseline, then per round)':<44} {'final':>7} {'time':>7}"]
    for name in manifest.domain_order:
        rec = manifest.domain(name)
        losses = [rec.baseline_loss] + [r.best_val_loss for r in rec.rounds]
        marks = ["", *["" if r.accepted else "x" for r in rec.rounds]]
        text = ", ".join(f"{v:.3f}{m}" for v, m in zip(losses, marks) if v is not None)
        final = rec.final_prefix_loss
        lines.append(f"{name:<10} {len(rec.accepted_rounds()):>6}  {text:<44} "
                     f"{final if final is None else f'{final:.3f}':>7} {rec.wall_time_s:>6.0f}s")
    s = manifest.forgetting_summary
    if s:
        lines.append(f"zero forgetting: max |prefix loss now - recorded| = {s['max_prefix_drift']:.2e}; "
                     f"backward transfer (ungated) = {s['backward_transfer'].get('ungated')}")
    lines.append("(x = round rejected: did not improve by min_loss_delta; its stack was discarded)")
    return "\n".join(lines)


def dump_json(obj: Any) -> str:
    """Compact JSON for logs."""
    return json.dumps(obj, default=lambda o: o.tolist() if isinstance(o, torch.Tensor) else str(o))
