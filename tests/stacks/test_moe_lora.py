"""MoE-LoRA module: gates, noise, scale, aux loss and its gradient."""

from __future__ import annotations

import pytest
import torch

from brainstacks_hooks import ConfigError, StackConfig
from brainstacks_hooks.stacks.moe_lora import MoELoRA, load_balance_loss, top_k_gates


def test_top_k_gates_exactly_k_nonzero_summing_to_one():
    logits = torch.randn(50, 6)
    gates, idx = top_k_gates(logits, 2)
    assert ((gates > 0).sum(-1) == 2).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(50))
    # the non-zero gates are exactly the two largest logits
    assert torch.equal(torch.sort(idx, -1).values, torch.sort(logits.topk(2, -1).indices, -1).values)


def test_scale_rslora_and_plain():
    assert StackConfig(rank=16, alpha=16).scale == pytest.approx(4.0)
    assert StackConfig(rank=16, alpha=16, use_rslora=False).scale == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [dict(top_k=5, num_experts=4), dict(top_k=0), dict(rank=0), dict(frozen_dtype="int8")])
def test_config_errors(bad):
    with pytest.raises(ConfigError):
        StackConfig(**bad)


def _module(seed=0, **cfg):
    torch.manual_seed(seed)
    m = MoELoRA(16, 24, StackConfig(**cfg))
    with torch.no_grad():
        m.B.normal_()
        m.noise.normal_()
    return m


def test_new_module_is_exact_zero_delta():
    m = MoELoRA(16, 24, StackConfig())
    m.train()
    assert torch.equal(m(torch.randn(7, 16)), torch.zeros(7, 24))


def test_no_noise_in_eval_mode_noise_in_train_mode():
    m, x = _module(), torch.randn(64, 16)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    b = m(x)
    assert not torch.equal(a, b)


def test_vectorised_compute_matches_per_expert_loop():
    m, x = _module(), torch.randn(10, 16)
    m.eval()
    logits = x @ m.router.t()
    gates, _ = top_k_gates(logits, m.top_k)
    ref = sum(gates[:, e : e + 1] * (x @ m.A[e].t() @ m.B[e].t()) * m.scale for e in range(m.num_experts))
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def test_load_balance_loss_range_and_gradient():
    logits = torch.zeros(8, 4, requires_grad=True)
    idx = torch.tensor([[0, 1], [2, 3]] * 4)
    aux = load_balance_loss(logits, idx, 4)
    assert aux.item() == pytest.approx(1.0)  # perfect balance
    aux.backward()
    assert logits.grad is not None
    collapsed = load_balance_loss(torch.tensor([[9.0, 0, 0, 0]] * 8), torch.tensor([[0, 1]] * 8), 4)
    assert collapsed.item() > 1.5


def test_aux_loss_gradient_reaches_router_weights():
    m, x = _module(), torch.randn(32, 16)
    with torch.no_grad():
        m.B.zero_()  # task gradient to the router is zero: only the aux loss can move it
    m.train()
    out = m(x, aux_coef=0.01)
    out.sum().backward()
    assert m.router.grad is not None and m.router.grad.abs().sum() > 0
    assert m.last_aux is not None and m.last_aux.item() > 0
