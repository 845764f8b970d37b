"""MoE-LoRA module: gates, noise, scale, the load-balance loss (paper eq. 7) and its gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from brainstacks_hooks import BrainStacks, ConfigError, StackConfig
from brainstacks_hooks.stacks.moe_lora import MoELoRA, dispatch_fractions, load_balance_loss, top_k_gates
from brainstacks_hooks.testing import make_tiny_llama, tiny_batch


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


@pytest.mark.parametrize(("bad", "match"), [(dict(top_k=5, num_experts=4), "top_k=5"), (dict(top_k=0), "top_k=0"),
                                            (dict(rank=0), "rank must be >= 1"), (dict(frozen_dtype="int8"), "int8")])
def test_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
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


def _balanced_top_k(tokens: int, E: int, K: int) -> torch.Tensor:
    """[T, K] indices: token t takes experts tK, ..., tK + K - 1 (mod E), so every expert gets T*K/E tokens."""
    return torch.tensor([[(t * K + j) % E for j in range(K)] for t in range(tokens)])


@pytest.mark.parametrize(("E", "K"), [(4, 2), (4, 1), (8, 3), (6, 6)])
def test_load_balance_loss_is_eq7_under_uniform_routing(E, K):
    T = 5 * E
    logits = torch.zeros(T, E)  # P_i = 1/E
    idx = _balanced_top_k(T, E, K)
    f = dispatch_fractions(idx, E)
    torch.testing.assert_close(f, torch.full((E,), K / E))  # f_i = K/E
    by_hand = E * sum((K / E) * (1 / E) for _ in range(E))  # eq. 7: E * sum_i f_i * P_i
    assert by_hand == pytest.approx(K)
    assert load_balance_loss(logits, idx, E).item() == pytest.approx(by_hand)
    # with the coefficient, one projection's term is 0.01 * K (0.02 for the paper's top-2 of 4)
    assert (0.01 * load_balance_loss(logits, idx, E)).item() == pytest.approx(0.01 * K)


@pytest.mark.parametrize(("E", "K"), [(4, 2), (6, 3), (5, 1)])
def test_dispatch_fractions_sum_to_k(E, K):
    torch.manual_seed(E * 10 + K)
    _, idx = top_k_gates(torch.randn(37, E), K)
    f = dispatch_fractions(idx, E)
    assert f.sum().item() == pytest.approx(K)
    direct = torch.tensor([(idx == i).any(-1).float().mean().item() for i in range(E)])
    torch.testing.assert_close(f, direct)  # f_i: the fraction of tokens that expert i receives


def test_load_balance_loss_range_and_gradient():
    logits = torch.zeros(8, 4, requires_grad=True)
    idx = torch.tensor([[0, 1], [2, 3]] * 4)
    aux = load_balance_loss(logits, idx, 4)
    assert aux.item() == pytest.approx(2.0)  # perfect balance: K
    aux.backward()
    assert logits.grad is not None
    # every token on experts 0 and 1, all the probability on them: E
    collapsed = load_balance_loss(torch.tensor([[20.0, 20.0, 0, 0]] * 8), torch.tensor([[0, 1]] * 8), 4)
    assert collapsed.item() == pytest.approx(4.0, rel=1e-6)


def test_aux_loss_gradient_reaches_router_weights():
    m, x = _module(), torch.randn(32, 16)
    with torch.no_grad():
        m.B.zero_()  # task gradient to the router is zero: only the aux loss can move it
    m.train()
    out = m(x, aux_coef=0.01)
    out.sum().backward()
    assert m.router.grad is not None and m.router.grad.abs().sum() > 0
    assert m.last_aux is not None and m.last_aux.item() > 0


def test_logged_aux_is_the_value_injected_in_backward():
    """``last_aux`` (what the trainer logs) is alpha * eq. 7, and the injected gradient is its gradient."""
    m, x = _module(), torch.randn(32, 16)
    m.train()
    coef, scale, E, r = 0.01, 0.25, m.num_experts, m.rank
    torch.manual_seed(5)
    out = m(x, aux_coef=coef, aux_grad_scale=scale)
    (out * 0).sum().backward()  # no task gradient: the router and noise gradients are the injected aux only
    injected = {"router": m.router.grad.clone(), "noise": m.noise.grad.clone()}
    m.zero_grad()
    torch.manual_seed(5)  # the same forward by hand, same noise, the aux on the ordinary autograd path
    h = x @ m.in_weight(True).t()
    logits = h[:, E * r : E * r + E] + torch.randn(32, E) * F.softplus(h[:, E * r + E :])
    _, idx = top_k_gates(logits, m.top_k)
    explicit = coef * load_balance_loss(logits, idx, E)
    (scale * explicit).backward()
    assert m.last_aux.item() == pytest.approx(explicit.item(), rel=1e-6)
    assert injected["router"].abs().sum() > 0
    torch.testing.assert_close(injected["router"], m.router.grad)
    torch.testing.assert_close(injected["noise"], m.noise.grad)


def test_stack_aux_is_the_sum_over_projections_of_the_injected_terms():
    """Through the model: the logged total is alpha * sum_p L_aux(p), and its gradient is what reached the routers."""
    model, batch = make_tiny_llama(), tiny_batch()
    stacks = BrainStacks.attach(model, StackConfig(router_noise=False))  # deterministic routing
    stacks.new_stack("a")  # B = 0: the task loss gives the routers no gradient
    inputs = {}
    for key, module in stacks.targets.items():
        module.register_forward_pre_hook(lambda _, args, key=key: inputs.__setitem__(key, args[0].detach()))
    model.train()
    model(**batch).loss.backward()
    routers = {k: m.router for k, m in stacks.active.items()}
    injected = {k: p.grad.clone() for k, p in routers.items()}
    for p in routers.values():
        p.grad = None
    terms = []
    for key, m in stacks.active.items():
        x = inputs[key].reshape(-1, m.in_features)
        logits = x @ m.router.t()
        idx = top_k_gates(logits, m.top_k)[1]
        terms.append(stacks.config.aux_loss_coef * load_balance_loss(logits, idx, m.num_experts))
    explicit = torch.stack(terms).sum()
    explicit.backward()
    assert len(terms) == 2 * 7
    assert stacks.aux_loss().item() == pytest.approx(explicit.item(), rel=1e-5)
    for k, p in routers.items():
        torch.testing.assert_close(injected[k], p.grad, msg=k)
