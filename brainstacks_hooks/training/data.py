"""Domain data for a run: load, decontaminate, encode with the one prompt format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..data.decontamination import decontaminate
from ..data.formatting import encode_rows
from ..data.sources import load_domain_rows, load_eval_questions
from ..run_config import RunConfig
from ..utils.logging import get_logger
from ..utils.seeding import seeded_sample_indices

logger = get_logger(__name__)


@dataclass
class DomainExamples:
    """Encoded train and validation examples of every domain, with the data report."""

    train: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    val: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    #: the raw rows (``id``, ``domain``, ``instruction``, ``input``, ``output``) that were encoded
    train_rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    val_rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def prepare_run_data(config: RunConfig, tokenizer: Any,
                     rows: tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]] | None = None
                     ) -> DomainExamples:
    """Load every domain's train/val rows, decontaminate the train rows and encode both.

    Local data (``data_dir`` or ``$BRAINSTACKS_DATA_DIR``) uses ``<domain>/val.jsonl`` for validation;
    hub sources hold out a seeded ``val_samples`` subset, disjoint from training by row id. ``rows`` (train
    and validation rows by domain, as a run directory recorded them) skips loading and cleaning: the same
    rows are encoded again.
    """
    if rows is not None:
        out = DomainExamples(report={"from_recorded_rows": True})
        for dom in config.domains:
            out.train_rows[dom.name], out.val_rows[dom.name] = rows[0].get(dom.name, []), rows[1].get(dom.name, [])
            out.train[dom.name], _ = encode_rows(tokenizer, out.train_rows[dom.name], config.train.max_length)
            out.val[dom.name], _ = encode_rows(tokenizer, out.val_rows[dom.name], config.train.max_length)
        return out
    train_rows, val_rows, report = {}, {}, {"domains": {}}
    for dom in config.domains:
        if dom.hf_sources:
            rows, rep = load_domain_rows(dom.name, "train", hf_sources=dom.hf_sources, seed=config.seed)
            val_idx = set(seeded_sample_indices(len(rows), dom.val_samples, config.seed + 1))
            val_rows[dom.name] = [r for i, r in enumerate(rows) if i in val_idx]
            rest = [r for i, r in enumerate(rows) if i not in val_idx]
            train_rows[dom.name] = [rest[i] for i in seeded_sample_indices(len(rest), dom.train_samples, config.seed)]
            rep_val = {"held_out_from": "train", "n": len(val_rows[dom.name])}
            rep = rep.to_dict()
        else:
            train_rows[dom.name], rep_t = load_domain_rows(dom.name, "train", data_dir=config.data_dir,
                                                           n=dom.train_samples, seed=config.seed)
            val_rows[dom.name], rep_v = load_domain_rows(dom.name, "val", data_dir=config.data_dir,
                                                         n=dom.val_samples, seed=config.seed)
            rep, rep_val = rep_t.to_dict(), rep_v.to_dict()
        report["domains"][dom.name] = {"train": rep, "val": rep_val}
    eval_texts: list[str] = []
    if config.eval_benchmarks:
        eval_texts = load_eval_questions(config.data_dir, config.eval_benchmarks)
    train_rows, decon = decontaminate(train_rows, eval_texts, config.decontamination)
    report["decontamination"] = decon.to_dict()
    out = DomainExamples(report=report)
    for dom in config.domains:
        out.train_rows[dom.name] = [{**r, "domain": dom.name} for r in train_rows.get(dom.name, [])]
        out.val_rows[dom.name] = [{**r, "domain": dom.name} for r in val_rows[dom.name]]
        out.train[dom.name], n_long_t = encode_rows(tokenizer, train_rows.get(dom.name, []), config.train.max_length)
        out.val[dom.name], n_long_v = encode_rows(tokenizer, val_rows[dom.name], config.train.max_length)
        report["domains"][dom.name]["encoded"] = {"train": len(out.train[dom.name]), "val": len(out.val[dom.name]),
                                                  "overlong_train": n_long_t, "overlong_val": n_long_v}
        if not out.train[dom.name] or not out.val[dom.name]:
            from ..errors import DataError

            raise DataError(f"domain {dom.name!r} has no usable train or validation examples after cleaning")
    return out


def sample_router_rows(config: RunConfig, sft_train_ids: set[str], sft_val_ids: set[str]
                       ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """The meta-router's rows (:class:`~brainstacks_hooks.run_config.RouterRowsConfig`), disjoint from SFT's.

    Oracle rows come from each domain's train split outside SFT's train sample (decontaminated like SFT's),
    test rows from its validation split outside SFT's validation sample (hub sources: the same pool, outside
    every SFT row). Seeded, so a rerun records the same rows.

    Returns:
        ``(router_train_rows, router_test_rows, report)``, each row tagged with its ``domain``.
    """
    rr, seed = config.router_rows, config.seed + 7
    used = sft_train_ids | sft_val_ids
    train_rows: dict[str, list[dict[str, Any]]] = {}
    test_rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    hf = {d.name: d.hf_sources for d in config.domains if d.hf_sources}
    names = [d.name for d in config.domains] + [g for g in rr.gap_domains if g not in {d.name for d in config.domains}]
    for name in names:
        gap_only = name not in {d.name for d in config.domains}
        if name in hf:
            pool, _ = load_domain_rows(name, "train", hf_sources=hf[name], seed=config.seed)
            pool = [r for r in pool if r["id"] not in used]
            idx = seeded_sample_indices(len(pool), rr.train_per_domain + rr.test_per_domain, seed)
            picked = [pool[i] for i in idx]
            train_pick, test_pick = picked[: rr.train_per_domain], picked[rr.train_per_domain:]
        else:
            train_pick = []
            if not gap_only and rr.train_per_domain:
                pool, _ = load_domain_rows(name, "train", data_dir=config.data_dir, seed=config.seed)
                pool = [r for r in pool if r["id"] not in sft_train_ids]
                train_pick = [pool[i] for i in seeded_sample_indices(len(pool), rr.train_per_domain, seed)]
            test_pick = []
            if rr.test_per_domain:
                pool, _ = load_domain_rows(name, "val", data_dir=config.data_dir, seed=config.seed)
                pool = [r for r in pool if r["id"] not in sft_val_ids]
                test_pick = [pool[i] for i in seeded_sample_indices(len(pool), rr.test_per_domain, seed)]
        if not gap_only:
            train_rows[name] = train_pick
        test_rows += [{**r, "domain": name} for r in test_pick]
        report[name] = {"router_train": len(train_pick), "router_test": len(test_pick), "gap_only": gap_only}
    eval_texts = load_eval_questions(config.data_dir, config.eval_benchmarks) if config.eval_benchmarks else []
    train_rows, decon = decontaminate(train_rows, eval_texts, config.decontamination)
    report["decontamination"] = decon.to_dict()
    flat_train = [{**r, "domain": d} for d in train_rows for r in train_rows[d]]
    return flat_train, test_rows, report
