"""Mixed-route batches: per-row domain weights reach the hooks, one forward equals each row under its route."""

from __future__ import annotations

import pytest
import torch

from brainstacks_hooks import BrainStacks
from brainstacks_hooks.errors import ConfigError, StackStateError
from brainstacks_hooks.stacks.config import StackConfig
from brainstacks_hooks.testing import add_random_stack, make_tiny_llama

ROUTES = [{"chat": 1.0}, {"code": 0.7, "math": 0.4}, {}, {"chat": 0.2, "code": 1.0, "math": 0.9}]


def _stacks(group_frozen: bool) -> BrainStacks:
    stacks = BrainStacks.attach(make_tiny_llama(), StackConfig(group_frozen=group_frozen))
    for i, d in enumerate(("chat", "code", "math")):
        add_random_stack(stacks, d, 10 * (i + 1), rounds=2)
    return stacks


@pytest.mark.parametrize("group_frozen", [True, False])
def test_a_mixed_batch_equals_each_row_alone_under_its_route(group_frozen):
    stacks = _stacks(group_frozen)
    model = stacks.model
    ids = torch.randint(0, 96, (len(ROUTES), 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), stacks.routed_rows(ROUTES):
        mixed = model(input_ids=ids).logits  # [B, S, V]
    for b, route in enumerate(ROUTES):
        with torch.no_grad(), stacks.routed(route):
            alone = model(input_ids=ids[b : b + 1]).logits[0]
        assert torch.allclose(mixed[b], alone, rtol=0, atol=1e-5), (b, (mixed[b] - alone).abs().max())
    with torch.no_grad(), stacks.routed(ROUTES[3]):  # the routes really differ
        other = model(input_ids=ids[:1]).logits[0]
    assert (other - mixed[0]).abs().max() > 1e-3


def test_mixed_routes_with_left_padding_and_generation():
    stacks = _stacks(True)
    model = stacks.model
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 96, (n,), generator=g) for n in (7, 4)]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, 7 - len(r):], mask[b, 7 - len(r):] = r, 1
    routes = ROUTES[:2]
    with torch.no_grad(), stacks.routed_rows(routes):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for b, (r, route) in enumerate(zip(rows, routes)):
        with torch.no_grad(), stacks.routed(route):
            alone = model.generate(input_ids=r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long),
                                   max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert out[b, 7:].tolist() == alone[0, len(r):].tolist()


def test_a_batch_of_the_wrong_size_and_unknown_domains_are_refused():
    stacks = _stacks(True)
    with stacks.routed_rows(ROUTES[:2]), pytest.raises(StackStateError, match="2 routes but the forward has 3"):
        stacks.model(input_ids=torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ConfigError, match="unknown domains"), stacks.routed_rows([{"nosuch": 1.0}]):
        pass
