"""How much of the per-example oracle's advantage a router could ever recover: the oracle cross-fitted on tokens.

    python recipes/experiments/oracle_noise.py runs/quickstart [--config router_quickstart] [overrides ...]

(overrides as the router was trained, e.g. ``test_oracle_rows_per_domain=40``)

The loss table's ``oracle`` column picks, for each held-out example, the best of the 8 candidate routes on that
example's own answer tokens and reports the loss of the pick on the same tokens. Picking the smallest of 8 noisy
numbers is biased low even when the routes are equally good (the winner's curse), so "recover 80 % of the gap
between ungated and the oracle" may ask for noise. Here every example's completion tokens are split in two
halves (even / odd positions); the route is picked on one half, by the oracle's own rule (``decide``: threshold
0.01, the weights inference runs) and by plain argmin, and scored on the other half, both ways round. A route
choice that carries information about the example beats ungated on the half it was not picked on; noise does not.

Also printed: the best *fixed* route per domain (one route for all of the domain's examples, picked on the
oracle's training rows of that domain, run at the weights inference runs for that route's target: 0.8 for a
route's domains, 1.0 for the source domain), what a router that knows only the domain could do.

Needs a finished run whose router was trained (``make quickstart``): the held-out oracle rows and the router's
routes come from ``router/val_routes.json``. The 8 routes of an example in mixed-route forwards (the loss table's
``route_token_nll``), ungated and routed one forward each, bf16 autocast as the loss table.
"""

from __future__ import annotations

import argparse

import torch

from brainstacks_hooks.config import load_config
from brainstacks_hooks.data.formatting import encode_example
from brainstacks_hooks.loss import autocast_context, completion_token_nll, eval_mode
from brainstacks_hooks.router.examples import build_router_examples
from brainstacks_hooks.router.mode_losses import cross_fitted_nll, route_token_nll
from brainstacks_hooks.router.oracle import OracleCache, all_route_keys, decide, route_key
from brainstacks_hooks.router.pipeline import RouterPipelineConfig
from brainstacks_hooks.run_dir import ROUTER_TEST, ROUTER_TRAIN, SFT_TRAIN, RunDir
from brainstacks_hooks.utils.io import read_json

UNGATED, ROUTED = "<ungated>", "<routed>"


@torch.no_grad()
def token_losses(stacks, enc: dict, weights: dict[str, float] | None, bf16: bool) -> torch.Tensor:
    """``[K]`` NLL of each completion token of one encoded example under ``weights`` (``None``: ungated)."""
    model = stacks.model
    device = next(model.parameters()).device
    ids = torch.tensor([enc["input_ids"]], device=device)
    labels = torch.tensor([enc["labels"]], device=device)
    ctx = stacks.ungated() if weights is None else stacks.routed(weights)
    with ctx, autocast_context(model, bf16):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    return completion_token_nll(logits, labels)[0].double().cpu()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--config", default="router_quickstart")
    ap.add_argument("overrides", nargs="*", help="the router's config overrides, e.g. test_oracle_rows_per_domain=40")
    args = ap.parse_args()
    torch.manual_seed(0)
    run = RunDir.open(args.run_dir, require_finished=True)
    cfg = load_config(RouterPipelineConfig, args.config, [f"run_dir={run.path}", "progress=false", *args.overrides])
    rc = cfg.router
    bf16 = run.run_config().train.bf16 if cfg.eval_bf16 is None else cfg.eval_bf16
    model, tok = run.load_base()
    stacks = run.open_stacks(model)
    domains = list(stacks.domains)
    ex = build_router_examples(cfg, domains, run.rows_by_domain(ROUTER_TRAIN), run.rows_by_domain(SFT_TRAIN),
                               run.rows_by_domain(ROUTER_TEST), tok)
    by_id = {e.example_id: e for e in ex.test_oracle}
    routed = {r["example_id"]: r for r in read_json(run.router_dir / "val_routes.json")}
    test = [by_id[i] for i in routed if i in by_id and len(by_id[i].labels) == 1]
    if len(test) < sum(1 for r in routed.values() if r["domain"] in domains):
        raise SystemExit("router/val_routes.json has rows this config does not build: pass the router's overrides")
    keys = all_route_keys(domains)

    # per token NLL of every held-out example under the 8 oracle routes (one mixed-route forward), ungated, routed
    per: list[tuple[str, tuple[str, ...], dict[str, torch.Tensor]]] = []
    with eval_mode(model):
        for n, e in enumerate(test, 1):
            enc = encode_example(tok, e.instruction, e.input, e.output, rc.oracle_max_length)
            route_keys, nll = route_token_nll(stacks, enc, e.labels, rc, bf16)  # [8, K]
            losses = dict(zip(route_keys, nll, strict=True))
            losses[UNGATED] = token_losses(stacks, enc, None, bf16)
            losses[ROUTED] = token_losses(stacks, enc, routed[e.example_id]["weights"], bf16)
            per.append((e.domain, tuple(e.labels), losses))
            print(f"\r{n}/{len(test)} examples", end="", flush=True)
    print()

    # the best fixed route of each domain, picked on the oracle's training rows (their cached route losses)
    cache = OracleCache(run.router_dir / "oracle_cache")
    fixed = {}
    for d in domains:
        cached = read_json(cache.path(d))["records"].values()  # the signature was checked when the router trained
        recs = [r for r in cached if r["example_id"] not in by_id and len(r["labels"]) == 1]
        n_tok = sum(r["n_tokens"] for r in recs)
        fixed[d] = min(keys, key=lambda k: sum(r["n_tokens"] * r["losses"][k] for r in recs) / n_tok)

    print("\n| domain | examples | tokens | ungated | routed | oracle (in-sample, as the loss table) | "
          "oracle cross-fitted (decide) | oracle cross-fitted (argmin) | best fixed route (train rows) | "
          "recovered vs in-sample | recovered vs cross-fitted (decide) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for d in domains:
        rows = [(lab, losses) for dom, lab, losses in per if dom == d]
        if not rows:
            continue
        tot = dict.fromkeys(("ungated", "routed", "in_sample", "cross_decide", "cross_argmin", "fixed"), 0.0)
        n_tok = 0
        for labels, losses in rows:
            k_tokens = losses[UNGATED].numel()
            n_tok += k_tokens
            tot["ungated"] += float(losses[UNGATED].sum())
            tot["routed"] += float(losses[ROUTED].sum())
            tot["fixed"] += float(losses[fixed[d]].sum())
            full = {k: float(losses[k].mean()) for k in keys}
            pick = route_key(decide(full, domains, rc, labels).route, domains)
            tot["in_sample"] += float(losses[pick].sum())
            nll = torch.stack([losses[k] for k in keys])  # [8, K]
            by_rule = lambda t, lab=labels: route_key(decide(t, domains, rc, lab).route, domains)  # noqa: E731
            tot["cross_decide"] += cross_fitted_nll(nll, keys, by_rule)
            tot["cross_argmin"] += cross_fitted_nll(nll, keys, lambda t: min(t, key=t.__getitem__))
        m = {k: v / n_tok for k, v in tot.items()}

        def rec(oracle: float, m: dict = m) -> str:
            gap = m["ungated"] - oracle
            return f"{(m['ungated'] - m['routed']) / gap:.2f}" if gap > 0 else "no gap"

        print(f"| {d} | {len(rows)} | {n_tok} | {m['ungated']:.4f} | {m['routed']:.4f} | {m['in_sample']:.4f} | "
              f"{m['cross_decide']:.4f} | {m['cross_argmin']:.4f} | {m['fixed']:.4f} ({fixed[d] or 'chat floor'}) | "
              f"{rec(m['in_sample'])} | {rec(m['cross_decide'])} |")


if __name__ == "__main__":
    main()
