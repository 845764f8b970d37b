"""Modes: prefix, isolated, ungated, routed by name, base only, reference; aux loss under checkpointing."""

from __future__ import annotations

import pytest
import torch

from brainstacks_hooks import BrainStacks, ConfigError, Mode, StackConfig
from brainstacks_hooks.stacks.serialization import load_stack
from brainstacks_hooks.testing import add_random_stack, logits, make_tiny_llama


def _three_domains(model):
    stacks = BrainStacks.attach(model)
    add_random_stack(stacks, "chat", 10, b_scale=0.05, router_scale=1.0, rounds=2)
    add_random_stack(stacks, "code", 20, b_scale=0.05, router_scale=1.0)
    add_random_stack(stacks, "math", 30, b_scale=0.05, router_scale=1.0)
    return stacks


def test_prefix_isolated_ungated_select_the_right_stacks(tiny_llama, tiny_batch):
    stacks = _three_domains(tiny_llama)
    sel = lambda: [(s.domain, s.round_index) for s in stacks.plan.frozen]  # noqa: E731
    with stacks.prefix("code"):
        assert sel() == [("chat", 0), ("chat", 1), ("code", 0)]
    with stacks.isolated("chat"):
        assert sel() == [("chat", 0), ("chat", 1)]
    with stacks.ungated():
        assert len(sel()) == 4
    with stacks.base_only():
        assert sel() == []
    with stacks.routed({"math": 0.5, "chat": 0.0}):
        assert sel() == [("math", 0)] and stacks.plan.weights == [0.5]
    with pytest.raises(ConfigError, match=r"unknown domain 'legal'.*known domains: chat, code, math"):
        stacks.set_mode("prefix", "legal")
    with pytest.raises(ConfigError, match=r"unknown domains \['legal'\]"):
        stacks.set_mode(Mode.routed({"legal": 1.0}))


def test_mode_context_restores_previous_mode(tiny_llama):
    stacks = _three_domains(tiny_llama)
    stacks.set_mode("isolated", "code")
    with stacks.ungated():
        assert stacks.mode.kind == "ungated"
    assert stacks.mode == Mode("isolated", "code")
    assert Mode.parse("prefix:chat") == Mode("prefix", "chat") and Mode.parse("base").kind == "base_only"


def test_active_stack_only_in_train_mode(tiny_llama, tiny_batch):
    stacks = _three_domains(tiny_llama)
    with stacks.ungated():
        ungated = logits(tiny_llama, tiny_batch)
    add_random_stack(stacks, "med", 9, b_scale=0.05, router_scale=1.0, freeze=False)
    with stacks.reference():
        assert torch.equal(logits(tiny_llama, tiny_batch), ungated)
    with stacks.train_mode():
        assert not torch.equal(logits(tiny_llama, tiny_batch), ungated)


def test_routed_weights_reach_the_right_domain_whatever_the_load_order(tmp_path, tiny_batch):
    model = make_tiny_llama()
    stacks = _three_domains(model)
    paths = [stacks.save_stack(s, tmp_path / f"{i}.safetensors") and tmp_path / f"{i}.safetensors"
             for i, s in enumerate(stacks.frozen_stacks)]
    weights = {"chat": 0.3, "code": 0.0, "math": 1.0}
    with stacks.routed(weights):
        expected = logits(model, tiny_batch)
    with stacks.routed({"code": 1.0}):
        only_code = logits(model, tiny_batch)
    with stacks.isolated("code"):
        assert torch.equal(logits(model, tiny_batch), only_code)

    other = make_tiny_llama()
    reloaded = BrainStacks.attach(other)
    for p in reversed(paths):  # math, code, chat, chat: the opposite order
        reloaded.add_frozen(load_stack(p, reloaded.shapes, reloaded.fingerprint, reloaded.config))
    assert reloaded.domains == ["math", "code", "chat"]
    with reloaded.routed(weights):
        torch.testing.assert_close(logits(other, tiny_batch), expected, rtol=1e-5, atol=1e-5)
    with reloaded.routed({"code": 1.0}):
        torch.testing.assert_close(logits(other, tiny_batch), only_code, rtol=1e-5, atol=1e-5)


def test_routed_weight_scales_the_domain_delta(tiny_llama, tiny_batch):
    stacks = BrainStacks.attach(tiny_llama, StackConfig(target_modules=("q_proj",)))
    add_random_stack(stacks, "a", 10, b_scale=0.05, router_scale=1.0)
    got = {}
    for w in (1.0, 0.25):
        with stacks.routed({"a": w}), stacks.collect_frozen_deltas(lambda k, d, w=w: got.setdefault((k, w), d)):
            logits(tiny_llama, tiny_batch)
    torch.testing.assert_close(got[("layers.0.q_proj", 0.25)], 0.25 * got[("layers.0.q_proj", 1.0)])


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non_reentrant"])
def test_aux_loss_gradient_reaches_router_under_checkpointing(checkpointing, tiny_batch):
    model = make_tiny_llama()
    stacks = BrainStacks.attach(model)
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
        model.enable_input_require_grads()
    stacks.new_stack("a")  # B = 0: the task loss gives the router no gradient, only the aux loss can
    model.train()
    torch.manual_seed(0)
    model(**tiny_batch).loss.backward()
    router = stacks.active.module_for("layers.1.down_proj").router
    assert router.grad is not None and router.grad.abs().sum() > 0
    assert stacks.aux_loss().item() > 0


def test_aux_gradient_identical_with_and_without_reentrant_checkpointing(tiny_batch):
    grads = []
    for ckpt in (False, True):
        model = make_tiny_llama()
        stacks = BrainStacks.attach(model)
        if ckpt:
            model.gradient_checkpointing_enable({"use_reentrant": True})
            model.enable_input_require_grads()
        torch.manual_seed(3)
        add_random_stack(stacks, "a", 4, b_scale=0.05, router_scale=1.0, freeze=False)
        model.train()
        torch.manual_seed(0)
        model(**tiny_batch).loss.backward()
        grads.append(torch.cat([m.router.grad.flatten() for _, m in stacks.active.items()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_aux_gradient_follows_the_fp16_loss_scale(tiny_batch):
    """Under a GradScaler the task loss is multiplied by S before backward and every gradient divided by S after
    it: the injected aux gradient must be scaled by S too (aux_gradient_scale), or it shrinks by S."""
    from types import SimpleNamespace

    from brainstacks_hooks.training.trainer import aux_gradient_scale

    def router_grads(scaler, follow_scale=True):
        model = make_tiny_llama()
        stacks = BrainStacks.attach(model)
        torch.manual_seed(3)
        add_random_stack(stacks, "a", 4, b_scale=0.05, router_scale=1.0, freeze=False)
        trainer = SimpleNamespace(args=SimpleNamespace(gradient_accumulation_steps=2),
                                  accelerator=SimpleNamespace(scaler=scaler))
        stacks.aux_grad_scale = aux_gradient_scale(trainer) if follow_scale else 0.5
        opt = torch.optim.SGD(stacks.trainable_parameters(), lr=0.0)
        model.train()
        torch.manual_seed(0)
        loss = model(**tiny_batch).loss / 2  # one of two micro-batches
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        return torch.cat([m.router.grad.flatten() for _, m in stacks.active.items()])

    reference = router_grads(None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    assert aux_gradient_scale(SimpleNamespace(args=SimpleNamespace(gradient_accumulation_steps=2),
                                              accelerator=SimpleNamespace(scaler=scaler))) == 2.0 ** 11
    torch.testing.assert_close(router_grads(scaler), reference, rtol=1e-4, atol=1e-7)
    # the constant alone (the old behaviour) loses the aux term by the scale factor after unscaling
    stale = router_grads(torch.amp.GradScaler("cpu", init_scale=2.0 ** 12), follow_scale=False)
    assert not torch.allclose(stale, reference, rtol=1e-2, atol=1e-6)
