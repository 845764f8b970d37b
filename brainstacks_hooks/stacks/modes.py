"""Modes: which stacks a forward pass computes, and with which weights.

========== ==================================================================================
mode       stacks computed
========== ==================================================================================
train      every frozen stack (weight 1) + the active stack (null-space projected)
prefix(d)  frozen stacks of every domain up to and including d, in training order (weight 1):
           the condition a domain was trained and validated under
isolated(d) only d's frozen stacks
ungated    every frozen stack at weight 1
routed(w)  frozen stacks of each domain d with w[d] > 0, scaled by w[d] (by name, never position);
           with one weight mapping per batch row (``Mode.routed_rows``), each row runs its own route in
           the same forward
base_only  nothing: the bare base model
reference  every frozen stack at weight 1, the active stack off (the DPO/GRPO reference policy)
========== ==================================================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import ConfigError

MODE_KINDS = ("train", "prefix", "isolated", "ungated", "routed", "base_only", "reference")


@dataclass(frozen=True)
class Mode:
    """A mode and its argument (a domain for prefix/isolated, weights by domain for routed)."""

    kind: str = "train"
    domain: str | None = None
    weights: tuple[tuple[str, float], ...] | None = None
    #: routed mode with one route per batch row: ``row_weights[b]`` are row b's weights by domain
    row_weights: tuple[tuple[tuple[str, float], ...], ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in MODE_KINDS:
            raise ConfigError(f"unknown mode {self.kind!r}; valid modes: {MODE_KINDS}")
        if self.kind in ("prefix", "isolated") and not self.domain:
            raise ConfigError(f"mode {self.kind!r} needs a domain")
        if self.kind == "routed" and self.weights is None:
            raise ConfigError("mode 'routed' needs weights by domain name")
        if self.row_weights is not None and self.kind != "routed":
            raise ConfigError("per-row weights need mode 'routed'")

    @classmethod
    def routed(cls, weights: Mapping[str, float]) -> Mode:
        """Routed mode from a ``{domain: weight}`` mapping."""
        for d, w in weights.items():
            if not isinstance(d, str):
                raise ConfigError(f"routed weights are keyed by domain name, got key {d!r}")
            if float(w) < 0:
                raise ConfigError(f"routed weight of {d!r} is negative ({w})")
        return cls("routed", weights=tuple(sorted((d, float(w)) for d, w in weights.items())))

    @classmethod
    def routed_rows(cls, rows: Sequence[Mapping[str, float]]) -> Mode:
        """Routed mode with one route per batch row (a mixed-route batch in one forward).

        ``weights`` holds the union of the rows' domains (each at its largest weight), for display and for
        the set of stacks to attach; the hooks scale each row by its own weights.
        """
        if not rows:
            raise ConfigError("routed_rows needs at least one row")
        per_row = tuple(cls.routed(r).weights for r in rows)
        union: dict[str, float] = {}
        for r in per_row:
            for d, w in r:
                union[d] = max(union.get(d, 0.0), w)
        return cls("routed", weights=tuple(sorted(union.items())), row_weights=per_row)

    @classmethod
    def parse(cls, text: str) -> Mode:
        """Parse ``"prefix:chat"``, ``"isolated:code"``, ``"ungated"``, ``"base"`` ... (CLI syntax)."""
        kind, _, arg = text.partition(":")
        kind = {"base": "base_only"}.get(kind, kind)
        return cls(kind, domain=arg or None)

    def describe(self) -> str:
        """Short label, e.g. ``prefix(chat)``."""
        if self.domain:
            return f"{self.kind}({self.domain})"
        if self.row_weights is not None:
            return f"routed({len(self.row_weights)} rows)"
        if self.weights is not None:
            return "routed(" + ", ".join(f"{d}={w:.2f}" for d, w in self.weights) + ")"
        return self.kind


def domain_weights(mode: Mode, domain_order: list[str]) -> dict[str, float]:
    """The weight of every domain whose stacks ``mode`` computes (the one definition of mode semantics).

    Args:
        mode: The mode.
        domain_order: Domains in training order (``prefix`` keeps the domains up to its own).

    Raises:
        ConfigError: the mode names a domain that is not in ``domain_order``.
    """
    kind = mode.kind
    if kind == "base_only":
        return {}
    if kind in ("train", "ungated", "reference"):
        return dict.fromkeys(domain_order, 1.0)
    known = ", ".join(domain_order) or "(none)"
    if kind in ("prefix", "isolated"):
        if mode.domain not in domain_order:
            raise ConfigError(f"unknown domain {mode.domain!r} in mode '{kind}:{mode.domain}'; known domains: {known}")
        if kind == "isolated":
            return {mode.domain: 1.0}
        return dict.fromkeys(domain_order[: domain_order.index(mode.domain) + 1], 1.0)
    weights = dict(mode.weights or ())
    unknown = sorted(set(weights) - set(domain_order))
    if unknown:
        raise ConfigError(f"routed weights name unknown domains {unknown}; known domains: {known}")
    return {d: weights[d] for d in domain_order if weights.get(d, 0.0) > 0.0}


def select_frozen(mode: Mode, domain_order: list[str], frozen_domains: list[str]) -> list[tuple[int, float]]:
    """Indices into the frozen-stack list, with weights, that ``mode`` computes (see :func:`domain_weights`).

    Args:
        domain_order: domains in training order.
        frozen_domains: the domain tag of every frozen stack, in stack order.
    """
    weights = domain_weights(mode, domain_order)
    return [(i, weights[d]) for i, d in enumerate(frozen_domains) if d in weights]


def row_weight_matrix(mode: Mode, domain_order: list[str], frozen_domains: list[str],
                      chosen: list[int]) -> list[list[float]] | None:
    """Per-row weights ``[B][len(chosen)]`` of the chosen frozen stacks for a mixed-route mode (else ``None``).

    Raises:
        ConfigError: a row names a domain that is not in ``domain_order``.
    """
    if mode.row_weights is None:
        return None
    rows = []
    for r in mode.row_weights:
        w = domain_weights(Mode.routed(dict(r)), domain_order)
        rows.append([w.get(frozen_domains[i], 0.0) for i in chosen])
    return rows
