"""Hook attachment: identity at birth, one hook per projection, frozen is frozen, detach, bypass guard."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brainstacks_hooks import BrainStacks, StackBypassed, StackConfig, StackStateError
from brainstacks_hooks.testing import add_random_stack, logits


def test_identity_at_birth(tiny_llama, tiny_batch):
    before = logits(tiny_llama, tiny_batch)
    stacks = BrainStacks.attach(tiny_llama, StackConfig())
    stacks.new_stack("chat")
    assert torch.equal(logits(tiny_llama, tiny_batch), before)
    tiny_llama.train()  # noise on, still an exact zero delta
    with torch.no_grad():
        out = tiny_llama(input_ids=tiny_batch["input_ids"]).logits
    assert torch.equal(out, before)


def test_one_hook_per_projection_whatever_the_number_of_stacks(tiny_llama):
    stacks = BrainStacks.attach(tiny_llama)
    assert len(stacks.targets) == 2 * 7
    add_random_stack(stacks, "a", 10, b_scale=0.05, router_scale=1.0, rounds=2)
    add_random_stack(stacks, "b", 20, b_scale=0.05, router_scale=1.0)
    stacks.new_stack("c")
    for module in stacks.targets.values():
        assert len(module._forward_hooks) == 1
    assert {type(m) for m in stacks.targets.values()} == {nn.Linear}  # modules are not replaced


def test_attach_freezes_base_and_refuses_second_attach(tiny_llama):
    stacks = BrainStacks.attach(tiny_llama)
    assert all(not p.requires_grad for n, p in tiny_llama.named_parameters() if "brainstacks" not in n)
    with pytest.raises(StackStateError, match="already has stacks attached"):
        BrainStacks.attach(tiny_llama)
    stacks.new_stack("a")
    with pytest.raises(StackStateError, match=r"an active stack \('a'\) exists"):
        stacks.new_stack("b")
    assert len(stacks.trainable_parameters()) == 14 * 4


def test_submodules_reached_by_state_dict_and_train(tiny_llama):
    stacks = BrainStacks.attach(tiny_llama)
    add_random_stack(stacks, "a", 10, b_scale=0.05, router_scale=1.0)
    stacks.new_stack("b")
    keys = tiny_llama.state_dict().keys()
    assert any(k.startswith("brainstacks.frozen.0.") for k in keys)
    assert any(k.startswith("brainstacks.active.") for k in keys)
    tiny_llama.train()
    assert stacks.active.training and not stacks.frozen_stacks[0].training  # frozen stays in eval


def test_frozen_stacks_bit_identical_after_training_a_later_stack(tiny_llama, tiny_batch):
    stacks = BrainStacks.attach(tiny_llama)
    add_random_stack(stacks, "a", 10, b_scale=0.05, router_scale=1.0)
    snapshot = {k: v.clone() for k, v in stacks.frozen_stacks[0].tensors().items()}
    stacks.new_stack("b")
    tiny_llama.train()
    opt = torch.optim.AdamW(stacks.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        loss = tiny_llama(**tiny_batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert stacks.active.module_for("layers.0.q_proj").B.abs().sum() > 0  # the later stack did train
    for k, v in stacks.frozen_stacks[0].tensors().items():
        assert torch.equal(v, snapshot[k]), k


def test_frozen_stacks_add_up(tiny_llama, tiny_batch):
    base = logits(tiny_llama, tiny_batch)
    stacks = BrainStacks.attach(tiny_llama, StackConfig(group_frozen=False))
    add_random_stack(stacks, "a", 10, b_scale=0.05, router_scale=1.0)
    add_random_stack(stacks, "b", 20, b_scale=0.05, router_scale=1.0)
    captured = {}
    with stacks.ungated(), stacks.collect_frozen_deltas(lambda k, d: captured.__setitem__(k, d.clone())):
        logits(tiny_llama, tiny_batch)
    per = []
    for dom in ("a", "b"):
        got = {}
        with stacks.isolated(dom), stacks.collect_frozen_deltas(lambda k, d, got=got: got.__setitem__(k, d.clone())):
            logits(tiny_llama, tiny_batch)
        per.append(got)
    # first projection sees the same input in every mode, so deltas must add exactly up to rounding
    key = "layers.0.q_proj"
    torch.testing.assert_close(captured[key], per[0][key] + per[1][key], rtol=1e-5, atol=1e-6)
    with stacks.base_only():
        assert torch.equal(logits(tiny_llama, tiny_batch), base)


def test_grouped_and_sequential_frozen_compute_agree(tiny_llama, tiny_batch):
    twin = copy.deepcopy(tiny_llama)
    a = BrainStacks.attach(tiny_llama, StackConfig(group_frozen=True))
    b = BrainStacks.attach(twin, StackConfig(group_frozen=False))
    for s in (a, b):
        add_random_stack(s, "x", 30, b_scale=0.05, router_scale=1.0, rounds=2)
        add_random_stack(s, "y", 40, b_scale=0.05, router_scale=1.0)
    with a.routed({"x": 0.7, "y": 0.3}), b.routed({"x": 0.7, "y": 0.3}):
        torch.testing.assert_close(logits(tiny_llama, tiny_batch), logits(twin, tiny_batch), rtol=1e-4, atol=1e-5)


def test_detach_restores_model_exactly(tiny_llama, tiny_batch):
    keys = set(tiny_llama.state_dict())
    before = logits(tiny_llama, tiny_batch)
    stacks = BrainStacks.attach(tiny_llama)
    add_random_stack(stacks, "a", 10, b_scale=0.05, router_scale=1.0)
    add_random_stack(stacks, "b", 5, b_scale=0.05, router_scale=1.0, freeze=False)
    assert not torch.equal(logits(tiny_llama, tiny_batch), before)
    stacks.detach()
    assert set(tiny_llama.state_dict()) == keys
    assert torch.equal(logits(tiny_llama, tiny_batch), before)
    assert all(len(m._forward_hooks) == 0 for m in tiny_llama.modules())
    BrainStacks.attach(tiny_llama)  # attachable again


class _Cfg:
    def to_dict(self):
        return {"model_type": "toy", "hidden_size": 8}


class _Attn(nn.Module):
    def __init__(self, bypass: bool):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.bypass = bypass

    def forward(self, x):
        # a fused kernel reads the weight directly instead of calling the module (hooks never run)
        return F.linear(x, self.q_proj.weight, self.q_proj.bias) if self.bypass else self.q_proj(x)


class _Layer(nn.Module):
    def __init__(self, bypass: bool):
        super().__init__()
        self.self_attn = _Attn(bypass)

    def forward(self, x):
        return x + self.self_attn(x)


class _ToyModel(nn.Module):
    def __init__(self, bypass_layer: int | None):
        super().__init__()
        self.config = _Cfg()
        self.layers = nn.ModuleList([_Layer(i == bypass_layer) for i in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_bypass_guard_fires_when_a_kernel_reads_weights_directly():
    model = _ToyModel(bypass_layer=1)
    stacks = BrainStacks.attach(model, StackConfig(target_modules=("q_proj",), rank=2))
    x = torch.randn(3, 8)
    model(x)  # no stack yet: nothing to lose, no error
    stacks.new_stack("a")
    with pytest.raises(StackBypassed, match=r"layers\.1\.q_proj"):
        model(x)
    with stacks.base_only():
        model(x)  # base only: stacks would not run anyway


def test_bypass_guard_quiet_when_hooks_fire():
    model = _ToyModel(bypass_layer=None)
    stacks = BrainStacks.attach(model, StackConfig(target_modules=("q_proj",), rank=2))
    x = torch.randn(3, 8)
    base = model(x)
    add_random_stack(stacks, "a", 0, freeze=False)  # random B: the active stack changes the output
    calls = dict.fromkeys(stacks.keys, 0)
    for key, module in stacks.targets.items():
        module.register_forward_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
    assert stacks.check_bypass and not stacks.plan.empty  # the guard is armed and has something to guard
    out = model(x)  # every projection's hook fires: no StackBypassed
    assert len(calls) == 2 and all(c == 1 for c in calls.values()), calls
    assert not torch.allclose(out, base)  # and the stack's delta reached the output


def test_expert_utilisation_statistics(tiny_llama, tiny_batch):
    stacks = BrainStacks.attach(tiny_llama)
    add_random_stack(stacks, "a", 10, b_scale=0.05, router_scale=1.0)
    stacks.new_stack("b")
    with stacks.track_expert_utilization() as usage:
        logits(tiny_llama, tiny_batch)
    assert set(usage) == {"a/r0", "b/r0/active"}
    shares = usage["a/r0"]["layers.0.q_proj"]
    assert len(shares) == 4 and abs(sum(shares) - 1.0) < 1e-6
    with stacks.track_expert_utilization() as usage2:
        pass
    assert usage2 == {}
