"""The loss table's cross-fitted oracle: the route the oracle's rule picks on half of an answer's tokens, scored on
the other half, computed in one mixed-route forward, equals the same rule applied to each route run alone."""

from __future__ import annotations

import pytest
import torch

from brainstacks_hooks.loss import completion_token_nll
from brainstacks_hooks.router.config import RouterConfig
from brainstacks_hooks.router.mode_losses import cross_fitted_oracle_nll, evaluate_val_losses
from brainstacks_hooks.router.oracle import all_route_keys, decide, executed_weights, parse_route_key, route_key
from brainstacks_hooks.stacks.brainstacks import BrainStacks
from brainstacks_hooks.stacks.config import StackConfig
from brainstacks_hooks.testing import add_random_stack, make_tiny_llama

DOMAINS = ("chat", "code", "math")


def _stacks(scale: float) -> BrainStacks:
    stacks = BrainStacks.attach(make_tiny_llama(), StackConfig(rank=4))
    for i, d in enumerate(DOMAINS):
        if scale:
            add_random_stack(stacks, d, seed=20 + i, a_scale=scale, b_scale=scale)
        else:
            stacks.new_stack(d)  # zero-init B: every route computes the base model
            stacks.freeze_active()
    return stacks


def _example(seed: int, length: int = 24, prompt: int = 6) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (length,), generator=g).tolist()
    return {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}


def test_cross_fitted_oracle_equals_the_rule_on_each_route_run_alone():
    stacks, cfg = _stacks(0.6), RouterConfig()
    ex = _example(1)
    keys = all_route_keys(list(DOMAINS))
    per = []
    ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
    for k in keys:  # each route alone, at the weights the oracle executes for a math row
        with torch.no_grad(), stacks.routed(executed_weights(parse_route_key(k), list(DOMAINS), cfg, ("math",))):
            per.append(completion_token_nll(stacks.model(input_ids=ids).logits, labels)[0].double())
    per = torch.stack(per)  # [R, K]
    assert per.shape == (8, 18) and (per.max(0).values - per.min(0).values).max() > 1e-3  # the routes differ
    even = torch.arange(per.shape[1]) % 2 == 0
    expected, picks = 0.0, []
    for pick_on, score_on in ((even, ~even), (~even, even)):
        table = {k: float(per[j, pick_on].mean()) for j, k in enumerate(keys)}
        picks.append(route_key(decide(table, list(DOMAINS), cfg, ("math",)).route, list(DOMAINS)))
        expected += float(per[keys.index(picks[-1]), score_on].sum())
    got = cross_fitted_oracle_nll(stacks, ex, ("math",), cfg, bf16=False)
    assert got == pytest.approx(expected, rel=1e-5)
    in_sample = float(per[keys.index(route_key(decide({k: float(per[j].mean()) for j, k in enumerate(keys)},
                                                          list(DOMAINS), cfg, ("math",)).route, list(DOMAINS)))].sum())
    assert got != pytest.approx(in_sample, rel=1e-6)  # scoring on held-out tokens changes the number


def test_identical_routes_leave_no_gap_to_recover():
    stacks, cfg = _stacks(0.0), RouterConfig()
    examples = {d: [_example(10 + i)] for i, d in enumerate(DOMAINS)}

    class Route:  # what the loss table reads of a route
        weights = {"chat": 1.0}

    table, per_example = evaluate_val_losses(stacks, examples, {d: [Route()] for d in DOMAINS}, bf16=False,
                                             progress=False, oracle_config=cfg)
    for d in DOMAINS:
        row = table[d]
        assert row["oracle_cross_fitted"] == pytest.approx(row["ungated"], rel=1e-6)
        assert row["recovered_cross_fitted"] is None  # ungated is not worse: nothing to recover
        assert per_example[d][0]["oracle_cross_fitted"] == pytest.approx(row["ungated"], rel=1e-6)
