"""Null-space projection: projected deltas and folded frozen stacks are orthogonal to V."""

from __future__ import annotations

import torch

from brainstacks_hooks import BrainStacks
from brainstacks_hooks.stacks.null_space import fold_into_b, merge_bases, project_out, top_directions
from brainstacks_hooks.testing import add_random_stack, logits, make_tiny_llama


def _rel(delta, v):
    return ((delta.double() @ v.double()).norm() / delta.double().norm()).item()


def test_project_out_and_fold_are_orthogonal_to_v():
    v, _ = torch.linalg.qr(torch.randn(40, 6))
    delta = torch.randn(100, 40)
    assert _rel(project_out(delta, v), v) < 1e-5
    b = torch.randn(4, 40, 3)
    fold_into_b(b, v)
    assert (v.t() @ b).abs().max() < 1e-5


def test_top_directions_recovers_a_low_rank_subspace():
    basis, _ = torch.linalg.qr(torch.randn(64, 3))
    data = torch.randn(500, 3) @ basis.t()  # [500, 64] of rank 3
    v = top_directions(data, k=8)
    assert v.shape == (64, 3)  # numerically null directions dropped
    torch.testing.assert_close(v @ v.t(), basis @ basis.t(), atol=1e-4, rtol=1e-4)
    big = torch.randn(2000, 256)
    assert top_directions(big, k=16).shape == (256, 16)  # randomized path


def test_merge_bases_reorthonormalises_and_drops_duplicates():
    a, _ = torch.linalg.qr(torch.randn(30, 4))
    b, _ = torch.linalg.qr(torch.randn(30, 4))
    m = merge_bases([a, b, a[:, :2]])
    assert m.shape == (30, 8)
    torch.testing.assert_close(m.t() @ m, torch.eye(8), atol=1e-5, rtol=1e-5)


def _bases(stacks, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, (_, d_out) in stacks.shapes.items():
        out[key], _ = torch.linalg.qr(torch.randn(d_out, k, generator=g))
    return out


def test_active_delta_projected_and_frozen_stack_folded(tiny_llama, tiny_batch):
    stacks = BrainStacks.attach(tiny_llama)
    add_random_stack(stacks, "a", 10, b_scale=0.05, router_scale=1.0)
    bases = _bases(stacks)
    stacks.add_null_space_basis("a", bases)
    add_random_stack(stacks, "b", 7, b_scale=0.05, router_scale=1.0, freeze=False)
    # active delta in the training forward: train-mode delta minus the frozen part
    seen = {}
    key = "layers.1.gate_proj"
    module = stacks.targets[key]

    def grab(mod, args, out):
        seen["x"] = args[0].reshape(-1, args[0].shape[-1]).detach()

    h = module.register_forward_pre_hook(lambda mod, args: grab(mod, args, None))
    logits(tiny_llama, tiny_batch)
    h.remove()
    v = stacks.null_space[key]
    raw = stacks.active.module_for(key)(seen["x"])
    assert _rel(raw, v) > 1e-2  # unprojected delta does use the claimed directions
    assert _rel(project_out(raw, v), v) < 1e-5
    stacks.freeze_active()
    deltas = {}
    with stacks.isolated("b"), stacks.collect_frozen_deltas(lambda k, d: deltas.__setitem__(k, d)):
        logits(tiny_llama, tiny_batch)
    for k, d in deltas.items():
        assert _rel(d, stacks.null_space[k]) < 1e-5, k


def test_null_space_capacity_and_persistence(tiny_llama, tmp_path, tiny_batch):
    stacks = BrainStacks.attach(tiny_llama)
    add_random_stack(stacks, "a", 10, b_scale=0.05, router_scale=1.0)
    stacks.add_null_space_basis("a", _bases(stacks, k=4))
    cap = stacks.null_space_capacity()
    assert cap["layers.0.q_proj"] == 4 / 32 and cap["layers.0.k_proj"] == 4 / 16
    stacks.save(tmp_path)
    again = BrainStacks.load(make_tiny_llama(), tmp_path)
    for k, v in stacks.null_space.items():
        torch.testing.assert_close(again.null_space[k], v)


def test_weight_projection_equals_delta_projection_and_trains():
    """The hooks project the up-projection weight; that is the same delta as projecting the output."""
    from brainstacks_hooks.stacks.config import StackConfig
    from brainstacks_hooks.stacks.moe_lora import MoELoRA

    torch.manual_seed(0)
    m = MoELoRA(16, 24, StackConfig(router_noise=False))
    with torch.no_grad():
        m.B.normal_()
    v, _ = torch.linalg.qr(torch.randn(24, 5))
    x = torch.randn(30, 16)
    projected = m(x, null_basis=v)
    torch.testing.assert_close(projected, project_out(m(x), v), atol=1e-5, rtol=1e-5)
    assert _rel(projected, v) < 1e-5
    projected.pow(2).sum().backward()
    assert m.B.grad is not None and m.B.grad.abs().sum() > 0
    # The gradient of B has no component that would move the delta into span(V).
    g = m.B.grad.detach().clone()  # [E, d_out, r]
    assert (torch.einsum("ok,eor->ekr", v, g).norm() / g.norm()).item() < 1e-5
