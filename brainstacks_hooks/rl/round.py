"""An RL refinement round of one domain of a finished SFT run: data, pre/post metrics, acceptance, manifest.

The paper's order (6.2): a domain's SFT rounds, then RL refinement, then accept and freeze. Here the RL round is
a round of its own (``kind`` = ``dpo`` or ``grpo`` in the manifest): a new zero-init active stack of the domain
on top of the run's frozen stacks of every domain up to and including it, projected against the null space of
the domains before it (as the domain's SFT stacks were). So ``reference`` mode is exactly the SFT policy, the
usual DPO/KL reference, and the stack being trained is never its own reference.

::

    cfg = load_config(RLConfig, "rl_grpo_math_cpu", ["run_dir=runs/quickstart"])
    results = run_rl(cfg)          # brainstacks rl grpo rl_grpo_math_cpu run_dir=runs/quickstart
    print(summary_table(RunDir.open(cfg.run_dir).manifest))

Held-out metric (measured before and after on rows the round never trains on; the ids are checked disjoint):

* GRPO: greedy completions of the held-out prompts, scored by the round's reward functions (mean and stderr of
  each, the weighted sum is the acceptance metric; ``gsm8k`` is GSM8K exact match).
* DPO: TRL's own evaluation of the held-out pairs (DPO loss, the implicit-reward margin and accuracy, which are
  0 at step 0 by construction) plus the reference-free preference accuracy (mean-token log-prob of chosen above
  rejected under the policy), which is meaningful before training too. Acceptance: the held-out DPO loss fell.

The domain's SFT validation loss (``rows/sft_val``) is recorded before and after, and the frozen stacks are
hashed before and after training: a change is a bug and stops the round with an error before anything is saved.
Resume: the pairs and the pre-RL metrics are kept in ``rl/<domain>-r<k>/`` and reused; a round the manifest does
not list restarts (its stack file name is overwritten), a recorded one is skipped.

Several processes (``torchrun`` / ``accelerate launch``, one per GPU): TRL's trainer runs DDP (each process trains
on its share of every global batch, ``per_device_train_batch_size`` is per process), so the active stack stays the
same on every process. The main process alone samples the preference pairs, generates and scores the GRPO
held-out completions and writes the run; the others receive what it computed. The DPO evaluation (TRL's, and the
reference-free accuracy) and the SFT validation loss are sharded over the processes and gathered. The guard
decides on the step's micro-batch losses of every process and on held-out scores that are the same everywhere, and
its snapshots are taken after DDP made the replicas equal, so every process stops, restores and accepts alike
(``tests/rl/test_round_ddp.py``: 2 ``gloo`` processes equal one process with the same global batch, also with the
round inside the curriculum, ``domains[].rl``).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import to_dict
from ..constants import ENV_DATA_DIR
from ..data.formatting import IGNORE_INDEX, encode_rows
from ..errors import ConfigError, RunDirError, TrainingError
from ..loss import evaluate_loss, per_example_loss
from ..run_dir import RoundRecord, RunDir, ids_hash
from ..stacks.brainstacks import BrainStacks
from ..utils import distributed
from ..utils.io import atomic_write_json, read_json
from ..utils.logging import get_logger, log_on_main_process_only
from .config import RUN_ROW_SETS, RLConfig

logger = get_logger(__name__)

__all__ = ["RLRoundResult", "load_rl_rows", "refine_domain", "resolve_rewards", "run_rl", "summary_table"]

PAIRS_FILE = "pairs.json"
BEFORE_FILE = "metrics_before.json"
SAMPLES_FILE = "samples.json"


# ---------------------------------------------------------------------------------------------- rewards
def resolve_rewards(names: list[str]) -> list[Callable[..., list[float]]]:
    """Reward functions by name: ``gsm8k``, ``format``, ``code`` or ``package.module:function``."""
    from . import rewards

    builtin = {"gsm8k": rewards.gsm8k_reward, "format": rewards.format_reward, "code": rewards.code_reward}
    out = []
    for name in names:
        if name in builtin:
            out.append(builtin[name])
            continue
        module, _, attr = name.partition(":")
        if not attr:
            raise ConfigError(f"rewards: unknown reward {name!r}; use one of {', '.join(builtin)} or module:function")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"rewards: cannot import {name!r} ({e})") from e
        out.append(fn)
    return out


# ---------------------------------------------------------------------------------------------- rows
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            row.setdefault("id", f"{path.name}:{i}")
            rows.append(row)
    return rows


def load_rl_rows(run: RunDir, source: str, domain: str, n: int | None, seed: int,
                 data_dir: str | None = None) -> list[dict[str, Any]]:
    """Rows of an RL round from ``source`` (see :class:`~brainstacks_hooks.rl.config.RLDataConfig`), a seeded
    sample of ``n`` (all when ``None``). Rows with an ``output`` and no ``answer`` get ``answer = output`` (the
    column :func:`~brainstacks_hooks.rl.rewards.gsm8k_reward` reads)."""
    if source in RUN_ROW_SETS:
        rows = run.read_rows(source, domain)
    elif source.startswith("hf:"):
        from datasets import load_dataset

        parts = source[3:].split(":")  # hf:<id>[:<config>]:<split>
        name, config_name = parts[0], (parts[1] if len(parts) == 3 else None)
        dataset = load_dataset(name, config_name, split=parts[-1] if len(parts) > 1 else "train")
        rows = [dict(r, id=r.get("id", f"{source[3:]}:{i}")) for i, r in enumerate(dataset)]  # split in the id
    else:
        import os

        path = Path(source)
        if not path.is_absolute():
            base = data_dir or os.environ.get(ENV_DATA_DIR)
            if base is None:
                raise ConfigError(f"data source {source!r} is relative: set data.data_dir or ${ENV_DATA_DIR}")
            path = Path(base) / path
        if not path.is_file():
            raise ConfigError(f"data source {source!r}: no such file {path}")
        rows = _read_jsonl(path)
    if not rows:
        raise ConfigError(f"data source {source!r} has no rows for domain {domain!r}")
    if n is not None and n < len(rows):
        rows = random.Random(seed).sample(rows, n)
    for r in rows:
        if "answer" not in r and "output" in r:
            r["answer"] = r["output"]
    return rows


def _prompts(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r.get("instruction", r.get("question", r.get("prompt"))), r.get("input", "") or "") for r in rows]


# ---------------------------------------------------------------------------------------------- metrics
def _mean_stderr(values: list[float]) -> dict[str, float | None]:
    """Mean and standard error (``None`` where undefined: the manifest stays strict JSON)."""
    n = len(values)
    if not n:
        return {"mean": None, "stderr": None, "n": 0}
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else None
    return {"mean": mean, "stderr": math.sqrt(var / n) if var is not None else None, "n": n}


def reward_metrics(stacks: BrainStacks, tokenizer: Any, rows: list[dict[str, Any]], names: list[str],
                   weights: list[float] | None, cfg: Any, progress: bool = True) -> tuple[dict[str, Any], list]:
    """Greedy completions of ``rows`` (stacks in train mode: frozen + active) scored by each reward.

    Returns ``({"score": weighted sum mean, "<reward>": {mean, stderr, n}, ...}, samples)``.
    """
    from tqdm.auto import tqdm

    from .dpo import make_generate_fn

    gen = make_generate_fn(stacks.model, tokenizer, cfg.max_new_tokens, do_sample=False,
                           max_prompt_length=cfg.max_prompt_length)
    completions: list[str] = []
    prompts = _prompts(rows)
    with stacks.train_mode():
        for start in tqdm(range(0, len(prompts), cfg.batch_size), desc="held-out generation", disable=not progress):
            completions += gen(prompts[start:start + cfg.batch_size])
    funcs = resolve_rewards(names)
    weights = weights or [1.0] * len(funcs)
    columns = {k: [r.get(k) for r in rows] for k in rows[0] if k not in ("prompt", "completion")}
    out: dict[str, Any] = {}
    total = [0.0] * len(rows)
    for name, fn, w in zip(names, funcs, weights):
        values = [float(v) for v in fn(completions, **columns)]
        out[name] = _mean_stderr(values)
        total = [t + w * v for t, v in zip(total, values)]
    out["score"] = _mean_stderr(total)
    samples = [{"id": r["id"], "completion": c} for r, c in zip(rows, completions)]
    return out, samples


def preference_metrics(trainer: Any, stacks: BrainStacks, eval_examples: list[tuple[dict, dict]],
                       pad: int, batch_size: int) -> dict[str, Any]:
    """TRL's held-out DPO metrics plus the reference-free preference accuracy (mean-token log-prob).

    Collective under several processes (every process calls it and gets the same numbers)."""
    raw = trainer.evaluate()
    out = {k.removeprefix("eval_"): float(v) for k, v in raw.items()
           if isinstance(v, (int, float)) and not k.endswith(("runtime", "per_second"))}
    with stacks.train_mode():  # both sharded over the processes (collective), gathered in order
        chosen = per_example_loss(stacks.model, [c for c, _ in eval_examples], pad, batch_size, shard=True)
        rejected = per_example_loss(stacks.model, [r for _, r in eval_examples], pad, batch_size, shard=True)
    wins = (chosen < rejected).float().tolist()  # lower NLL = higher log-prob
    out["reference_free_accuracy"] = _mean_stderr(wins)
    out["score"] = {"mean": -out["loss"], "n": len(eval_examples)}  # higher is better, like GRPO's
    return out


def _frozen_hash(stacks: BrainStacks) -> str:
    h = hashlib.sha256()
    for s in stacks.frozen_stacks:
        for name, t in sorted(s.tensors().items()):
            h.update(f"{s.domain}/r{s.round_index}/{name}".encode())
            h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- the round
@dataclass
class RLRoundResult:
    """What one RL round left: its manifest record and the metrics before and after."""

    domain: str
    record: RoundRecord
    before: dict[str, Any]
    after: dict[str, Any]


def _setup(run: RunDir, config: RLConfig) -> tuple[BrainStacks, Any]:
    order = run.manifest.domain_order
    idx = order.index(config.domain)
    overrides = {"backend": config.backend} if config.backend else {}
    model, tokenizer = run.load_base(**overrides)
    stacks = BrainStacks.attach(model, run.stack_config)
    ns = run.run_config().null_space.enabled
    run.restore_stacks(stacks, domains=order[: idx + 1], null_space_of=order[:idx] if ns else [])
    later = [d for d in order[idx + 1:] if run.manifest.accepted_rounds(d)]
    if later:
        logger.warning("%s is not the run's last domain: %s were trained without this RL stack (their null-space "
                       "projection does not cover it); the paper refines a domain before the next one starts",
                       config.domain, ", ".join(later))
    return stacks, tokenizer


def _sft_val_loss(run: RunDir, stacks: BrainStacks, tokenizer: Any, domain: str, n: int) -> float | None:
    """The domain's SFT validation loss under the stacks in train mode (collective: sharded over the processes)."""
    if n <= 0 or not run.has_rows("sft_val"):
        return None
    rows = run.read_rows("sft_val", domain)[:n]
    tr = run.run_config().train
    examples, _ = encode_rows(tokenizer, rows, tr.max_length)
    if not examples:
        return None
    with stacks.train_mode():
        return evaluate_loss(stacks.model, examples, tokenizer.pad_token_id, tr.eval_batch_size, tr.bf16,
                             shard=True)


def _prompt_key(row: dict[str, Any]) -> str:
    instruction, inp = _prompts([row])[0]
    text = f"{instruction}\n{inp}" if isinstance(instruction, str) else json.dumps(instruction, sort_keys=True)
    return " ".join(text.lower().split())


def _check_disjoint(train: list[dict], held_out: list[dict], config: RLConfig) -> None:
    overlap = {r["id"] for r in train} & {r["id"] for r in held_out}
    same_text = {_prompt_key(r) for r in train} & {_prompt_key(r) for r in held_out}
    if same_text and not overlap:
        raise ConfigError(f"data: {len(same_text)} held-out prompts ({config.data.eval_source}) also appear among the "
                          f"training prompts ({config.data.train_source}) under other ids; use disjoint sources")
    if overlap:
        raise ConfigError(f"data: {len(overlap)} held-out rows ({config.data.eval_source}) are also training rows "
                          f"({config.data.train_source}), e.g. {sorted(overlap)[0]!r}; use disjoint sources")


def _dpo_pairs(stacks: BrainStacks, tokenizer: Any, config: RLConfig, rows: list[dict],
               scratch: Path, role: str, progress: bool) -> list[dict[str, Any]]:
    """Preference pairs of ``rows`` (kept as they are when they have chosen/rejected), built once per round (by
    the main process, which samples and writes them; every process gets them)."""
    if all("chosen" in r and "rejected" in r for r in rows):
        return rows
    return distributed.computed_on_main(_sample_dpo_pairs, stacks, tokenizer, config, rows, scratch, role, progress)


def _sample_dpo_pairs(stacks: BrainStacks, tokenizer: Any, config: RLConfig, rows: list[dict],
                      scratch: Path, role: str, progress: bool) -> list[dict[str, Any]]:
    path = scratch / PAIRS_FILE
    key = {"role": role, "ids_hash": ids_hash([str(r["id"]) for r in rows]), "pairs": asdict(config.pairs),
           "seed": config.seed}
    saved = read_json(path) if path.is_file() else {}
    if saved.get(role, {}).get("key") == key:
        return saved[role]["pairs"]
    from tqdm.auto import tqdm

    from .dpo import build_preference_pairs, make_generate_fn

    pc = config.pairs
    gen = make_generate_fn(stacks.model, tokenizer, pc.max_new_tokens, do_sample=True, temperature=pc.temperature,
                           top_p=pc.top_p, max_prompt_length=pc.max_prompt_length, seed=config.seed)
    bar = tqdm(total=len(rows), desc=f"sampling rejected answers ({role})", disable=not progress)

    def sample(prompts):
        with stacks.reference():  # the SFT policy (== train mode with the zero-init active stack)
            out = gen(prompts)
        bar.update(len(prompts))
        return out

    pairs = build_preference_pairs(rows, sample, batch_size=pc.batch_size)
    bar.close()
    saved[role] = {"key": key, "pairs": pairs}
    atomic_write_json(path, saved)
    return pairs


def _trainer_args(config: RLConfig, scratch: Path, progress: bool, backend: str | None) -> Any:
    kw = dict(config.trainer)
    kw.setdefault("seed", config.seed)
    kw.setdefault("disable_tqdm", not progress)
    if config.algorithm == "dpo":
        from .dpo import dpo_config

        return dpo_config(str(scratch / "trainer"), **kw)
    from .grpo import grpo_config

    if config.reward_weights is not None:
        kw.setdefault("reward_weights", list(config.reward_weights))
    if backend == "unsloth":  # Unsloth's fast decode skips the hooks (research/unsloth_hooks.md)
        kw.setdefault("generation_kwargs", {"use_cache": False})
    return grpo_config(str(scratch / "trainer"), **kw)


def _run_round(run: RunDir, config: RLConfig, round_index: int, progress: bool,
               loaded: tuple[BrainStacks, Any]) -> RLRoundResult:
    t0 = time.time()
    stacks, tokenizer = loaded
    pad = tokenizer.pad_token_id
    scratch = run.rl_round_dir(config.domain, round_index)
    scratch.mkdir(parents=True, exist_ok=True)
    dc = config.data
    train_rows = load_rl_rows(run, dc.train_source, config.domain, dc.train_rows, dc.seed, dc.data_dir)
    eval_rows = load_rl_rows(run, dc.eval_source, config.domain, dc.eval_rows, dc.seed + 1, dc.data_dir)
    _check_disjoint(train_rows, eval_rows, config)
    backend = getattr(stacks.model, "_brainstacks_backend", None)

    if config.algorithm == "dpo":
        train_rows = _dpo_pairs(stacks, tokenizer, config, train_rows, scratch, "train", progress)
        eval_rows = _dpo_pairs(stacks, tokenizer, config, eval_rows, scratch, "eval", progress)
        if not train_rows or not eval_rows:
            raise TrainingError(f"{config.domain}: no usable preference pairs (every sample equalled its reference)")

    frozen_before = _frozen_hash(stacks)
    stacks.new_stack(config.domain, round_index)
    args = _trainer_args(config, scratch, progress, backend)
    from .dpo import RLGuardCallback

    state: dict[str, Any] = {}
    if config.algorithm == "dpo":
        from .dpo import build_dpo_trainer, preference_dataset

        eval_dataset = preference_dataset(tokenizer, eval_rows)

        def as_example(prompt_ids: list[int], answer_ids: list[int]) -> dict[str, list[int]]:
            ids = list(prompt_ids) + list(answer_ids)
            return {"input_ids": ids, "attention_mask": [1] * len(ids),
                    "labels": [IGNORE_INDEX] * len(prompt_ids) + list(answer_ids)}

        eval_examples = [(as_example(r["prompt_ids"], r["chosen_ids"]), as_example(r["prompt_ids"], r["rejected_ids"]))
                         for r in eval_dataset]

        def measure() -> dict[str, Any]:  # collective: TRL's evaluation and the accuracy are sharded
            return preference_metrics(state["trainer"], stacks, eval_examples, pad, config.eval.batch_size)
    else:
        from .grpo import build_grpo_trainer

        def measure(rows: list[dict] = eval_rows) -> dict[str, Any]:  # the main process generates and scores
            metrics, state["samples"] = distributed.computed_on_main(
                reward_metrics, stacks, tokenizer, rows, config.rewards, config.reward_weights, config.eval, progress)
            return metrics

    before_path = scratch / BEFORE_FILE
    key = {"algorithm": config.algorithm, "config": to_dict(config.eval), "data": to_dict(dc),
           "rewards": config.rewards, "reward_weights": config.reward_weights, "pairs": to_dict(config.pairs),
           "seed": config.seed,
           "ids_hash": ids_hash([str(r["id"]) for r in eval_rows])}
    guard_score = None
    if config.guard_eval_steps > 0:
        if config.algorithm == "dpo":
            def guard_score() -> float:  # collective: gathered over the processes, the same number everywhere
                return float(state["trainer"].evaluate()["eval_loss"])
        else:
            def guard_score() -> float:
                return -float(measure(eval_rows[: config.guard_eval_rows])["score"]["mean"])
    guard = RLGuardCallback(stacks, evaluate=guard_score, eval_steps=max(1, config.guard_eval_steps))
    if config.algorithm == "dpo":
        trainer = build_dpo_trainer(stacks, tokenizer, train_rows, args, eval_rows=eval_dataset, guard=guard)
    else:
        trainer = build_grpo_trainer(stacks, tokenizer, train_rows, resolve_rewards(config.rewards), args, guard=guard)
    state["trainer"] = trainer

    saved = read_json(before_path) if before_path.is_file() else {}
    saved = distributed.broadcast_object(saved if saved.get("key") == key else None)  # the main process's view
    if saved is not None:
        before = saved["metrics"]
        logger.info("%s r%d: pre-RL metrics from the interrupted session (%s)", config.domain, round_index, before_path)
    else:
        before = measure()
        before["sft_val_loss"] = _sft_val_loss(run, stacks, tokenizer, config.domain, config.eval.sft_val_rows)
        if distributed.is_main_process():
            atomic_write_json(before_path, {"key": key, "metrics": before})
    if guard_score is not None:  # the guard's starting point, on the rows the guard scores
        guard.best_score = guard_score() if config.algorithm == "grpo" else before["loss"]

    t_train = time.time()
    trainer.train()
    train_s = time.time() - t_train
    steps = trainer.state.global_step
    log = [dict(h) for h in trainer.state.log_history]
    after = measure()
    del trainer, state["trainer"]
    after["sft_val_loss"] = _sft_val_loss(run, stacks, tokenizer, config.domain, config.eval.sft_val_rows)
    if _frozen_hash(stacks) != frozen_before:  # the hooks never hand frozen tensors to the optimizer
        raise TrainingError(f"{config.domain} r{round_index}: frozen stacks changed during RL (a bug; nothing saved)")

    b, a = before["score"]["mean"], after["score"]["mean"]
    finite = a is not None and b is not None and math.isfinite(a) and math.isfinite(b)
    improvement = a - b if finite else None
    loss_b, loss_a = before.get("sft_val_loss"), after.get("sft_val_loss")
    sft_rise = loss_a - loss_b if loss_a is not None and loss_b is not None else None
    reasons = []
    if improvement is None or improvement <= config.min_improvement:
        what = "reward" if config.algorithm == "grpo" else "-DPO loss"
        reasons.append(f"held-out {what} did not rise by more than {config.min_improvement} ({b} -> {a})")
    if config.max_sft_val_loss_increase is not None and sft_rise is not None \
            and sft_rise > config.max_sft_val_loss_increase:
        reasons.append(f"the SFT validation loss rose by {sft_rise:.4f} (> max_sft_val_loss_increase "
                       f"{config.max_sft_val_loss_increase})")
    accept = not reasons
    record = RoundRecord(
        round=round_index, status="accepted" if accept else "rejected", loss_before=loss_b, best_val_loss=loss_a,
        frozen_val_loss=loss_a if accept else None, improvement=improvement, steps=steps,
        wall_time_s=round(time.time() - t0, 2), seed=config.seed, stop_reason=guard.stop_reason,
        kind=config.algorithm, train_log=log, eval_history=list(guard.history),
        note=None if accept else "; ".join(reasons) + "; stack discarded",
        rl={"metric": "mean reward" if config.algorithm == "grpo" else "-DPO loss", "before": before, "after": after,
            "train_s": round(train_s, 2), "s_per_step": round(train_s / max(1, steps), 2),
            "train_rows": len(train_rows), "eval_rows": len(eval_rows), "train_source": dc.train_source,
            "eval_source": dc.eval_source, "rewards": config.rewards if config.algorithm == "grpo" else None,
            "pair_source": train_rows[0].get("pair_source") if config.algorithm == "dpo" else None,
            "frozen_stacks_unchanged": True, "trainer": {k: v for k, v in config.trainer.items()}},
    )
    if "samples" in state and distributed.is_main_process():
        atomic_write_json(scratch / SAMPLES_FILE, {"after": state["samples"]})
    if accept:
        frozen = stacks.freeze_active()
        distributed.on_main_process(run.save_round, config.domain, record, frozen, stacks)
    else:
        stacks.discard_active()
        distributed.on_main_process(run.save_round, config.domain, record)
    run.sync()  # several processes: the main process's manifest everywhere
    distributed.on_main_process(run.verify_stacks)  # every earlier stack file still matches the manifest's checksum
    logger.info("%s r%d (%s): %s, held-out %s %s -> %s in %d steps (%.1f s/step)", config.domain, round_index,
                config.algorithm, record.status, record.rl["metric"], b, a, steps, record.rl["s_per_step"])
    if (run.router_dir / "router.json").is_file() and accept:
        logger.warning("the run's router was trained on the stacks before this round; retrain it: "
                       "brainstacks router %s", run.path)
    return RLRoundResult(config.domain, record, before, after)


def _rounds(run: RunDir, config: RLConfig, progress: bool,
            loaded: tuple[BrainStacks, Any] | None = None) -> list[RLRoundResult]:
    """The missing rounds of ``config``; the base is loaded once for all of them unless ``loaded`` is given."""
    own = loaded is None
    results: list[RLRoundResult] = []
    try:
        while True:
            rounds = run.manifest.domain(config.domain).rounds
            done = [r for r in rounds if r.kind == config.algorithm]
            if any(not r.accepted for r in done):
                logger.info("%s: a %s round was rejected; no further %s rounds (run with a new config to retry)",
                            config.domain, config.algorithm, config.algorithm)
                break
            if len(done) >= config.rounds:
                if not results:
                    logger.info("%s: %d %s round(s) already recorded; nothing to do", config.domain, len(done),
                                config.algorithm)
                break
            if loaded is None:
                loaded = _setup(run, config)
            k = max(r.round for r in rounds) + 1
            results.append(_run_round(run, config, k, progress, loaded))  # an accepted stack joins the next base
    finally:
        if own and loaded is not None:
            loaded[0].detach()
    return results


def run_rl(config: RLConfig, progress: bool = True) -> list[RLRoundResult]:
    """Run the RL rounds of ``config.domain`` that the manifest does not list yet (see the module docstring).

    Raises:
        RunDirError: not a run directory, the domain is unknown or its SFT is not done.
        ConfigError: bad data sources, overlapping train/held-out rows, unknown rewards.
    """
    run = RunDir.open(config.run_dir)
    m = run.manifest
    distributed.init_distributed(cpu=bool(config.trainer.get("use_cpu", False)))  # before the model loads
    log_on_main_process_only()
    if config.domain not in m.domain_order:
        raise RunDirError(f"{run.path}: no domain {config.domain!r} (domains: {', '.join(m.domain_order)})")
    rec = m.domain(config.domain)
    if rec.status != "done":
        raise RunDirError(f"{run.path}: SFT of {config.domain!r} is not done (status {rec.status}); finish it first, "
                          "or name the RL config in the domain's `rl:` list to run it inside SFT")
    return _rounds(run, config, progress)


def refine_domain(run: RunDir, stacks: BrainStacks, tokenizer: Any, domain: Any, progress: bool = True) -> None:
    """The ``refine`` step of :func:`~brainstacks_hooks.training.outer_loop.run_sft`: the RL configs named in
    ``domain.rl``, in order, on the stacks SFT has in memory (the paper's order: a domain's SFT rounds, then RL,
    then its null space and the next domain). Each config's ``run_dir`` and ``domain`` are set to the run's."""
    from ..config import load_config

    for name in domain.rl:
        config = load_config(RLConfig, name, [f"run_dir={run.path}", f"domain={domain.name}"])
        _rounds(run, config, progress, (stacks, tokenizer))


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def summary_table(manifest: Any) -> str:
    """The RL rounds of a run: domain, round, algorithm, status, held-out metric before -> after, steps, time."""
    lines = [f"{'domain':<10} {'round':>5} {'algo':<5} {'status':<9} {'metric':<10} {'before':>9} {'after':>9} "
             f"{'sft val before':>14} {'after':>7} {'steps':>5} {'s/step':>6}"]
    for d in manifest.domain_order:
        for r in manifest.domain(d).rounds:
            if r.rl is None:
                continue
            b, a = r.rl["before"]["score"]["mean"], r.rl["after"]["score"]["mean"]
            lines.append(f"{d:<10} {r.round:>5} {r.kind:<5} {r.status:<9} {r.rl['metric']:<10} {_num(b):>9} "
                         f"{_num(a):>9} {_num(r.loss_before):>14} {_num(r.best_val_loss):>7} {r.steps:>5} "
                         f"{r.rl['s_per_step']:>6.1f}")
    if len(lines) == 1:
        lines.append("(no RL rounds)")
    return "\n".join(lines)
