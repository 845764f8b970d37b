"""Forgetting matrix rows: every mode's loss, with modes that compute the same function evaluated once."""

from __future__ import annotations

import torch

from brainstacks_hooks import BrainStacks, StackConfig
from brainstacks_hooks.loss import evaluate_loss
from brainstacks_hooks.training import forgetting


def _val(seed: int) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in (9, 12, 7):
        ids = torch.randint(3, 96, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * n, "labels": [-100] * 3 + ids[3:]})
    return rows


def test_forgetting_row_values_and_shared_evaluations(tiny_llama, add_random_stack, monkeypatch):
    stacks = BrainStacks.attach(tiny_llama, StackConfig(num_experts=2, rank=4))
    for i, d in enumerate(("chat", "code", "math")):
        add_random_stack(stacks, d, seed=i, b_scale=0.05)
    val = {d: _val(i) for i, d in enumerate(("chat", "code", "math"))}

    calls = []
    real = forgetting.evaluate_loss

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(forgetting, "evaluate_loss", counting)
    row = forgetting.forgetting_row(stacks, val, pad_token_id=0, batch_size=2)

    # Each value equals a direct evaluation in that mode.
    for d in ("chat", "code", "math"):
        for mode in ("prefix", "isolated", "ungated"):
            with stacks.using(mode, None if mode == "ungated" else d):
                assert row[d][mode] == evaluate_loss(tiny_llama, val[d], 0, 2)
    # chat: prefix == isolated; math (last): prefix == ungated; 9 mode cells, 7 distinct functions.
    assert len(calls) == 7
    assert row["chat"]["prefix"] == row["chat"]["isolated"]
    assert row["math"]["prefix"] == row["math"]["ungated"]
    assert row["code"]["prefix"] != row["code"]["isolated"]
