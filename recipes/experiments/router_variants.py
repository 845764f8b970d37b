"""Why the meta-router collapsed, measured: router variants trained on the same quickstart features.

    python recipes/experiments/router_variants.py runs/quickstart [--config router_quickstart] [--only 8]
        [router.val_fraction=0.2 ...]

Needs a finished run whose router was trained once (``brainstacks router`` / ``make quickstart``), so the oracle
and the features come from their caches. Every variant trains on exactly the same rows (oracle rows no stack
trained on, label-only rows) with the same checkpoint split, and is measured on the same held-out prompts
(``rows/router_test``): top-1 against the source domain (a top-1 counts only with a 0.05 score margin), the mean
margin and spread of the scores, and how alike the per-domain attention contexts are (mean pairwise cosine
between the domains' pooled vectors; 1.0 means every domain sees the same vector). A linear probe on the same
features is the baseline.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import torch

from brainstacks_hooks.config import load_config
from brainstacks_hooks.router.model import MetaRouter, masked_attention_pool
from brainstacks_hooks.router.pipeline import RouterPipelineConfig, held_out_metrics, prepare_router_inputs
from brainstacks_hooks.router.train import train_router
from brainstacks_hooks.run_dir import RunDir

REF = dict(query_init_std=0.02, per_domain_head=False, normalize_features=False)
VARIANTS = {
    "reference: queries std 0.02, shared head, raw features": REF,
    "+ standardised features": {**REF, "normalize_features": True},
    "+ per-domain head": {**REF, "per_domain_head": True},
    "+ queries std 1.0": {**REF, "query_init_std": 1.0},
    "per-domain head + queries std 1.0": {**REF, "per_domain_head": True, "query_init_std": 1.0},
    "per-domain head + standardised features": {**REF, "per_domain_head": True, "normalize_features": True},
    "all three": dict(query_init_std=1.0, per_domain_head=True, normalize_features=True),
    "per-domain head, hidden 128": {**REF, "per_domain_head": True, "hidden": 128},
    "all three, hidden 128": dict(query_init_std=1.0, per_domain_head=True, normalize_features=True, hidden=128),
    "all three, weight decay 0.1, dropout 0.3": dict(query_init_std=1.0, per_domain_head=True,
                                                     normalize_features=True, weight_decay=0.1, dropout=0.3),
}
SEEDS = (42, 43, 44)


@torch.no_grad()
def context_similarity(router: MetaRouter, features: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean pairwise cosine similarity of the per-domain pooled contexts over prompts (1.0: all the same)."""
    router.eval()
    x = (features.float() - router.feature_mean) * router.feature_inv_std
    tokens = router.token_norm(router.token_proj(x))  # [B, S, H]
    dom = router.domain_norm(masked_attention_pool(tokens, router.domain_queries, mask))  # [B, N, H]
    dom = torch.nn.functional.normalize(dom, dim=-1)
    sims = [(dom[:, i] * dom[:, j]).sum(-1).mean() for i, j in itertools.combinations(range(dom.shape[1]), 2)]
    return float(torch.stack(sims).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--config", default="router_quickstart")
    ap.add_argument("--only", default="", help="comma-separated variant indices to run (default: all)")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. router.val_fraction=0.2 (checkpoint split)")
    args = ap.parse_args()
    run = RunDir.open(args.run_dir, require_finished=True)
    cfg = load_config(RouterPipelineConfig, args.config, [f"run_dir={run.path}", "progress=false", *args.overrides])
    model, tok = run.load_base()
    stacks = run.open_stacks(model)
    inputs = prepare_router_inputs(run, cfg, stacks, tok)
    n_test = sum(d in stacks.domains for d, _ in inputs.test_flat)
    print(f"training rows {len(inputs.data)} (checkpoint split {len(inputs.split[0])}/{len(inputs.split[1])}), "
          f"held-out prompts {n_test}\n")
    print(f"seeds {SEEDS}: held-out top-1 per seed and mean; the other columns are means over seeds\n")
    print("| variant | top-1 per seed | mean top-1 | " + " | ".join(f"top-1 {d}" for d in stacks.domains)
          + " | margin | spread | context cosine (init -> trained) | best epochs |")
    print("|---|" + "---:|" * (len(stacks.domains) + 6))
    probe = None
    only = set(args.only.split(",")) if args.only else None
    for i, (name, kw) in enumerate(VARIANTS.items()):
        if only is not None and str(i) not in only:
            continue
        rows = []
        for seed in SEEDS:
            rc = dataclasses.replace(cfg.router, seed=seed, **kw)
            torch.manual_seed(rc.seed)
            init = MetaRouter(inputs.data.features.shape[-1], stacks.domains, rc.hidden, rc.dropout,
                              rc.temperature_clamp, query_init_std=rc.query_init_std,
                              per_domain_head=rc.per_domain_head)
            if rc.normalize_features:
                init.fit_feature_norm(inputs.data.features, inputs.data.attention_mask)
            result = train_router(inputs.data, rc, device="cpu", split=inputs.split, progress=False)
            held, probe, _, _ = held_out_metrics(result.router, inputs, rc, "cpu")
            rows.append((held, context_similarity(init, inputs.test_features, inputs.test_mask),
                         context_similarity(result.router, inputs.test_features, inputs.test_mask), result.best_epoch))

        def mean(key: str, rows: list = rows) -> float:
            return sum(h.get(key, float("nan")) for h, *_ in rows) / len(rows)

        per = " | ".join(f"{mean('top1_' + d):.3f}" for d in stacks.domains)
        seeds = ", ".join(f"{h['top1']:.3f}" for h, *_ in rows)
        sim0, sim1 = (sum(r[i] for r in rows) / len(rows) for i in (1, 2))
        print(f"| {name} | {seeds} | {mean('top1'):.3f} | {per} | {mean('top1_margin'):.3f} | "
              f"{mean('score_spread'):.3f} | {sim0:.3f} -> {sim1:.3f} | {', '.join(str(r[3]) for r in rows)} |")
    if probe:
        per = " | ".join(f"{probe.get('top1_' + d, float('nan')):.3f}" for d in stacks.domains)
        print(f"| linear probe (softmax regression on mean-pooled features) | {probe['top1']:.3f} | {per} | "
              f"{probe['top1_margin']:.3f} | {probe['score_spread']:.3f} | - | - |")


if __name__ == "__main__":
    main()
