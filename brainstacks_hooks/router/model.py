"""``MetaRouter``: a small network mapping base-model prompt features to one sigmoid score per domain.

Architecture (paper section 3.6; about 2.7M parameters for token_dim 3840 and 5 domains)::

    features [B, S, D] --standardise per dimension--> --Linear+LayerNorm--> tokens [B, S, H]
    global context:  learned query q_g [H] attends over tokens           -> [B, H]
    domain context:  learned queries Q_d [N, H] attend over tokens       -> [B, N, H]
    fusion MLP over [domain_ctx || global_ctx] (shared across domains)   -> [B, N, H]
    per-domain head w_d . fused_d + b_d, divided by a learned clamped temperature -> logits [B, N]

Domains are gated independently (sigmoid, not softmax), so several stacks can fire together. Unlike the
reference code, attention scores are scaled by ``1/sqrt(H)`` and padding positions are excluded exactly:
their attention weight is zero and their values are zeroed, so padding never changes the logits.

Three choices keep the domains apart (measured in ``docs/RESULTS.md``, "Why the router collapsed"): with
the reference design's small random queries (std 0.02) every domain query attends almost uniformly, so each
domain sees the same pooled vector, and a head shared across domains then gives every domain the same logit:
the router can only learn one strength per prompt. So the queries start at std ``query_init_std`` (1.0:
``q . k / sqrt(H)`` of unit variance, attention that differs per query from the first step), the head has
one weight vector and bias per domain (a domain's logit can differ even where contexts coincide), and the
input features are standardised per dimension with statistics of the training prompts (small models'
hidden states carry a few dimensions hundreds of times larger than the rest, which otherwise dominate the
projection); the statistics are buffers saved with the router.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


def masked_attention_pool(
    tokens: torch.Tensor, queries: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Scaled dot-product attention of learned queries over tokens, ignoring padding.

    Args:
        tokens: ``[B, S, H]`` projected tokens.
        queries: ``[Q, H]`` learned query vectors.
        attention_mask: ``[B, S]``, 1 (or True) on real tokens.

    Returns:
        ``[B, Q, H]`` attention-weighted sums of tokens. A row without any real token pools to zeros.
    """
    keep = attention_mask.bool()  # [B, S]
    tokens = tokens * keep.unsqueeze(-1).to(tokens.dtype)  # zero padded values: [B, S, H]
    scores = torch.einsum("bsh,qh->bqs", tokens, queries) / math.sqrt(tokens.shape[-1])  # [B, Q, S]
    scores = scores.masked_fill(~keep.unsqueeze(1), float("-inf"))
    weights = torch.softmax(scores, dim=-1)  # [B, Q, S]; exactly 0 on padding
    weights = torch.nan_to_num(weights, nan=0.0)  # all-padding rows (softmax of all -inf) pool to 0
    return torch.einsum("bqs,bsh->bqh", weights, tokens)  # [B, Q, H]


class MetaRouter(nn.Module):
    """Outcome-trained meta-router with independent sigmoid gates per domain.

    Args:
        token_dim (`int`): Width D of the input features (the base model's hidden size).
        domains (`list[str]`): Domain names; logit ``i`` scores ``domains[i]``.
        hidden (`int`): Router width H. Default: 512.
        dropout (`float`): Dropout in the fusion MLP. Default: 0.1.
        temp_clamp (`tuple[float, float]`): Range of the learned temperature. Default: (0.3, 3.0).
        query_init_std (`float`): Standard deviation of the initial global and domain queries. Default: 1.0.
        per_domain_head (`bool`): One output weight vector and bias per domain (``False``: the reference's
            head shared by all domains). Default: True.
    """

    def __init__(
        self,
        token_dim: int,
        domains: Sequence[str],
        hidden: int = 512,
        dropout: float = 0.1,
        temp_clamp: tuple[float, float] = (0.3, 3.0),
        query_init_std: float = 1.0,
        per_domain_head: bool = True,
    ) -> None:
        super().__init__()
        domains = list(domains)
        if not domains:
            raise ConfigError("MetaRouter needs at least one domain")
        if len(set(domains)) != len(domains):
            raise ConfigError(f"duplicate domain names: {domains}")
        if token_dim < 1 or hidden < 1:
            raise ConfigError(f"token_dim and hidden must be >= 1 (got {token_dim}, {hidden})")
        if not 0 < temp_clamp[0] <= temp_clamp[1]:
            raise ConfigError(f"temp_clamp must satisfy 0 < min <= max (got {temp_clamp})")
        self.domains = domains
        self.token_dim = int(token_dim)
        self.hidden = int(hidden)
        self.dropout_p = float(dropout)
        self.temp_clamp = (float(temp_clamp[0]), float(temp_clamp[1]))
        self.per_domain_head = bool(per_domain_head)
        n = len(domains)

        # per-dimension input standardisation (identity until fit_feature_norm sets it from training prompts)
        self.register_buffer("feature_mean", torch.zeros(token_dim))  # [D]
        self.register_buffer("feature_inv_std", torch.ones(token_dim))  # [D]
        self.token_proj = nn.Linear(token_dim, hidden)
        self.token_norm = nn.LayerNorm(hidden)
        self.global_query = nn.Parameter(torch.randn(hidden) * query_init_std)  # [H]
        self.global_norm = nn.LayerNorm(hidden)
        self.domain_queries = nn.Parameter(torch.randn(n, hidden) * query_init_std)  # [N, H]
        self.domain_norm = nn.LayerNorm(hidden)
        self.fusion = nn.Sequential(
            nn.Linear(2 * hidden, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.LayerNorm(hidden),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
        )
        if self.per_domain_head:
            bound = 1 / math.sqrt(hidden)  # nn.Linear's default initialisation, per domain
            self.head_weight = nn.Parameter(torch.empty(n, hidden).uniform_(-bound, bound))  # [N, H]
            self.head_bias = nn.Parameter(torch.empty(n).uniform_(-bound, bound))  # [N]
        else:
            self.head = nn.Linear(hidden, 1)
        self.log_temperature = nn.Parameter(torch.zeros(()))  # temperature exp(0) = 1 at init

    @property
    def n_domains(self) -> int:
        """Number of domains N."""
        return len(self.domains)

    @torch.no_grad()
    def fit_feature_norm(self, features: torch.Tensor, attention_mask: torch.Tensor, eps: float = 1e-5) -> None:
        """Set the input standardisation from training features: mean and std per dimension over real tokens.

        Args:
            features: ``[N, S, D]`` training features.
            attention_mask: ``[N, S]``, 1 on real tokens.
        """
        total = torch.zeros(features.shape[-1], dtype=torch.float64)  # [D]
        total_sq = torch.zeros_like(total)
        n = 0
        for start in range(0, features.shape[0], 64):  # chunks: features may be large and half precision
            keep = attention_mask[start : start + 64].bool()
            tokens = features[start : start + 64][keep].double().cpu()  # [t, D]
            total += tokens.sum(0)
            total_sq += (tokens * tokens).sum(0)
            n += tokens.shape[0]
        if n < 2:
            raise ValueError("fit_feature_norm needs at least two real tokens")
        mean = total / n
        std = ((total_sq - n * mean * mean).clamp_min(0) / (n - 1)).sqrt()
        self.feature_mean.copy_(mean.to(self.feature_mean))
        self.feature_inv_std.copy_((1.0 / (std + eps)).to(self.feature_inv_std))

    def temperature(self) -> torch.Tensor:
        """The logit temperature, ``exp(log_temperature)`` clamped to ``temp_clamp`` (a 0-d tensor)."""
        return self.log_temperature.exp().clamp(self.temp_clamp[0], self.temp_clamp[1])

    def forward(self, features: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Score every domain.

        Args:
            features: ``[B, S, D]`` base-model features (any float dtype; computed in the router's dtype).
            attention_mask: ``[B, S]``, 1 on real tokens and 0 on padding. ``None`` means no padding.

        Returns:
            ``[B, N]`` logits, one per domain (apply a sigmoid for independent probabilities).
        """
        if features.dim() != 3 or features.shape[-1] != self.token_dim:
            raise ValueError(f"features must be [B, S, {self.token_dim}], got {tuple(features.shape)}")
        B, S, _ = features.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.bool, device=features.device)
        elif attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask must be [{B}, {S}], got {tuple(attention_mask.shape)}")
        x = features.to(self.token_proj.weight.dtype)
        x = (x - self.feature_mean.to(x.dtype)) * self.feature_inv_std.to(x.dtype)  # [B, S, D] standardised
        tokens = self.token_norm(self.token_proj(x))  # [B, S, H]

        glob = masked_attention_pool(tokens, self.global_query.unsqueeze(0), attention_mask)  # [B, 1, H]
        glob = self.global_norm(glob)  # [B, 1, H]
        dom = self.domain_norm(
            masked_attention_pool(tokens, self.domain_queries, attention_mask)
        )  # [B, N, H]

        fused = torch.cat([dom, glob.expand(-1, self.n_domains, -1)], dim=-1)  # [B, N, 2H]
        fused = self.fusion(fused)  # [B, N, H]
        if self.per_domain_head:
            logits = (fused * self.head_weight).sum(-1) + self.head_bias  # [B, N]
        else:
            logits = self.head(fused).squeeze(-1)  # [B, N]
        return logits / self.temperature()

    @torch.no_grad()
    def predict(self, features: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Independent per-domain probabilities ``sigmoid(logits)`` ``[B, N]``, computed in eval mode.

        The module's train/eval mode is restored afterwards.
        """
        was_training = self.training
        self.eval()
        try:
            return torch.sigmoid(self.forward(features, attention_mask))
        finally:
            self.train(was_training)

    def predict_scores(
        self, features: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> list[dict[str, float]]:
        """Like :meth:`predict`, as one ``{domain: probability}`` dictionary per example."""
        probs = self.predict(features, attention_mask).float().cpu()  # [B, N]
        return [dict(zip(self.domains, row.tolist())) for row in probs]

    def loss(
        self, logits: torch.Tensor, targets: torch.Tensor, margin_coef: float, margin: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training loss: BCE-with-logits plus a confidence-margin penalty.

        ``penalty = margin_coef * mean(relu(margin - |sigmoid(logit) - 0.5|))`` pushes probabilities out
        of the undecided band ``(0.5 - margin, 0.5 + margin)``.

        Returns:
            ``(total, bce, penalty)`` scalars.
        """
        bce = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))
        confidence = (torch.sigmoid(logits) - 0.5).abs()  # [B, N]
        penalty = margin_coef * F.relu(margin - confidence).mean()
        return bce + penalty, bce, penalty
