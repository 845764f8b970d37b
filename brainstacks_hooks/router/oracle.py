"""Outcome oracle: discover which stacks actually help each (prompt, answer) pair (paper section 3.6).

For every example the oracle measures the completion loss (token mean over the answer tokens, prompt
masked) under candidate routes and turns the best route into a router training target.

**Routes are evaluated as they would run at inference.** A candidate subset ``S`` of domains is executed
with the weights :func:`executed_weights` gives it: the scores a router outputs when it learned the target
this route gets (``0.8 [d in S] + 0.2 [d in labels]``, the blend below), passed through the same
:func:`~brainstacks_hooks.router.gating.apply_gating` (chat floor, gate threshold) as inference. For a math
prompt, ``{math}`` runs math at 1.0 plus chat at the floor (0.2), the empty route runs math at 0.2 and chat
at the floor, ``{code}`` runs code at 0.8, math at 0.2 and chat at the floor. The stacks-off loss
(``base_loss``, inside ``bs.base_only()``) is recorded for reporting but is never a candidate: no prompt
is served that way while the chat floor is on. (The reference code compared "domain + 0.2 chat" against
a chat-free base, biasing every comparison towards stacks; ``reference_impl.md`` section 11.1 item 14.)

**Search.** With ``n <= exhaustive_max_domains`` (6) domains every subset, the empty one included, is
evaluated. With mixed-route batches (the default) the candidate routes of each example run together, each
batch row under its own route (``bs.routed_rows``), ``oracle_batch_size`` rows per forward; otherwise each
route is one batched forward over the batch (``2^n`` forwards per batch, plus one for the stacks-off loss).
Identical executed weights are computed once. Beyond that, a greedy
best-improvement search starts at the empty route and repeatedly adds the domain with the lowest loss,
batching each candidate route over all rows that need it.

**Selection rule** (threshold ``t = oracle_threshold``, 0.01; ``L`` = loss of a route):

* exhaustive: a subset ``S`` is *admissible* iff for every member ``d``, ``L(S) < L(T) - t`` for every
  route ``T ⊆ S \\ {d}``; equivalently ``L(S) < min over proper subsets T of S of L(T) - t``. Every member
  must lower the loss by more than ``t`` relative to the best route without it. The empty route is always
  admissible. The best route is the admissible subset with the lowest loss (ties: fewer domains, then
  domain order). Hence the chosen route beats every smaller route by more than ``t``, the empty route
  included.
* greedy: from ``S`` the best single addition ``S + {d}`` is accepted iff ``L(S + {d}) < L(S) - t``.

**Soft domains** (``soft_domains``, default ``("reasoning",)``): a soft domain ``s`` not in the best route
gets discovered target ``soft_target`` (0.5) if ``L(best + {s}) < L(best)`` by any amount (paper 5.4). A
soft domain that passed the threshold on its own is a full member (target 1.0).

**Targets.** ``discovered[d]`` is 1.0 for members, ``soft_target`` for soft-boosted domains, else 0.0.
Chat is *not* raised to the floor in the target: a chat target of 0 means "the floor suffices", which is
exactly what the router output will produce at inference after :func:`apply_gating`. The final target is
``blend_discovered * discovered + (1 - blend_discovered) * label`` (0.8 / 0.2), where ``label`` is the
multi-hot vector of the example's label domains (its source domain by default).

**Cache.** One JSON file per source domain (``oracle_<domain>.json``) keyed by a signature of the stacks
(``stack_signature``, e.g. :func:`stacks_signature`), the domain list and every setting that changes a
loss (chat floor, chat domain, gate threshold, max length). It stores each example's losses of all
evaluated routes, keyed by example id with a content hash. Routes and targets are re-derived from the
stored losses on every run, so changing the threshold, the soft domains or the blend never recomputes a
forward pass (a greedy search only computes routes it had not evaluated). A different signature
recomputes the domain; missing or changed examples are computed and merged.

**Several processes** (``shard=True`` under ``torchrun``; collective, every process calls it with the same
examples): the main process reads the cache and tells the others what is missing; the batches are then dealt
out in rounds of ``world_size`` (process ``r`` searches the ``r``-th batch of each round) and the loss tables
of a round are gathered in batch order (:func:`~brainstacks_hooks.utils.distributed.map_sharded`), so every
process ends with the records one process would compute. The main process alone writes the cache, at the
same points as one process.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from ..data.formatting import IGNORE_INDEX
from ..errors import ConfigError, StackLoadError
from ..loss import autocast_context, eval_mode, token_nll
from ..utils import distributed
from ..utils.io import atomic_write_json, read_json
from ..utils.logging import get_logger
from .config import RouterConfig
from .gating import apply_gating

logger = get_logger(__name__)

ORACLE_FORMAT_VERSION = 2  # 2: routes scored at the gated weights of their targets
#: Loss-table key of the stacks-off forward (``bs.base_only()``); reported, never a candidate route.
BASE_KEY = "<base>"

#: ``loss_fn(weights, rows) -> losses [len(rows)]``: completion loss of the given batch rows with the
#: stacks weighted by ``weights`` (``None`` or ``{}``: stacks off).
LossFn = Callable[[dict[str, float] | None, torch.Tensor], torch.Tensor]
#: ``multi_fn(items) -> losses [len(items)]``: one forward over ``(weights, row)`` items, each batch row under
#: its own route (a mixed-route batch; ``None`` or ``{}`` weights: stacks off).
MultiLossFn = Callable[[list[tuple[dict[str, float] | None, int]]], torch.Tensor]


# ----------------------------------------------------------------------------------------------- routes
def route_key(subset: Iterable[str], domains: Sequence[str]) -> str:
    """Canonical key of a subset: member names joined by ``+`` in domain order (``""`` when empty)."""
    members = set(subset)
    return "+".join(d for d in domains if d in members)


def parse_route_key(key: str) -> list[str]:
    """Inverse of :func:`route_key`."""
    return [d for d in key.split("+") if d]


def all_route_keys(domains: Sequence[str]) -> list[str]:
    """All ``2^n`` subsets (empty first), ordered by size, then by domain order."""
    n = len(domains)
    masks = sorted(range(1 << n), key=lambda m: (bin(m).count("1"), [-(m >> i & 1) for i in range(n)]))
    return [route_key([domains[i] for i in range(n) if m >> i & 1], domains) for m in masks]


def executed_weights(subset: Iterable[str], domains: Sequence[str], config: RouterConfig,
                     labels: Iterable[str] = ()) -> dict[str, float]:
    """The stack weights inference runs when the router outputs exactly the target this route would get.

    The target of a domain is ``blend_discovered * [d in subset] + (1 - blend_discovered) * [d in labels]``
    (the 0.8 / 0.2 blend of the paper); the weights are those scores after the chat floor and the gate
    threshold (:func:`~.gating.apply_gating`). So a candidate route is scored at the weights it would run
    with, not at 1.0: a label domain left out of the route still runs at 0.2 (above the 0.12 gate).
    """
    members, lab = set(subset), set(labels)
    unknown = (members | lab) - set(domains)
    if unknown - lab:
        raise ValueError(f"unknown domains in subset: {sorted(unknown - lab)} (domains: {list(domains)})")
    # rounded as decide() rounds targets: 1 - 0.8 is stored as 0.2, not 0.19999999999999996
    scores = {d: round(config.blend_discovered * (d in members) + config.blend_label * (d in lab), 12)
              for d in domains}
    return apply_gating(scores, config.chat_floor, config.chat_domain, config.gate_threshold).weights


def select_route_exhaustive(
    losses: Mapping[str, float], domains: Sequence[str], threshold: float
) -> list[str]:
    """Best admissible subset from a complete loss table (see the module docstring for the rule).

    Args:
        losses: ``{route_key: loss}`` for all ``2^n`` subsets.
        domains: Domain names (bit ``i`` of a subset mask is ``domains[i]``).
        threshold: Minimum loss improvement each member must bring (strict).
    """
    n = len(domains)
    L = [losses[route_key([domains[i] for i in range(n) if m >> i & 1], domains)] for m in range(1 << n)]
    below = [math.inf] * (1 << n)  # below[m]: lowest loss over proper subsets of m
    admissible = [True] + [False] * ((1 << n) - 1)
    for m in range(1, 1 << n):  # sub-masks are smaller integers, so they are done first
        for i in range(n):
            if m >> i & 1:
                sub = m ^ (1 << i)
                below[m] = min(below[m], L[sub], below[sub])
        admissible[m] = L[m] < below[m] - threshold
    best = min(
        (m for m in range(1 << n) if admissible[m]),
        key=lambda m: (L[m], bin(m).count("1"), [-(m >> i & 1) for i in range(n)]),
    )
    return [domains[i] for i in range(n) if best >> i & 1]


def _greedy_replay(
    losses: Mapping[str, float], domains: Sequence[str], threshold: float
) -> tuple[list[str] | None, list[str]]:
    """Replay the greedy search on a loss table: ``(route, [])`` when decided, ``(None, missing keys)``."""
    route: list[str] = []
    while True:
        candidates = [d for d in domains if d not in route]
        if not candidates:
            return route, []
        keys = [route_key([*route, d], domains) for d in candidates]
        missing = [k for k in keys if k not in losses]
        if missing:
            return None, missing
        best_i = min(range(len(keys)), key=lambda i: losses[keys[i]])  # ties: domain order
        if losses[keys[best_i]] < losses[route_key(route, domains)] - threshold:
            route = parse_route_key(keys[best_i])
        else:
            return route, []


def select_route_greedy(losses: Mapping[str, float], domains: Sequence[str], threshold: float) -> list[str]:
    """Greedy best-improvement route from a loss table (``KeyError`` if a needed route is missing)."""
    route, missing = _greedy_replay(losses, domains, threshold)
    if route is None:
        raise KeyError(f"greedy search needs losses of routes {missing}")
    return route


def _is_exhaustive(domains: Sequence[str], config: RouterConfig) -> bool:
    return len(domains) <= config.exhaustive_max_domains


def needed_routes(losses: Mapping[str, float], domains: Sequence[str], config: RouterConfig) -> list[str]:
    """Route keys (and :data:`BASE_KEY`) still to evaluate before a decision can be made."""
    need = [] if BASE_KEY in losses else [BASE_KEY]
    if _is_exhaustive(domains, config):
        return need + [k for k in all_route_keys(domains) if k not in losses]
    if "" not in losses:
        return [*need, ""]
    route, missing = _greedy_replay(losses, domains, config.oracle_threshold)
    if route is None:
        return need + missing
    soft = [route_key([*route, s], domains) for s in config.soft_domains if s in domains and s not in route]
    return need + [k for k in soft if k not in losses]


@dataclass
class OracleDecision:
    """Best route and targets of one example.

    Attributes:
        route: Best route (domain names in domain order; empty: the floor-only route).
        soft: Soft-boosted domains (target ``soft_target``).
        best_loss: Loss of ``route``.
        empty_loss: Loss of the empty route as executed (chat at the floor when chat exists).
        discovered: Discovered target per domain.
        target: Final blended target per domain.
    """

    route: list[str]
    soft: list[str]
    best_loss: float
    empty_loss: float
    discovered: dict[str, float]
    target: dict[str, float]


def decide(
    losses: Mapping[str, float], domains: Sequence[str], config: RouterConfig, labels: Iterable[str]
) -> OracleDecision:
    """Route, soft boosts and blended targets from a loss table (rules in the module docstring)."""
    if _is_exhaustive(domains, config):
        route = select_route_exhaustive(losses, domains, config.oracle_threshold)
    else:
        route = select_route_greedy(losses, domains, config.oracle_threshold)
    best = float(losses[route_key(route, domains)])
    soft = [
        s
        for s in domains
        if s in config.soft_domains and s not in route and losses[route_key([*route, s], domains)] < best
    ]
    label_set = set(labels)
    discovered = {d: 1.0 if d in route else (config.soft_target if d in soft else 0.0) for d in domains}
    mix = config.blend_discovered
    # Rounded so 0.8 * 0 + 0.2 * 1 is stored as 0.2 rather than 0.19999999999999996.
    target = {d: round(min(1.0, mix * discovered[d] + (1 - mix) * (d in label_set)), 12) for d in domains}
    return OracleDecision(route, soft, best, float(losses[""]), discovered, target)


def search_routes(
    loss_fn: LossFn,
    n_rows: int,
    domains: Sequence[str],
    config: RouterConfig,
    initial: Sequence[Mapping[str, float] | None] | None = None,
    multi_fn: MultiLossFn | None = None,
    rows_per_forward: int = 8,
    labels: Sequence[Sequence[str]] | None = None,
) -> list[dict[str, float]]:
    """Evaluate the routes the oracle needs for a batch of ``n_rows`` examples.

    With ``multi_fn`` (mixed-route batches), the needed (example, route) pairs are run ``rows_per_forward``
    at a time, each row under its own route: the candidate routes of one example share a forward and have
    equal lengths (no padding). Without it, one ``loss_fn`` call runs one route over all rows that need it.

    Every needed route is evaluated with one ``loss_fn`` call over all rows that need it; routes whose
    executed weights coincide (e.g. the empty route without a chat floor and the stacks-off route) share
    one call. In exhaustive mode this is one call per subset per batch.

    Args:
        loss_fn: ``loss_fn(weights, rows) -> [len(rows)]`` per-example losses (``None``: stacks off).
        n_rows: Examples in the batch.
        domains: Domain names.
        config: Oracle settings (threshold, chat floor, gate threshold, exhaustive limit, soft domains).
        initial: Optional known loss tables per row (e.g. from the cache); only missing routes are run.
        labels: Label domains of each row: a route runs at :func:`executed_weights` with the row's labels.

    Returns:
        One ``{route_key or BASE_KEY: loss}`` table per row.
    """
    tables: list[dict[str, float]] = [dict(initial[i] or {}) if initial else {} for i in range(n_rows)]
    while True:
        needs: dict[str, list[int]] = {}
        for i, table in enumerate(tables):
            for k in needed_routes(table, domains, config):
                needs.setdefault(k, []).append(i)
        if not needs:
            return tables
        row_labels = labels if labels is not None else [()] * n_rows
        if multi_fn is not None:
            _run_mixed(multi_fn, needs, tables, domains, config, rows_per_forward, row_labels)
            continue
        # Group (route, row) pairs by the weights they execute with: one forward per distinct weight set.
        groups: dict[tuple[tuple[str, float], ...], dict[str, list[int]]] = {}
        for k, rows in needs.items():
            for r in rows:
                w = {} if k == BASE_KEY else executed_weights(parse_route_key(k), domains, config, row_labels[r])
                groups.setdefault(tuple(sorted(w.items())), {}).setdefault(k, []).append(r)
        for wkey, key_rows in groups.items():
            rows = sorted({r for rs in key_rows.values() for r in rs})
            losses = loss_fn(dict(wkey) or None, torch.tensor(rows, dtype=torch.long))  # [len(rows)]
            losses = losses.detach().float().cpu().reshape(-1)
            if losses.shape[0] != len(rows) or not bool(torch.isfinite(losses).all()):
                raise ValueError(f"loss_fn returned {tuple(losses.shape)} (need {len(rows)} finite losses)")
            pos = {r: j for j, r in enumerate(rows)}
            for k, rs in key_rows.items():
                for r in rs:
                    tables[r][k] = float(losses[pos[r]])


def _run_mixed(multi_fn: MultiLossFn, needs: Mapping[str, list[int]], tables: list[dict[str, float]],
               domains: Sequence[str], config: RouterConfig, rows_per_forward: int,
               labels: Sequence[Sequence[str]]) -> None:
    """Fill ``tables`` with the needed losses through mixed-route forwards (one forward per chunk of pairs)."""
    # (row, executed weights) -> route keys it answers: routes executing the same weights are run once
    pairs: dict[tuple[int, tuple[tuple[str, float], ...]], list[str]] = {}
    for k, rows in needs.items():
        for r in rows:
            w = {} if k == BASE_KEY else executed_weights(parse_route_key(k), domains, config, labels[r])
            pairs.setdefault((r, tuple(sorted(w.items()))), []).append(k)
    items = sorted(pairs)  # by example row: the routes of one example go into the same forward
    for start in range(0, len(items), rows_per_forward):
        chunk = items[start : start + rows_per_forward]
        losses = multi_fn([(dict(w) or None, r) for r, w in chunk]).detach().float().cpu().reshape(-1)
        if losses.shape[0] != len(chunk) or not bool(torch.isfinite(losses).all()):
            raise ValueError(f"multi_fn returned {tuple(losses.shape)} (need {len(chunk)} finite losses)")
        for (r, w), loss in zip(chunk, losses.tolist()):
            for k in pairs[(r, w)]:
                tables[r][k] = float(loss)


# ---------------------------------------------------------------------------------------------- examples
@dataclass(frozen=True)
class OracleExample:
    """One (prompt, answer) pair for the oracle.

    Attributes:
        example_id: Stable id (see :meth:`make`); the cache key.
        domain: Source domain (the dataset it came from); the cache file it lives in.
        instruction, input, output: The prompt and the reference answer.
        labels: Prior label domains (the 20% of the target); the source domain by default.
    """

    example_id: str
    domain: str
    instruction: str
    input: str
    output: str
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.labels:
            object.__setattr__(self, "labels", (self.domain,))

    @property
    def content_sha(self) -> str:
        """sha256 of the prompt and answer (detects an id reused for different content)."""
        return hashlib.sha256(json.dumps([self.instruction, self.input, self.output]).encode()).hexdigest()

    @classmethod
    def make(
        cls, domain: str, instruction: str, input: str, output: str, labels: Sequence[str] = ()
    ) -> OracleExample:
        """Build an example whose id is derived from its domain and content."""
        blob = json.dumps([domain, instruction, input, output]).encode()
        return cls(hashlib.sha256(blob).hexdigest()[:24], domain, instruction, input, output, tuple(labels))


@dataclass
class OracleRecord:
    """The oracle's result for one example (JSON round-trips through :meth:`to_dict` / :meth:`from_dict`).

    Attributes:
        example_id, domain, labels, content_sha: Identity of the example.
        n_tokens: Completion tokens the loss averages over.
        base_loss: Loss with every stack off (reported only).
        losses: ``{route_key: loss}`` of every evaluated route as executed (``""``: empty route).
        route, soft, best_loss, empty_loss, discovered, target: The :class:`OracleDecision`.
    """

    example_id: str
    domain: str
    labels: list[str]
    content_sha: str
    n_tokens: int
    base_loss: float
    losses: dict[str, float]
    route: list[str] = field(default_factory=list)
    soft: list[str] = field(default_factory=list)
    best_loss: float = math.nan
    empty_loss: float = math.nan
    discovered: dict[str, float] = field(default_factory=dict)
    target: dict[str, float] = field(default_factory=dict)

    def apply(self, decision: OracleDecision) -> OracleRecord:
        """Copy the decision's fields into the record (returns ``self``)."""
        self.route, self.soft = list(decision.route), list(decision.soft)
        self.best_loss, self.empty_loss = decision.best_loss, decision.empty_loss
        self.discovered, self.target = dict(decision.discovered), dict(decision.target)
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OracleRecord:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def targets_tensor(records: Sequence[OracleRecord], domains: Sequence[str]) -> torch.Tensor:
    """Final targets as ``[N, n_domains]`` in ``domains`` order."""
    return torch.tensor([[r.target.get(d, 0.0) for d in domains] for r in records], dtype=torch.float32)


# ----------------------------------------------------------------------------------------------- backend
class OracleBackend(Protocol):
    """What :func:`run_oracle` needs from a model: encoding and a batched loss function."""

    def prepare(self, examples: Sequence[OracleExample]) -> list[int | None]:
        """Completion-token count of each example, or ``None`` when it cannot be scored (skipped)."""
        ...

    def batch_loss_fn(self, examples: Sequence[OracleExample]) -> LossFn:
        """A :data:`LossFn` over this batch (rows index ``examples``)."""
        ...


def completion_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-mean completion cross-entropy per example (:func:`brainstacks_hooks.loss.token_nll`), ``[B]`` fp32.

    Raises:
        ValueError: a row has no completion token.
    """
    sums, counts = token_nll(logits, labels)
    empty = (counts == 0).nonzero()
    if len(empty):
        raise ValueError(f"row {int(empty[0])} has no completion tokens")
    return (sums / counts).float()


class StackOracleBackend:
    """:class:`OracleBackend` over a :class:`BrainStacks` model.

    Examples are encoded with :func:`~brainstacks_hooks.data.formatting.encode_example` (completion-only
    labels, the one prompt format); examples whose answer would be truncated to nothing are skipped
    rather than scored 0. A route runs inside ``bs.routed(weights)``, the stacks-off loss inside
    ``bs.base_only()``.

    Args:
        bs: The stacks object (``bs.model``, ``bs.routed``, ``bs.base_only``).
        tokenizer: The base tokenizer.
        max_length: Max tokens of prompt + answer.
        encode_fn: Override of ``encode_example`` (tests).
        bf16: Run the forwards under bf16 autocast (the precision of the SFT evaluator when the run trained
            with ``train.bf16``); the cross-entropy is taken in fp32.
    """

    def __init__(self, bs: Any, tokenizer: Any, max_length: int, encode_fn: Callable[..., Any] | None = None,
                 bf16: bool = False):
        from ..data.formatting import CompletionCollator, encode_example

        self.bs = bs
        self.bf16 = bf16
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.encode_fn = encode_fn or encode_example
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = pad if pad is not None else getattr(tokenizer, "eos_token_id", None)
        self.collator = CompletionCollator(pad_token_id=int(pad) if pad is not None else 0)
        self._encoded: dict[str, dict[str, list[int]]] = {}

    def prepare(self, examples: Sequence[OracleExample]) -> list[int | None]:
        out: list[int | None] = []
        for e in examples:
            enc = self.encode_fn(self.tokenizer, e.instruction, e.input, e.output, self.max_length)
            if enc is None:
                out.append(None)
                continue
            self._encoded[e.example_id] = enc
            out.append(sum(1 for y in enc["labels"] if y != IGNORE_INDEX))
        return out

    def batch_loss_fn(self, examples: Sequence[OracleExample]) -> LossFn:
        batch = self.collator([self._encoded[e.example_id] for e in examples])
        model = self.bs.model
        device = next(model.parameters()).device

        @torch.no_grad()
        def loss_fn(weights: dict[str, float] | None, rows: torch.Tensor) -> torch.Tensor:
            mask = batch["attention_mask"][rows]  # [b, L]
            L = int(mask.sum(dim=1).max())
            ids = batch["input_ids"][rows, :L].to(device)  # [b, L]
            labels = batch["labels"][rows, :L].to(device)  # [b, L]
            ctx = self.bs.routed(weights) if weights else self.bs.base_only()
            with ctx, autocast_context(model, self.bf16):
                logits = model(input_ids=ids, attention_mask=mask[:, :L].to(device), use_cache=False).logits
            return completion_losses(logits, labels)  # [b]

        return loss_fn

    def batch_multi_loss_fn(self, examples: Sequence[OracleExample]) -> MultiLossFn:
        """A :data:`MultiLossFn` over this batch: every row under its own route, in one forward."""
        batch = self.collator([self._encoded[e.example_id] for e in examples])
        model = self.bs.model
        device = next(model.parameters()).device

        @torch.no_grad()
        def multi_fn(items: list[tuple[dict[str, float] | None, int]]) -> torch.Tensor:
            rows = torch.tensor([r for _, r in items], dtype=torch.long)
            mask = batch["attention_mask"][rows]  # [b, L]
            L = int(mask.sum(dim=1).max())
            ids = batch["input_ids"][rows, :L].to(device)  # [b, L]
            labels = batch["labels"][rows, :L].to(device)  # [b, L]
            with self.bs.routed_rows([w or {} for w, _ in items]), autocast_context(model, self.bf16):
                logits = model(input_ids=ids, attention_mask=mask[:, :L].to(device), use_cache=False).logits
            return completion_losses(logits, labels)  # [b]

        return multi_fn


def stacks_signature(bs: Any, tokenizer: Any = None) -> str:
    """sha256 identifying everything that determines oracle losses: base fingerprint, frozen stack tensors
    (bytes, with domain and round), domain order and, when given, the tokenizer's template and vocabulary.
    """
    from .features import base_fingerprint

    h = hashlib.sha256()
    h.update(json.dumps(base_fingerprint(bs), sort_keys=True, default=str).encode())
    h.update(json.dumps(list(bs.domains)).encode())
    for stack in getattr(bs, "frozen_stacks", []):
        h.update(f"{stack.domain}/{stack.round_index}".encode())
        for name, t in sorted(stack.tensors().items()):
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    if tokenizer is not None:
        tok = {
            "class": type(tokenizer).__name__,
            "name": getattr(tokenizer, "name_or_path", None),
            "chat_template": getattr(tokenizer, "chat_template", None),
            "vocab": len(tokenizer) if hasattr(tokenizer, "__len__") else None,
        }
        h.update(json.dumps(tok, sort_keys=True, default=str).encode())
    return h.hexdigest()


def oracle_signature(stack_signature: str, domains: Sequence[str], config: RouterConfig, bf16: bool = False) -> str:
    """Cache signature: the stacks plus every setting that changes a stored loss (``bf16``: autocast forwards)."""
    blob = {
        "bf16": bf16,
        "format_version": ORACLE_FORMAT_VERSION,
        "stack_signature": stack_signature,
        "domains": list(domains),
        "chat_floor": config.chat_floor,
        "chat_domain": config.chat_domain,
        "gate_threshold": config.gate_threshold,
        "max_length": config.oracle_max_length,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------- cache
class OracleCache:
    """Per-domain JSON files of oracle records: ``<cache_dir>/oracle_<domain>.json``."""

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.cache_dir = Path(cache_dir)

    def path(self, domain: str) -> Path:
        """File of one source domain."""
        return self.cache_dir / f"oracle_{re.sub(r'[^A-Za-z0-9_.-]', '_', domain)}.json"

    def load(self, domain: str, signature: str) -> dict[str, dict[str, Any]]:
        """Stored records ``{example_id: record dict}`` if the file's signature matches, else ``{}``."""
        path = self.path(domain)
        if not path.is_file():
            return {}
        try:
            blob = read_json(path)
        except StackLoadError as e:
            logger.warning("oracle cache %s is unreadable (%s); recomputing", path, e)
            return {}
        if blob.get("format_version") != ORACLE_FORMAT_VERSION or blob.get("signature") != signature:
            logger.info("oracle cache %s was computed with other stacks or settings; recomputing", path)
            return {}
        return dict(blob.get("records", {}))

    def save(self, domain: str, signature: str, records: Mapping[str, dict[str, Any]]) -> None:
        """Write a domain's records atomically."""
        atomic_write_json(
            self.path(domain),
            {
                "format_version": ORACLE_FORMAT_VERSION,
                "signature": signature,
                "domain": domain,
                "records": records,
            },
        )


@dataclass
class OracleResult:
    """Output of :func:`run_oracle`.

    Attributes:
        records: One record per scored example, in input order.
        skipped: Ids of examples that could not be scored (answer truncated away).
        n_cached: Examples served entirely from the cache.
        n_computed: Examples that needed at least one forward pass.
    """

    records: list[OracleRecord]
    skipped: list[str]
    n_cached: int
    n_computed: int

    def targets(self, domains: Sequence[str]) -> torch.Tensor:
        """Final targets ``[N, n_domains]``."""
        return targets_tensor(self.records, domains)


def run_oracle(
    examples: Sequence[OracleExample],
    config: RouterConfig,
    *,
    backend: OracleBackend,
    domains: Sequence[str],
    stack_signature: str,
    cache_dir: str | os.PathLike | None = None,
    save_every: int = 8,
    progress: bool = True,
    bf16: bool = False,
    mixed_batches: bool = True,
    shard: bool = False,
) -> OracleResult:
    """Discover the best route and the router target of every example, using and filling the cache.

    Args:
        examples: Oracle examples (several source domains allowed; cached per source domain).
        config: Router configuration (oracle and gating settings).
        backend: Computes losses (:class:`StackOracleBackend` for a real model).
        domains: Domains with stacks, i.e. the router's outputs (usually ``bs.domains``).
        stack_signature: Identity of the stacks (e.g. :func:`stacks_signature`); a change recomputes.
        cache_dir: Folder of the per-domain cache files (``None``: no cache).
        save_every: Save a domain's cache every this many batches (a crash loses little).
        progress: Show tqdm bars.
        bf16: Whether ``backend`` runs under bf16 autocast (part of the cache signature).
        mixed_batches: Run the candidate routes of each example together in mixed-route forwards when the
            backend supports it (``batch_multi_loss_fn``); ``False``: one forward per route over a batch.
        shard: Split the batches over the processes of ``torch.distributed`` (collective; see the module
            docstring); a no-op in a single process.

    Returns:
        An :class:`OracleResult`.
    """
    domains = list(domains)
    if len(set(domains)) != len(domains) or not domains:
        raise ConfigError(f"oracle domains must be distinct and non-empty (got {domains})")
    exhaustive = _is_exhaustive(domains, config)
    logger.info(
        "oracle: %d examples, %d domains, %s search (%s)",
        len(examples),
        len(domains),
        "exhaustive" if exhaustive else "greedy",
        f"{1 << len(domains)} routes per batch" if exhaustive else "best-improvement",
    )
    signature = oracle_signature(stack_signature, domains, config, bf16)
    cache = OracleCache(cache_dir) if cache_dir is not None else None
    shard = shard and distributed.is_initialized()
    n_proc = distributed.world_size() if shard else 1

    def on_main(fn: Callable[..., Any], *args: Any) -> Any:
        """Several processes: the cache is read and written by the main process, its result shared."""
        return distributed.broadcast_object(distributed.on_main_process(fn, *args)) if shard else fn(*args)

    by_domain: dict[str, list[OracleExample]] = {}
    for e in examples:
        by_domain.setdefault(e.domain, []).append(e)
    done: dict[str, OracleRecord] = {}
    skipped: list[str] = []
    n_cached = n_computed = 0
    for source, exs in by_domain.items():
        stored = on_main(cache.load, source, signature) if cache is not None else {}
        todo: list[tuple[OracleExample, dict[str, float] | None]] = []
        for e in exs:
            r = stored.get(e.example_id)
            if r is not None and r.get("content_sha") == e.content_sha:
                rec = OracleRecord.from_dict(r)
                table = {**rec.losses, BASE_KEY: rec.base_loss}
                if not needed_routes(table, domains, config):
                    done[e.example_id] = rec.apply(decide(rec.losses, domains, config, e.labels))
                    n_cached += 1
                    continue
                todo.append((e, table))  # a greedy search under new settings needs more routes
            else:
                todo.append((e, None))
        logger.info("oracle[%s]: %d cached, %d to compute", source, len(exs) - len(todo), len(todo))
        if not todo:
            continue
        n_tokens = backend.prepare([e for e, _ in todo])
        usable = [(e, init, n) for (e, init), n in zip(todo, n_tokens) if n is not None]
        newly_skipped = [e.example_id for (e, _), n in zip(todo, n_tokens) if n is None]
        if newly_skipped:
            logger.warning(
                "oracle[%s]: skipped %d examples whose answer does not fit", source, len(newly_skipped)
            )
        skipped.extend(newly_skipped)
        bs_ = config.oracle_batch_size
        starts = list(range(0, len(usable), bs_))
        search = functools.partial(_search_batch, backend, usable, domains, config, mixed_batches)
        # rounds of n_proc batches (one process: one batch per round), each process searching one of them
        rounds = range(0, len(starts), n_proc)
        for g in tqdm(rounds, desc=f"oracle {source}", disable=not progress):
            group = starts[g : g + n_proc]
            tables_of = distributed.map_sharded(search, group) if shard else [search(s) for s in group]
            for start, tables in zip(group, tables_of):
                chunk = usable[start : start + bs_]
                _record(chunk, tables, source, domains, config, done)
                n_computed += len(chunk)
            last = g + len(group)  # batches done so far
            if cache is not None and (any(b % save_every == 0 for b in range(g + 1, last + 1))
                                      or group[-1] + bs_ >= len(usable)):
                merged = dict(stored)
                merged.update(
                    {e.example_id: done[e.example_id].to_dict() for e in exs if e.example_id in done}
                )
                on_main(cache.save, source, signature, merged)
    records = [done[e.example_id] for e in examples if e.example_id in done]
    return OracleResult(records=records, skipped=skipped, n_cached=n_cached, n_computed=n_computed)


def _search_batch(backend: OracleBackend, usable: Sequence[tuple[OracleExample, Any, int]], domains: Sequence[str],
                  config: RouterConfig, mixed_batches: bool, start: int) -> list[dict[str, float]]:
    """Loss tables of the batch of ``usable`` (``(example, cached table, n_tokens)``) that begins at ``start``."""
    chunk = usable[start : start + config.oracle_batch_size]
    chunk_examples = [e for e, _, _ in chunk]
    multi = getattr(backend, "batch_multi_loss_fn", None) if mixed_batches else None
    return search_routes(backend.batch_loss_fn(chunk_examples), len(chunk), domains, config, [i for _, i, _ in chunk],
                         multi_fn=multi(chunk_examples) if multi is not None else None,
                         rows_per_forward=config.oracle_batch_size, labels=[e.labels for e in chunk_examples])


def _record(chunk: Sequence[tuple[OracleExample, Any, int]], tables: Sequence[dict[str, float]], source: str,
            domains: Sequence[str], config: RouterConfig, done: dict[str, OracleRecord]) -> None:
    """Turn a batch's loss tables into decided records in ``done``."""
    for (e, _, n), table in zip(chunk, tables):
        rec = OracleRecord(
            example_id=e.example_id,
            domain=e.domain,
            labels=list(e.labels),
            content_sha=e.content_sha,
            n_tokens=int(n),
            base_loss=table[BASE_KEY],
            losses={k: v for k, v in table.items() if k != BASE_KEY},
        )
        done[e.example_id] = rec.apply(decide(rec.losses, domains, config, e.labels))
        logger.debug("oracle[%s] %s route=[%s] base=%.3f empty=%.3f best=%.3f", source, e.example_id[:12],
                     ", ".join(rec.route), rec.base_loss, rec.empty_loss, rec.best_loss)


def run_oracle_on_stacks(
    bs: Any,
    tokenizer: Any,
    examples: Sequence[OracleExample],
    config: RouterConfig,
    *,
    cache_dir: str | os.PathLike | None = None,
    stack_signature: str | None = None,
    progress: bool = True,
    bf16: bool = False,
    mixed_batches: bool = True,
    shard: bool = False,
) -> OracleResult:
    """:func:`run_oracle` on a :class:`BrainStacks` model over its frozen domains.

    ``stack_signature`` defaults to :func:`stacks_signature` of ``bs`` and ``tokenizer``. The model is put
    in eval mode for the run and restored afterwards. ``bf16`` runs the forwards under bf16 autocast (use the
    precision the run's stacks were evaluated in, so oracle losses and SFT validation losses agree).
    ``shard``: split the batches over the processes of ``torch.distributed`` (collective; see the module docstring).
    """
    signature = stack_signature or stacks_signature(bs, tokenizer)
    backend = StackOracleBackend(bs, tokenizer, config.oracle_max_length, bf16=bf16)
    with eval_mode(bs.model):
        return run_oracle(examples, config, backend=backend, domains=list(bs.domains), stack_signature=signature,
                          cache_dir=cache_dir, progress=progress, bf16=bf16, mixed_batches=mixed_batches,
                          shard=shard)
