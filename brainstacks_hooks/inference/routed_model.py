"""``RoutedModel``: prompt -> shared formatting -> router -> load stacks -> generate (the Superposition LLM).

Stacks stay on disk in a :class:`~brainstacks_hooks.inference.store.StackStore`; each prompt is routed
with the meta-router (base-only features, chat floor, gate threshold) and only the gated-on domains'
stacks are loaded and computed. Comparison modes (``ungated``, ``base``, ``prefix:DOMAIN``,
``isolated:DOMAIN``) go through the same store.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..data.formatting import encode_prompt_batch
from ..errors import ConfigError
from ..router.gating import Route, route_prompts
from ..router.serialization import load_router
from ..router.serving import router_fingerprint
from ..run_dir import RunDir
from ..stacks.brainstacks import BrainStacks
from ..stacks.modes import Mode, domain_weights
from ..utils.logging import get_logger
from .store import StackStore

logger = get_logger(__name__)


@dataclass
class GenerationSettings:
    """The usual generation knobs (greedy by default); ``min_new_tokens`` > 0 suppresses EOS until then."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.0


@dataclass
class Explain:
    """Why a prompt got its output: route, stacks used, cache behaviour, timings (ms)."""

    mode: str
    weights: dict[str, float]
    scores: dict[str, float]
    gated_on: list[str]
    gap: bool
    stacks_used: list[str]
    cache_hits: list[str]
    loaded: list[str]
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Generation:
    """One prompt's output and its explanation."""

    prompt: str
    text: str
    explain: Explain
    new_tokens: int = 0


class RoutedModel:
    """A base model, its stacks on disk, the meta-router and generation, in one object.

    Build it with :meth:`from_run` on a run directory (``manifest.json``, ``stacks/``, ``router/``).
    """

    def __init__(self, model: Any, tokenizer: Any, stacks: BrainStacks, store: StackStore,
                 router: Any = None, router_meta: dict[str, Any] | None = None) -> None:
        self.model, self.tokenizer, self.stacks, self.store = model, tokenizer, stacks, store
        self.router, self.router_meta = router, router_meta
        self.use_cache = getattr(model, "_brainstacks_backend", None) != "unsloth"  # Unsloth fast decode skips hooks

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike | RunDir, *, budget_bytes: int | str | None = "auto",
                 model: Any = None, tokenizer: Any = None, require_router: bool = False,
                 allow_stack_mismatch: bool = False) -> RoutedModel:
        """Load the run's base model, a stack store on its ``stacks/`` and its router (bound to those stacks).

        ``budget_bytes`` is the store's device budget (``"auto"``: see
        :func:`~brainstacks_hooks.inference.store.default_budget_bytes`; ``None``: unlimited).

        Raises:
            RunDirError: ``run_dir`` is not a run directory (or of the old layout).
            StackLoadError: the router was trained on other stacks (unless ``allow_stack_mismatch``).
            ConfigError: ``require_router`` and the run has no router.
        """
        run = run_dir if isinstance(run_dir, RunDir) else RunDir.open(run_dir)
        if model is None:
            model, tokenizer = run.load_base()
        model.eval()
        router = meta = None
        if (run.router_dir / "router.json").is_file():  # checked before hooks are attached to the model
            router, meta = load_router(run.router_dir, expected_fingerprint=router_fingerprint(model, run.stack_config),
                                       expected_stacks=run.stack_index().identity(),
                                       allow_stack_mismatch=allow_stack_mismatch)
        elif require_router:
            raise ConfigError(f"{run.router_dir}: no trained router; run `brainstacks router {run.path}` first")
        stacks = BrainStacks.attach(model, run.stack_config)
        store = StackStore(stacks, run.stacks_dir, budget_bytes=budget_bytes)
        return cls(model, tokenizer, stacks, store, router, meta)

    # ------------------------------------------------------------------ routing
    def route(self, prompts: Sequence[str]) -> list[Route]:
        """Router decisions for raw instructions (chat floor and threshold as stored with the router)."""
        if self.router is None:
            raise ConfigError("this RoutedModel has no router; use mode='ungated' or train one")
        return route_prompts(self.stacks, self.tokenizer, self.router, self.router_meta, list(prompts))

    def _weights_for(self, mode: Mode) -> dict[str, float]:
        return domain_weights(mode, self.store.domains)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: str | Sequence[str], mode: str = "routed",
                 settings: GenerationSettings | None = None, streamer: Any = None,
                 mixed_batches: bool = True) -> list[Generation]:
        """Generate for each prompt under ``mode`` (``routed``, ``ungated``, ``base``, ``prefix:D``, ``isolated:D``).

        In ``routed`` mode every prompt gets its own route; with ``mixed_batches`` (default) all prompts run in
        one left-padded batch, each row under its own route (``stacks.routed_rows``); otherwise prompts that
        share a route are generated together and each distinct route is its own batch.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        settings = settings or GenerationSettings()
        routes: list[Route | None]
        route_ms = 0.0
        if mode == "routed":
            t_route = time.perf_counter()
            routes = list(self.route(prompts))
            route_ms = (time.perf_counter() - t_route) * 1000  # tokenise + features + router + gating
            if mixed_batches and len({json.dumps(sorted(r.weights.items())) for r in routes}) > 1:
                plans = [(Mode.routed_rows([r.weights for r in routes]), list(range(len(prompts))))]
            else:
                groups: dict[str, list[int]] = {}
                for i, r in enumerate(routes):
                    groups.setdefault(json.dumps(sorted(r.weights.items())), []).append(i)
                plans = [(Mode.routed(routes[idx[0]].weights), idx) for idx in groups.values()]
        else:
            routes = [None] * len(prompts)
            plans = [(Mode.parse(mode), list(range(len(prompts))))]
        out: list[Generation | None] = [None] * len(prompts)
        for m, idx in plans:
            t0 = time.perf_counter()
            report = self.store.activate(self._weights_for(m), set_mode=False)
            load_ms = (time.perf_counter() - t0) * 1000
            t1 = time.perf_counter()
            run_mode = m if m.kind != "routed" or m.row_weights is not None else report.mode
            with self.stacks.using(run_mode):
                texts, n_new = self._generate_batch([prompts[i] for i in idx], settings, streamer)
            gen_ms = (time.perf_counter() - t1) * 1000
            for j, i in enumerate(idx):
                r = routes[i]
                used = [n for n in report.attached if r is None or n.split("/")[0] in r.weights]
                explain = Explain(
                    mode=m.describe() if r is None else Mode.routed(r.weights).describe(),
                    weights=dict(r.weights) if r else report.weights,
                    scores=dict(r.scores) if r else {}, gated_on=list(r.gated_on) if r else sorted(report.weights),
                    gap=bool(r.gap) if r else False, stacks_used=used,
                    cache_hits=list(report.hits), loaded=list(report.loaded),
                    timings={**({k: round(v, 2) for k, v in r.timings.items()} if r else {}),
                             **({"route_ms": round(route_ms, 2)} if r else {}),
                             "load_ms": round(load_ms, 2), "generate_ms": round(gen_ms, 2)})
                out[i] = Generation(prompts[i], texts[j], explain, n_new[j])
        return [g for g in out if g is not None]

    @torch.no_grad()
    def _generate_batch(self, prompts: list[str], s: GenerationSettings, streamer: Any) -> tuple[list[str], list[int]]:
        tok = self.tokenizer
        enc = encode_prompt_batch(tok, prompts)  # token for token the prompts of training, left-padded
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        kwargs: dict[str, Any] = dict(max_new_tokens=s.max_new_tokens, do_sample=s.do_sample,
                                      repetition_penalty=s.repetition_penalty, pad_token_id=tok.pad_token_id,
                                      use_cache=self.use_cache)
        if s.min_new_tokens > 0:
            kwargs["min_new_tokens"] = s.min_new_tokens
        if s.do_sample:
            kwargs.update(temperature=s.temperature, top_p=s.top_p)
        if streamer is not None:
            kwargs["streamer"] = streamer
        ids = self.model.generate(**enc, **kwargs)
        new = ids[:, enc["input_ids"].shape[1]:]
        eos = {tok.eos_token_id, tok.pad_token_id}
        n_new = [int(sum(1 for t in row.tolist() if t not in eos)) for row in new]
        return tok.batch_decode(new, skip_special_tokens=True), n_new

    def stream(self, prompt: str, mode: str = "routed", settings: GenerationSettings | None = None
               ) -> Iterator[str | Generation]:
        """Yield text pieces as they are generated, then the finished :class:`Generation`."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: list[Generation] = []
        errors: list[BaseException] = []

        def work() -> None:
            try:
                result.extend(self.generate(prompt, mode, settings, streamer))
            except BaseException as e:  # re-raised in the caller's thread below
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if errors:
            raise errors[0]
        yield result[0]
