"""``Stack``: the MoE-LoRA modules of one (domain, round) over all target projections."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from .config import StackConfig
from .moe_lora import MoELoRA

_UIDS = itertools.count()


def _module_name(key: str) -> str:
    """``layers.3.q_proj`` -> ``layers_3_q_proj`` (``nn.ModuleDict`` keys cannot contain dots)."""
    return key.replace(".", "_")


class Stack(nn.Module):
    """One MoE-LoRA per target projection, tagged with the domain and inner-loop round it belongs to.

    A frozen stack never trains again: its parameters have ``requires_grad=False`` and it stays in eval
    mode (no router noise, no aux loss) even when the model is put in training mode.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], config: StackConfig, domain: str, round_index: int = 0,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.config = config
        self.domain = domain
        self.round_index = round_index
        self.uid = next(_UIDS)
        self.frozen = False
        self.keys = list(shapes)
        self.experts = nn.ModuleDict(
            {_module_name(k): MoELoRA(i, o, config, dtype=dtype, device=device) for k, (i, o) in shapes.items()}
        )

    def relabel(self, domain: str, round_index: int, config: StackConfig | None = None,
                keys: list[str] | None = None) -> None:
        """Give a cloned stack its identity: domain, round, a fresh uid (and optionally config and keys)."""
        self.domain, self.round_index, self.uid = domain, round_index, next(_UIDS)
        if config is not None:
            self.config = config
        if keys is not None:
            self.keys = list(keys)

    def module_for(self, key: str) -> MoELoRA:
        """The MoE-LoRA of one target (stable key)."""
        return self.experts[_module_name(key)]  # type: ignore[return-value]

    def items(self):
        """``(stable key, MoELoRA)`` pairs in target order."""
        return ((k, self.module_for(k)) for k in self.keys)

    def train(self, mode: bool = True) -> Stack:
        """Frozen stacks ignore ``train(True)``: they always compute their deterministic eval function."""
        return super().train(mode and not self.frozen)

    def freeze(self, dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        """Make the stack read-only: no grad, cast to ``dtype`` (optionally moved), eval mode."""
        for p in self.parameters():
            p.requires_grad_(False)
        self.to(dtype=dtype, device=device)
        self.frozen = True
        self.train(False)

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{"layers.3.q_proj.A": tensor, ...}``: the stable-key state used by stack files."""
        out = {}
        for key, m in self.items():
            for name in ("A", "B", "router", "noise"):
                out[f"{key}.{name}"] = getattr(m, name).detach()
        return out

    def num_parameters(self) -> int:
        """Parameter count of the stack."""
        return sum(p.numel() for p in self.parameters())

    def nbytes(self) -> int:
        """Bytes held by the stack's parameters."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype."""
        return next(self.parameters()).dtype

    def extra_repr(self) -> str:
        state = "frozen" if self.frozen else "active"
        return f"domain={self.domain!r}, round={self.round_index}, {state}, targets={len(self.keys)}"
