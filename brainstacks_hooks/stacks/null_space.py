"""Null-space projection (paper section 3.5), done with low-rank bases.

A basis V [d_out, k] has orthonormal columns spanning the output directions claimed by earlier
domains. The active stack's delta is projected as ``delta - (delta V) V^T``; since the delta is linear in
the expert up-projections, the hooks apply it to the weight instead (:func:`project_out_weight`, cost
independent of the token count, never a dense d_out x d_out matrix) and, at freeze time, the projection
is folded into every expert's B (``B <- B - V (V^T B)``) so the frozen stack honours it at evaluation and
inference too.
"""

from __future__ import annotations

import torch


def top_directions(deltas: torch.Tensor, k: int, oversample: int = 8, niter: int = 2) -> torch.Tensor:
    """Top-k right singular vectors of ``deltas`` [n, d_out] -> [d_out, k'] (orthonormal columns).

    Uses ``torch.svd_lowrank`` when k is small against the matrix, a full SVD otherwise. k' = min(k, rank).
    """
    deltas = deltas.float()
    n, d = deltas.shape
    k = min(k, n, d)
    if k <= 0:
        return deltas.new_zeros(d, 0)
    if 2 * (k + oversample) < min(n, d):
        _, s, v = torch.svd_lowrank(deltas, q=k + oversample, niter=niter)  # v [d, q]
        v, s = v[:, :k], s[:k]
    else:
        _, s, vh = torch.linalg.svd(deltas, full_matrices=False)
        v, s = vh[:k].t(), s[:k]
    keep = s > s.max().clamp_min(1e-30) * 1e-6  # drop numerically null directions
    return v[:, keep].contiguous()


def merge_bases(bases: list[torch.Tensor], max_rank: int | None = None) -> torch.Tensor:
    """Orthonormal basis [d_out, k_total] spanning all ``bases`` (re-orthonormalised with QR).

    Directions already spanned by an earlier basis are dropped, so k_total <= sum of the k's.
    """
    bases = [b.float() for b in bases if b.numel()]
    if not bases:
        raise ValueError("merge_bases needs at least one non-empty basis")
    m = torch.cat(bases, dim=1)  # [d_out, sum k]
    q, r = torch.linalg.qr(m)
    diag = r.diagonal().abs()
    keep = diag > diag.max().clamp_min(1e-30) * 1e-5
    q = q[:, keep]
    if max_rank is not None:
        q = q[:, :max_rank]
    return q.contiguous()


def project_out(delta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``delta - (delta V) V^T`` for ``delta`` [T, d_out] and V [d_out, k]."""
    v = v.to(delta.dtype)
    return delta - (delta @ v) @ v.t()  # [T, k] -> [T, d_out]


def project_out_weight(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``W - (W V) V^T`` for an output weight W [m, d_out] (rows map to outputs) and V [d_out, k].

    ``(x @ W)`` projected equals ``x @ project_out_weight(W, V)``, so projecting the weight gives the same
    delta as :func:`project_out` at a cost independent of the token count (m = E*r rows instead of T).
    Computed in fp32 with autocast off, so the projection stays exact to fp32 precision under bf16
    autocast; differentiable in W.
    """
    with torch.autocast(device_type=w.device.type, enabled=False):
        w32 = w.float()
        v32 = v.to(device=w.device, dtype=torch.float32)
        return w32 - (w32 @ v32) @ v32.t()  # [m, k] -> [m, d_out]


@torch.no_grad()
def fold_into_b(b: torch.Tensor, v: torch.Tensor) -> None:
    """In place ``B_e <- B_e - V (V^T B_e)`` for every expert: B [E, d_out, r], V [d_out, k]."""
    v32 = v.to(device=b.device, dtype=torch.float32)
    b32 = b.float()
    b32 = b32 - torch.einsum("ok,ekr->eor", v32, torch.einsum("ok,eor->ekr", v32, b32))  # [E, d_out, r]
    b.copy_(b32.to(b.dtype))
