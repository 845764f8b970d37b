"""Outer loop (paper 3.4): domains in curriculum order, null space between domains, manifest, resume.

``run_sft(config)`` is what ``brainstacks train CONFIG`` and ``recipes/sft_outer_loop.py`` run. Rerunning
the same command after a crash (even ``kill -9``) continues from the last finished round: finished
stacks are verified by checksum and reused, an interrupted round restarts from scratch, and a missing
or corrupt stack file is a clear error.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import to_dict
from ..errors import StackLoadError
from ..models.loading import load_base_model
from ..stacks.brainstacks import BrainStacks
from ..stacks.serialization import load_stack
from ..utils.io import atomic_write_json, load_safetensors_checked, save_safetensors_atomic
from ..utils.logging import get_logger
from ..utils.seeding import seed_everything
from .config import RunConfig
from .data import DomainExamples, prepare_run_data
from .forgetting import forgetting_row, forgetting_summary
from .inner_loop import RoundResult, run_inner_loop
from .manifest import Manifest
from .null_space import collect_domain_basis
from .validation import evaluate_loss

logger = get_logger(__name__)


@dataclass
class SFTRun:
    """Everything a finished (or resumed) SFT run leaves in memory."""

    stacks: BrainStacks
    tokenizer: Any
    data: DomainExamples
    manifest: Manifest
    run_dir: Path


def _config_key(config: RunConfig) -> dict[str, Any]:
    """The parts of the config a resumed run must share with the original."""
    return {"model": to_dict(config.model), "stack": config.stack.to_dict(), "seed": config.seed,
            "domains": [d.name for d in config.domains], "null_space": to_dict(config.null_space)}


def _ids_hash(examples: list[dict[str, Any]]) -> str:
    return hashlib.sha256("\n".join(e["id"] for e in examples).encode()).hexdigest()


def _restore_from_manifest(stacks: BrainStacks, manifest: Manifest, run_dir: Path) -> None:
    """Re-attach every accepted stack and null-space basis the manifest lists (checksums verified)."""
    for name in manifest.data["domain_order"]:
        rec = manifest.domain(name)
        if rec.get("null_space"):
            ns = rec["null_space"]
            stacks.null_space_bases[name] = load_safetensors_checked(run_dir / ns["file"], ns["sha256"])
        for r in manifest.accepted_rounds(name):
            path = run_dir / r["file"]
            if not path.is_file():
                raise StackLoadError(f"{path}: listed in the manifest ({name} round {r['round']}) but missing; "
                                     "restore it or start a new output_dir")
            stacks.add_frozen(load_stack(path, stacks.shapes, stacks.fingerprint, stacks.config,
                                         expected_sha256=r["sha256"]))
    if stacks.null_space_bases:
        stacks.merge_null_space()


def run_sft(config: RunConfig, model: Any = None, tokenizer: Any = None) -> SFTRun:
    """Train every domain of ``config`` (resuming from ``output_dir`` when a manifest exists)."""
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    if model is None:
        model, tokenizer = load_base_model(config.model.name_or_path, backend=config.model.backend,
                                           dtype=config.model.dtype, revision=config.model.revision,
                                           max_seq_length=config.model.max_seq_length)
    stacks = BrainStacks.attach(model, config.stack)
    data = prepare_run_data(config, tokenizer)
    atomic_write_json(run_dir / "data_report.json", data.report)
    header = {"fingerprint": stacks.fingerprint_dict(), "config_key": _config_key(config), "config": to_dict(config),
              "domain_order": [d.name for d in config.domains]}
    manifest = Manifest.open(run_dir, header)
    if manifest.data["config_key"] != header["config_key"] or manifest.data["fingerprint"] != header["fingerprint"]:
        raise StackLoadError(f"{manifest.path}: this output_dir holds a run with a different model, stack config, "
                             "seed or domain list; use a new output_dir (or restore the original config)")
    manifest.data["sessions"] = manifest.data.get("sessions", 0) + 1
    manifest.data["config"] = to_dict(config)
    manifest.save()
    _restore_from_manifest(stacks, manifest, run_dir)

    pad, tr = tokenizer.pad_token_id, config.train
    for index, dom in enumerate(config.domains):
        rec = manifest.domain(dom.name)
        if rec["status"] == "done":
            logger.info("%s: done in an earlier session (%d stacks), skipping", dom.name,
                        len(manifest.accepted_rounds(dom.name)))
            continue
        t0 = time.time()
        train_ex, val_ex = data.train[dom.name], data.val[dom.name]
        rec["status"] = "running"
        rec["data"] = {"train_ids_hash": _ids_hash(train_ex), "val_ids_hash": _ids_hash(val_ex),
                       "n_train": len(train_ex), "n_val": len(val_ex)}
        manifest.save()
        if index > 0 and config.null_space.enabled:
            _ensure_null_space(stacks, config, data, manifest, run_dir, config.domains[:index], pad)
        elif not config.null_space.enabled:
            stacks.set_null_space(None)
        accepted = manifest.accepted_rounds(dom.name)
        if "baseline_loss" not in rec:
            with stacks.train_mode():
                rec["baseline_loss"] = evaluate_loss(stacks.model, val_ex, pad, tr.eval_batch_size, tr.bf16)
            manifest.save()
        done_rounds = {r["round"] for r in rec["rounds"]}
        start = max(done_rounds) + 1 if done_rounds else 0
        loss_before = accepted[-1]["frozen_val_loss"] if accepted else rec["baseline_loss"]
        rejected = any(r["status"] == "rejected" for r in rec["rounds"])

        def on_round_end(result: RoundResult, name: str = dom.name) -> None:
            entry = result.to_dict()
            if entry["file"]:
                entry["file"] = str(Path(entry["file"]).relative_to(run_dir))
            manifest.record_round(name, entry)

        if not rejected:
            run_inner_loop(
                stacks, tokenizer, dom.name, train_ex, val_ex, tr, config.inner, run_dir / "trainer",
                lambda r, name=dom.name: run_dir / "stacks" / f"{name}-r{r}.safetensors",
                seed=config.seed, domain_index=index, start_round=start, loss_before=loss_before,
                max_rounds=dom.max_inner_rounds, max_steps=dom.max_steps, learning_rate=dom.learning_rate,
                on_round_end=on_round_end,
            )
        accepted = manifest.accepted_rounds(dom.name)
        rec["final_prefix_loss"] = accepted[-1]["frozen_val_loss"] if accepted else None
        rec["wall_time_s"] = round(rec.get("wall_time_s", 0.0) + time.time() - t0, 2)
        rec["status"] = "done"
        manifest.save()
        _record_forgetting(stacks, config, data, manifest, dom.name, run_dir, pad)
    stacks.save(run_dir / "stacks")
    return SFTRun(stacks, tokenizer, data, manifest, run_dir)


def _ensure_null_space(stacks: BrainStacks, config: RunConfig, data: DomainExamples, manifest: Manifest,
                       run_dir: Path, previous: list, pad: int) -> None:
    """Compute (or reuse) the basis of every previous domain and hand the merged bases to the stacks."""
    for prev in previous:
        rec = manifest.domain(prev.name)
        if prev.name in stacks.null_space_bases or not stacks.stacks_for(prev.name):
            continue
        bases = collect_domain_basis(stacks, prev.name, data.val[prev.name], pad, config.null_space,
                                     config.train.eval_batch_size, config.train.bf16, seed=config.seed)
        rel = f"null_space/{prev.name}.safetensors"
        sha = save_safetensors_atomic(bases, run_dir / rel)
        rec["null_space"] = {"file": rel, "sha256": sha,
                             "directions": {k: int(v.shape[1]) for k, v in list(bases.items())[:7]}}
        manifest.save()
        stacks.null_space_bases[prev.name] = bases
    stacks.merge_null_space()
    manifest.data["null_space_capacity"] = {k: round(v, 4) for k, v in stacks.null_space_capacity().items()}
    manifest.save()


def _record_forgetting(stacks: BrainStacks, config: RunConfig, data: DomainExamples, manifest: Manifest,
                       after: str, run_dir: Path, pad: int) -> None:
    tr = config.train
    row = forgetting_row(stacks, data.val, pad, tr.eval_batch_size, tr.bf16)
    manifest.set_forgetting(after, {"losses": row})
    recorded = {d: manifest.domain(d).get("final_prefix_loss") for d in stacks.domains}
    recorded = {d: v for d, v in recorded.items() if v is not None}
    summary = forgetting_summary(manifest.data["forgetting"], recorded)
    manifest.data["forgetting_summary"] = summary
    manifest.save()
    atomic_write_json(run_dir / "forgetting.json", {"rows": manifest.data["forgetting"], "recorded": recorded,
                                                     "summary": summary})
    if not any(r["losses"] for r in manifest.data["forgetting"]):
        return  # no domain has accepted stacks yet: nothing to plot
    try:
        from ..evaluation.plots import plot_forgetting

        plot_forgetting(manifest.data["forgetting"], run_dir / "forgetting.png")
    except ImportError as e:  # matplotlib is a core dependency; keep training if a backend is broken
        logger.warning("could not plot the forgetting matrix: %s", e)


def summary_table(manifest: Manifest) -> str:
    """Readable end-of-run table: domain, stacks, per-round losses, final loss, time."""
    lines = [f"{'domain':<10} {'stacks':>6}  {'val losses (baseline, then per round)':<44} {'final':>7} {'time':>7}"]
    for name in manifest.data["domain_order"]:
        rec = manifest.domain(name)
        losses = [rec.get("baseline_loss")] + [r["best_val_loss"] for r in rec["rounds"]]
        marks = ["", *["" if r["status"] == "accepted" else "x" for r in rec["rounds"]]]
        text = ", ".join(f"{v:.3f}{m}" for v, m in zip(losses, marks) if v is not None)
        final = rec.get("final_prefix_loss")
        lines.append(f"{name:<10} {len(manifest.accepted_rounds(name)):>6}  {text:<44} "
                     f"{final if final is None else f'{final:.3f}':>7} {rec.get('wall_time_s', 0):>6.0f}s")
    s = manifest.data.get("forgetting_summary")
    if s:
        lines.append(f"zero forgetting: max |prefix loss now - recorded| = {s['max_prefix_drift']:.2e}; "
                     f"backward transfer (ungated) = {s['backward_transfer'].get('ungated')}")
    lines.append("(x = round rejected: did not improve by min_loss_delta; its stack was discarded)")
    return "\n".join(lines)


def dump_json(obj: Any) -> str:
    """Compact JSON for logs."""
    return json.dumps(obj, default=lambda o: o.tolist() if isinstance(o, torch.Tensor) else str(o))
