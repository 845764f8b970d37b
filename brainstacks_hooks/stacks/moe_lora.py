"""MoE-LoRA for one projection (paper section 3.1); the grouped compute of frozen stacks is in :mod:`.frozen_pool`.

Shapes: T tokens, ``d_in``/``d_out`` the projection's features, E experts of rank r, K active experts.

The expert computation never materialises a [T, E, d_out] tensor. Because the gates are per token and
per expert, the gated sum over experts equals one rank-(E*r) LoRA whose middle activations are scaled by
the gates::

    mid   = x @ A_flat^T                  # [T, E*r]
    mid   = mid * repeat(gates, r) * s    # [T, E*r]   (zero for the E-K unused experts)
    delta = mid @ B_flat                  # [T, d_out]

so a MoE-LoRA step costs about the same as a rank-64 LoRA (``benchmarks/bench_moe_vs_lora.py``).
The router (and noise) weights are concatenated with A, so x is read once per projection.

Load-balance loss (paper section 3.1, eq. 7, the "standard auxiliary loss" of Switch Transformers)::

    L_aux = E * sum_i f_i * P_i          L = L_task + alpha * L_aux,   alpha = 0.01

with f_i the fraction of the T tokens dispatched to expert i (each token goes to K experts, so
``sum_i f_i = K``) and P_i the mean router probability of expert i (full softmax of the noisy logits,
so ``sum_i P_i = 1``). Uniform routing gives ``L_aux = E * E * (K/E) * (1/E) = K``; a router that sends
every token to the same K experts with all the probability on them gives up to ``E``. Each projection
computes its own term and injects ``alpha * L_aux`` into backward (:class:`AuxLossInjector`).

**Combination over projections: the sum.** A stack has one router per projection (210 for SmolLM2:
7 per layer x 30 layers), and the objective adds ``alpha * L_aux`` of *every* projection::

    L = L_task + alpha * sum_{p in projections} L_aux(p)

Section 3 of the paper defines eq. 7 for one MoELoRADelta and does not say how the terms are combined;
section 4.1 does: it reports a MoE-LoRA *train* loss of 7.444 against 0.932 for a single LoRA at equal
validation loss and attributes the gap to the aux term with coefficient 0.01 added in ``compute_loss``.
On TinyLlama (22 layers x 7 = 154 projections, K = 2, E = 4) the sum adds 0.01 * 154 * [2, 4] = 3.1 to
6.2, the order of the reported gap of 6.5; a mean over projections would add 0.02 to 0.04, which cannot
produce it. The reference implementation also sums. Because each router only appears in its own term,
the sum gives every router the gradient ``alpha * dL_aux(p)``, whatever the number of projections (a
mean would divide it by 210). Even perfect balance adds ``alpha * n_projections * K`` (4.2 for SmolLM2
with K = 2), a near-constant offset; the trainer logs the added value beside the task loss, and the mean
per-projection L_aux for reading the balance, see :mod:`brainstacks_hooks.training.trainer` and
``docs/DESIGN_NOTES.md``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import StackConfig
from .null_space import project_out_weight


class AuxLossInjector(torch.autograd.Function):
    """Identity on ``out`` whose backward also sends ``grad_scale`` into ``aux``.

    This adds ``aux`` to the training loss without a side channel: the gradient reaches the router even
    under reentrant gradient checkpointing, where a loss collected in a list during the (no-grad)
    forward would silently have no ``grad_fn`` (see ``shared/research/unsloth_hooks.md`` section 3).
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, grad_scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(aux)
        ctx.grad_scale = grad_scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (aux,) = ctx.saved_tensors
        return grad_out, torch.full_like(aux, ctx.grad_scale), None


def top_k_gates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse softmax over the top-k logits of the last dimension.

    Args:
        logits: [..., E] router logits.
    Returns:
        gates [..., E] with exactly k non-zero entries summing to 1 (others exactly 0), and the
        top-k indices [..., k].
    """
    top_vals, top_idx = logits.topk(k, dim=-1)  # [..., k]
    gates = torch.zeros_like(logits).scatter(-1, top_idx, torch.softmax(top_vals, dim=-1))
    return gates, top_idx


def dispatch_fractions(top_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """f_i of paper eq. 7: the fraction of tokens dispatched to expert i.

    Args:
        top_idx: [T, K] chosen experts of each token.
    Returns:
        [E] float32; each of the T tokens counts once for each of its K experts, so the entries sum to K.
    """
    counts = torch.bincount(top_idx.reshape(-1), minlength=num_experts).float()  # [E]
    return counts / max(top_idx.shape[0], 1)


def load_balance_loss(logits: torch.Tensor, top_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Paper eq. 7 for one projection, without its coefficient: ``L_aux = E * sum_i f_i * P_i``.

    Differentiable through P (f is a count). See the module docstring for the coefficient and for how the
    per-projection terms are combined (summed).

    Args:
        logits: [T, E] (noisy) router logits; P_i is the mean over tokens of their softmax.
        top_idx: [T, K] chosen experts; f_i is :func:`dispatch_fractions` (``sum_i f_i = K``).
    Returns:
        Scalar: K under uniform routing (f_i = K/E, P_i = 1/E), at most E (all tokens on the same K experts
        with all the probability).
    """
    probs = torch.softmax(logits.float(), dim=-1).mean(0)  # [E], sums to 1
    frac = dispatch_fractions(top_idx, num_experts).to(probs.device)  # [E], sums to K
    return num_experts * (probs * frac).sum()


class MoELoRA(nn.Module):
    """Mixture of E rsLoRA experts with a Shazeer noisy top-k router, for one projection.

    Parameters (paper names in brackets):
        A [E, r, d_in]: expert down projections, Kaiming-uniform.
        B [E, d_out, r]: expert up projections, zeros, so a new module is an exact zero delta.
        router [E, d_in]: router linear, N(0, 0.02).
        noise [E, d_in]: noise linear (softplus gives the noise std), zeros.
    """

    def __init__(self, in_features: int, out_features: int, config: StackConfig, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        E, r = config.num_experts, config.rank
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.rank, self.top_k = E, r, config.top_k
        self.scale = config.scale
        self.router_noise = config.router_noise
        kw = {"dtype": dtype or torch.float32, "device": device}
        self.A = nn.Parameter(torch.empty(E, r, in_features, **kw))
        self.B = nn.Parameter(torch.zeros(E, out_features, r, **kw))
        self.router = nn.Parameter(torch.empty(E, in_features, **kw))
        self.noise = nn.Parameter(torch.zeros(E, in_features, **kw))
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform(a=sqrt(5)) on a [r, d_in] matrix
        with torch.no_grad():
            self.A.uniform_(-bound, bound)
            self.router.normal_(0.0, config.router_init_std)
        self.last_aux: torch.Tensor | None = None  # detached, for logging
        self.expert_counts: torch.Tensor | None = None  # filled while utilisation tracking is on

    def in_weight(self, with_noise: bool) -> torch.Tensor:
        """[E*r + E (+E), d_in]: A, router (and noise) rows stacked so x is multiplied once."""
        parts = [self.A.reshape(-1, self.in_features), self.router]
        if with_noise:
            parts.append(self.noise)
        return torch.cat(parts, dim=0)

    def out_weight(self) -> torch.Tensor:
        """[E*r, d_out]: B laid out so that ``mid @ out_weight`` sums the experts."""
        return self.B.transpose(1, 2).reshape(-1, self.out_features)

    def forward(self, x: torch.Tensor, aux_coef: float = 0.0, aux_grad_scale: float = 1.0,
                track: bool = False, null_basis: torch.Tensor | None = None) -> torch.Tensor:
        """Delta for ``x`` [T, d_in] -> [T, d_out].

        In training mode with ``router_noise`` the logits get input-dependent Gaussian noise. In training
        mode with ``aux_coef > 0`` (alpha), ``aux_coef * load_balance_loss`` (alpha * eq. 7 of this
        projection) enters the backward pass through :class:`AuxLossInjector`, its gradient multiplied by
        ``aux_grad_scale`` (1 / gradient-accumulation steps); the value itself (detached, without that scale) is
        kept in ``last_aux`` for logging (the stack's total is the sum over projections). ``null_basis`` V
        [d_out, k] projects the delta out of span(V) (through the up-projection weight, see
        :func:`~.null_space.project_out_weight`).
        """
        E, r = self.num_experts, self.rank
        noisy = self.training and self.router_noise
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.A.dtype)
        h = x @ self.in_weight(noisy).t()  # [T, E*r + E (+E)]
        mid, logits = h[:, : E * r], h[:, E * r : E * r + E]  # [T, E*r], [T, E]
        if noisy:
            noise_std = F.softplus(h[:, E * r + E :])  # [T, E]
            logits = logits + torch.randn_like(logits) * noise_std
        gates, top_idx = top_k_gates(logits, self.top_k)  # [T, E], [T, K]
        mid = (mid.view(-1, E, r) * (gates * self.scale).unsqueeze(-1).to(mid.dtype)).reshape(-1, E * r)
        out_w = self.out_weight()  # [E*r, d_out]
        if null_basis is not None:
            out_w = project_out_weight(out_w, null_basis)  # rows orthogonal to span(V): delta is too
        delta = mid @ out_w.to(mid.dtype)  # [T, d_out]
        if track:
            self._count(top_idx)
        if aux_coef > 0 and self.training:
            aux = aux_coef * load_balance_loss(logits, top_idx, E)
            self.last_aux = aux.detach()
            if torch.is_grad_enabled() and aux.requires_grad:
                delta = AuxLossInjector.apply(delta, aux, aux_grad_scale)
        return delta

    def _count(self, top_idx: torch.Tensor) -> None:
        counts = torch.bincount(top_idx.reshape(-1), minlength=self.num_experts).cpu()
        self.expert_counts = counts if self.expert_counts is None else self.expert_counts + counts
