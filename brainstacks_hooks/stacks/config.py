"""``StackConfig``: the hyper-parameters of one MoE-LoRA stack (paper section 3.1 defaults)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from ..constants import DEFAULT_TARGET_MODULES
from ..errors import ConfigError
from ..utils.dtypes import DTYPES

#: Values of :attr:`StackConfig.frozen_compute`.
FROZEN_COMPUTE = ("auto", "dense", "sparse")


@dataclass
class StackConfig:
    """Configuration of a MoE-LoRA stack.

    Defaults are the paper's: 4 rsLoRA experts of rank 16 (alpha 16, so scale alpha/sqrt(r) = 4.0),
    Shazeer noisy top-2 routing, load-balance coefficient 0.01, on all seven projections.
    """

    num_experts: int = field(default=4, metadata={"help": "LoRA experts per projection (E)."})
    top_k: int = field(default=2, metadata={"help": "Experts active per token (K <= E)."})
    rank: int = field(default=16, metadata={"help": "Rank r of every expert."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    use_rslora: bool = field(default=True, metadata={"help": "Scale alpha/sqrt(r) (rsLoRA) instead of alpha/r."})
    target_modules: tuple[str, ...] = field(
        default=DEFAULT_TARGET_MODULES, metadata={"help": "Projection names to hook in every decoder layer."}
    )
    aux_loss_coef: float = field(default=0.01, metadata={"help": "Load-balance loss coefficient (paper eq. 7)."})
    router_noise: bool = field(default=True, metadata={"help": "Shazeer input-dependent router noise in training."})
    router_init_std: float = field(default=0.02, metadata={"help": "Std of the router weight initialisation."})
    frozen_dtype: str = field(
        default="auto",
        metadata={"help": "Storage dtype of frozen stacks: auto (active dtype), float32, bfloat16, float16."},
    )
    offload_frozen: bool = field(
        default=False,
        metadata={"help": "Keep frozen stacks in CPU RAM; only the stacks in use are copied to the device."},
    )
    group_frozen: bool = field(
        default=True, metadata={"help": "Compute all frozen stacks of a projection in one grouped matmul."}
    )
    frozen_compute: str = field(
        default="auto",
        metadata={"help": "Grouped frozen experts: dense (every expert, zero gates), sparse (the top-k experts "
                          "only, grouped matmul), auto (the faster one measured on the device: dense so far; see "
                          "docs/BENCHMARKS.md)."},
    )

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.num_experts < 1 or self.rank < 1:
            raise ConfigError(f"num_experts and rank must be >= 1 (got {self.num_experts}, {self.rank})")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        if self.alpha <= 0:
            raise ConfigError(f"alpha must be > 0 (got {self.alpha})")
        if self.aux_loss_coef < 0:
            raise ConfigError(f"aux_loss_coef must be >= 0 (got {self.aux_loss_coef})")
        if self.frozen_dtype != "auto" and self.frozen_dtype not in DTYPES:
            raise ConfigError(f"frozen_dtype must be 'auto' or one of {sorted(DTYPES)} (got {self.frozen_dtype!r})")
        if self.frozen_compute not in FROZEN_COMPUTE:
            raise ConfigError(f"frozen_compute must be one of {list(FROZEN_COMPUTE)} (got {self.frozen_compute!r})")
        if not self.target_modules:
            raise ConfigError("target_modules must name at least one projection")

    @property
    def scale(self) -> float:
        """Expert output scale: alpha/sqrt(r) with rsLoRA, alpha/r without."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def sparse_frozen(self, device: torch.device) -> bool:
        """Whether the grouped frozen compute on ``device`` runs the top-k experts only.

        ``auto`` is dense on every device. On CPU the sparse path measured slower at every size: 2.39x the base
        forward with 5 stacks (dense 1.76x) and 4.11x with 10 (dense 2.41x) at 4 x 256 tokens, 1.82x vs 1.77x at 1 x 45
        tokens, and a one-token gather path lost in decode (docs/BENCHMARKS.md, "Serving speed"). On CUDA it has not
        been measured yet (``scripts/gpu_check.py`` times both), so the dense path stays until it is.
        """
        return self.frozen_compute == "sparse"

    def frozen_torch_dtype(self, active_dtype: torch.dtype) -> torch.dtype:
        """The dtype frozen stacks are stored in."""
        return active_dtype if self.frozen_dtype == "auto" else DTYPES[self.frozen_dtype]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (round-trips through :meth:`from_dict`)."""
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StackConfig:
        """Build from a dictionary; unknown keys are an error naming the valid ones."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown StackConfig keys {unknown}; valid keys: {sorted(names)}")
        return cls(**d)
