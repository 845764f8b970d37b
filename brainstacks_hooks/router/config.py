"""``RouterConfig`` and ``FeatureRecipe``: the meta-router's knobs (paper section 3.6 defaults).

The feature recipe (sequence length and layer weights) is part of the router's identity: it is stored in
the router checkpoint and the feature cache key, and inference rebuilds features with the stored recipe,
so router training and routing can never disagree on it (the reference code trained at 256 tokens and
routed at 96; ``shared/research/reference_impl.md`` section 6.1).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import ConfigError

#: Version of the feature recipe semantics; bump when :mod:`.features` changes what it computes.
FEATURE_RECIPE_VERSION = 1


@dataclass(frozen=True)
class FeatureRecipe:
    """How router features are computed from the base model (all stacks off).

    ``features = mid_weight * hidden_states[len(hidden_states) // 2] + last_weight * hidden_states[-1]``
    over the prompt rendered by :func:`brainstacks_hooks.data.formatting.encode_prompt` with
    ``max_length=seq_len`` (over-long prompts lose their head, keeping the generation cue).

    Args:
        seq_len (`int`): Maximum prompt tokens seen by the router. Default: 256 (paper v2).
        mid_weight (`float`): Weight of the middle hidden state. Default: 0.45.
        last_weight (`float`): Weight of the last hidden state (after the final norm). Default: 0.55.
        dtype (`str`): Storage dtype of cached features. Default: ``"float16"``.
        version (`int`): Recipe semantics version (:data:`FEATURE_RECIPE_VERSION`).
    """

    seq_len: int = 256
    mid_weight: float = 0.45
    last_weight: float = 0.55
    dtype: str = "float16"
    version: int = FEATURE_RECIPE_VERSION

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ConfigError(f"feature seq_len must be >= 1 (got {self.seq_len})")
        if self.mid_weight < 0 or self.last_weight < 0 or self.mid_weight + self.last_weight <= 0:
            raise ConfigError(
                "feature layer weights must be >= 0 and not both 0 "
                f"(got {self.mid_weight}, {self.last_weight})"
            )
        if self.dtype not in ("float16", "bfloat16", "float32"):
            raise ConfigError(f"feature dtype must be float16, bfloat16 or float32 (got {self.dtype!r})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (round-trips through :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureRecipe:
        """Build from a dictionary; unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown FeatureRecipe keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d)

    def hash(self) -> str:
        """sha256 of the canonical JSON of the recipe (part of the feature cache key)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


@dataclass
class RouterConfig:
    """Configuration of the meta-router: architecture, training, oracle and gating.

    Defaults are the paper's (section 3.6 and 5.4): hidden 512, dropout 0.1, temperature in [0.3, 3.0],
    256-token features (0.45 mid + 0.55 last hidden state), 8 epochs of AdamW at 8e-4 with a cosine
    schedule, BCE plus a 0.05 confidence-margin penalty, chat floor 0.20, gate threshold 0.12, oracle
    threshold 0.01 with a 0.5 soft target for reasoning, 80/20 blend of discovered and label targets,
    and checkpoint selection by ``0.50 single_top1 + 0.35 mixed_set - 0.15 val_bce``.
    """

    # ---- architecture ----
    hidden: int = field(default=512, metadata={"help": "Router hidden width."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout in the fusion MLP."})
    temperature_clamp: tuple[float, float] = field(
        default=(0.3, 3.0), metadata={"help": "Range the learned logit temperature is clamped to."}
    )
    query_init_std: float = field(
        default=1.0,
        metadata={"help": "Std of the initial attention queries (the reference's 0.02 makes every domain "
                          "attend uniformly: collapsed routes)."},
    )
    per_domain_head: bool = field(
        default=True, metadata={"help": "One output weight vector and bias per domain (False: shared head)."}
    )
    normalize_features: bool = field(
        default=True,
        metadata={"help": "Standardise each feature dimension with training-prompt statistics (outlier dims)."},
    )
    # ---- features ----
    seq_len: int = field(
        default=256, metadata={"help": "Prompt tokens seen by the router (train and inference)."}
    )
    feature_mid_weight: float = field(default=0.45, metadata={"help": "Weight of the middle hidden state."})
    feature_last_weight: float = field(default=0.55, metadata={"help": "Weight of the last hidden state."})
    feature_batch_size: int = field(
        default=8, metadata={"help": "Prompts per base forward when computing features."}
    )
    # ---- training ----
    epochs: int = field(default=8, metadata={"help": "Training epochs (paper v2: 8; v1's 15 overfitted)."})
    lr: float = field(
        default=8e-4, metadata={"help": "AdamW peak learning rate (cosine decay over all steps)."}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    batch_size: int = field(default=16, metadata={"help": "Router training batch size."})
    grad_clip: float = field(default=1.0, metadata={"help": "Gradient-norm clip (0 disables)."})
    margin_coef: float = field(
        default=0.05, metadata={"help": "Coefficient of the confidence-margin penalty."}
    )
    margin: float = field(
        default=0.3, metadata={"help": "Margin: penalise |sigmoid(logit) - 0.5| below this."}
    )
    val_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of unique prompts held out for validation."}
    )
    min_val_groups: int = field(
        default=20,
        metadata={"help": "Minimum validation prompts (capped at half the prompts for tiny data)."},
    )
    seed: int = field(default=42, metadata={"help": "Seed of the split, initialisation and shuffling."})
    top1_margin: float = field(
        default=0.05,
        metadata={"help": "A top-1 counts only when it beats the runner-up score by this much (ties never win)."},
    )
    score_weight_single: float = field(
        default=0.50, metadata={"help": "Composite score weight of single_top1."}
    )
    score_weight_mixed: float = field(default=0.35, metadata={"help": "Composite score weight of mixed_set."})
    score_weight_bce: float = field(default=0.15, metadata={"help": "Composite score weight of -val_bce."})
    # ---- gating ----
    chat_floor: float = field(
        default=0.20, metadata={"help": "Minimum weight of the chat domain at inference."}
    )
    chat_domain: str = field(
        default="chat", metadata={"help": "Name of the domain the chat floor applies to."}
    )
    gate_threshold: float = field(
        default=0.12, metadata={"help": "A domain is on iff its score is strictly above this."}
    )
    # ---- oracle ----
    oracle_threshold: float = field(
        default=0.01,
        metadata={"help": "A domain joins a route only if it lowers the loss by more than this."},
    )
    soft_domains: tuple[str, ...] = field(
        default=("reasoning",),
        metadata={"help": "Domains that get soft_target whenever adding them helps at all."},
    )
    soft_target: float = field(default=0.5, metadata={"help": "Discovered target of a soft-boosted domain."})
    blend_discovered: float = field(
        default=0.8, metadata={"help": "Final target = blend * discovered + (1 - blend) * label."}
    )
    exhaustive_max_domains: int = field(
        default=6, metadata={"help": "Exhaustive subset search up to this many domains; greedy beyond."}
    )
    oracle_samples_per_domain: int = field(
        default=200, metadata={"help": "Oracle examples per source domain."}
    )
    oracle_batch_size: int = field(default=8, metadata={"help": "Examples per oracle forward."})
    oracle_max_length: int = field(
        default=512, metadata={"help": "Max tokens of prompt + answer in the oracle."}
    )

    def __post_init__(self) -> None:
        self.temperature_clamp = (float(self.temperature_clamp[0]), float(self.temperature_clamp[1]))
        self.soft_domains = tuple(self.soft_domains)
        lo, hi = self.temperature_clamp
        if not 0 < lo <= hi:
            raise ConfigError(f"temperature_clamp must satisfy 0 < min <= max (got {self.temperature_clamp})")
        for name in (
            "hidden",
            "seq_len",
            "epochs",
            "batch_size",
            "feature_batch_size",
            "oracle_batch_size",
            "oracle_max_length",
            "oracle_samples_per_domain",
            "exhaustive_max_domains",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1) (got {self.dropout})")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(
                f"need lr > 0, weight_decay >= 0, grad_clip >= 0 (got {self.lr}, "
                f"{self.weight_decay}, {self.grad_clip})"
            )
        if self.margin_coef < 0 or not 0 <= self.margin <= 0.5:
            raise ConfigError(
                f"need margin_coef >= 0 and margin in [0, 0.5] (got {self.margin_coef}, {self.margin})"
            )
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1) (got {self.val_fraction})")
        if self.min_val_groups < 1:
            raise ConfigError(f"min_val_groups must be >= 1 (got {self.min_val_groups})")
        if not 0 <= self.chat_floor <= 1 or not 0 <= self.gate_threshold < 1:
            raise ConfigError(
                f"need chat_floor in [0, 1] and gate_threshold in [0, 1) "
                f"(got {self.chat_floor}, {self.gate_threshold})"
            )
        if self.oracle_threshold < 0:
            raise ConfigError(f"oracle_threshold must be >= 0 (got {self.oracle_threshold})")
        if not 0 < self.soft_target <= 1:
            raise ConfigError(f"soft_target must be in (0, 1] (got {self.soft_target})")
        if not 0 <= self.blend_discovered <= 1:
            raise ConfigError(f"blend_discovered must be in [0, 1] (got {self.blend_discovered})")
        if min(self.score_weight_single, self.score_weight_mixed, self.score_weight_bce) < 0:
            raise ConfigError("composite score weights must be >= 0")
        self.feature_recipe()  # validates the feature fields

    @property
    def blend_label(self) -> float:
        """Weight of the label target in the final oracle target (``1 - blend_discovered``)."""
        return 1.0 - self.blend_discovered

    def feature_recipe(self) -> FeatureRecipe:
        """The :class:`FeatureRecipe` these settings describe."""
        return FeatureRecipe(
            seq_len=self.seq_len, mid_weight=self.feature_mid_weight, last_weight=self.feature_last_weight
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (round-trips through :meth:`from_dict`)."""
        d = asdict(self)
        d["temperature_clamp"] = list(self.temperature_clamp)
        d["soft_domains"] = list(self.soft_domains)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RouterConfig:
        """Build from a dictionary; unknown keys are an error naming the valid ones."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown RouterConfig keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d)
