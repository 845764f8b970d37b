"""Benchmarks of a run through lm-evaluation-harness 0.4.13, with the stacks on the live model.

:func:`brainstacks_lm` wraps a :class:`~brainstacks_hooks.inference.routed_model.RoutedModel` in a subclass of
lm-eval's ``HFLM`` built on the *same* model object (``HFLM(pretrained=<nn.Module>)`` keeps it: no reload, no
copy, ``lm_eval==0.4.13/models/huggingface.py:218-231``). Every request lm-eval sends runs under one mode:

============== =====================================================================================
mode           stacks computed for every request
============== =====================================================================================
``base``       none (the bare base model; equal to plain ``HFLM`` on the model without hooks)
``ungated``    every frozen stack at weight 1
``prefix:D``   the stacks of every domain up to D in training order
``isolated:D`` only D's stacks
``routed``     each request's document is routed once by the run's meta-router (route text = the
               request's context string, shared by all choices of a question, so lm-eval's
               one-token prefix reuse keeps working); see *mixed-route batches* below
============== =====================================================================================

**Mixed-route batches** (routed mode, ``mixed_batches=True``, the default). The stacks of the union of all
routes of a call are attached once (``StackStore.activate``), lm-eval batches the requests as it always does
(its ``Collator`` sorts by length and merges requests sharing ``context + continuation[:-1]``), and every
forward runs each row under its own request's route (``stacks.routed_rows``; one route for the whole batch:
``stacks.routed``). The rows are lined up with their requests by tokens, not by position:
``_loglikelihood_tokens`` maps every request's model input (``(context + continuation)[-(max_length+1):][:-1]``,
trailing pad zeros stripped) to its route, and ``_model_call`` looks each batch row up (``pad_and_concat``
right-pads with zeros, ``models/utils_hf.py``). Two requests with the same input but different routes
would share one forward in lm-eval's one-token cache; such a call (or one whose union of stacks does not fit
the store budget) runs grouped instead. Generation lines rows up through ``tok_batch_encode``, which
receives each chunk's context strings right before its ``_model_generate``. With ``mixed_batches=False``
requests run grouped by route: one parent ``HFLM`` call per distinct route under
``stacks.routed(weights)``, answers put back in lm-eval's order.

The batch size is fixed (``"auto"`` is refused: on CPU it probes ``max_batch_size`` x ``max_length`` token
forwards), ``max_length`` is set, and log-softmax runs in fp32 for half-precision models (``softmax_dtype``,
``huggingface.py:1503-1507``).

lm-eval's result cache (``use_cache`` / ``CachingLM``, keyed on the request strings only,
``api/model.py:275-350``) is never used here: it cannot tell modes, stacks or routers apart, so a cached
answer of one mode would silently be reported for another. :func:`evaluate_run` calls
``lm_eval.evaluator.evaluate`` directly, which has no result cache, with ``cache_requests=False``.

:func:`evaluate_run` evaluates a run directory and writes ``RUN_DIR/eval/<mode>/``: ``results.json``
(metrics with stderr, library versions, tasks, data sha256, stack and router identity, routes log),
``samples_<task>.jsonl`` (lm-eval's per-document samples) and ``routes.jsonl`` (routed mode: one line per
document). lm-eval is optional: ``pip install 'brainstacks-hooks[eval]'``.

**Several processes** (``torchrun`` / ``accelerate launch``): lm-eval deals each task's documents out by rank
(``lm.rank`` / ``lm.world_size``, ``evaluator.py:540-600``), every process routes and scores its share, lm-eval
gathers the metrics and samples on the main process and :func:`evaluate_run` gathers the routes; the main process
alone writes. lm-eval pads a lighter process with copies of its last request (even batches for DDP): those extra
forwards are counted in ``route_batches`` and trimmed from the samples' ``resps``; the metrics never see them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailable, ConfigError, StackStateError
from ..utils import distributed
from ..utils.logging import get_logger, log_on_main_process_only

logger = get_logger(__name__)

LM_EVAL_INSTALL_HINT = "pip install 'brainstacks-hooks[eval]'"
#: Modes of :func:`brainstacks_lm` / :func:`evaluate_run` (``D`` is a domain of the run).
EVAL_MODES = ("base", "ungated", "prefix:D", "isolated:D", "routed")
#: Longest sequence an evaluation feeds the model by default (SmolLM2's own evaluations use 2048).
DEFAULT_MAX_LENGTH = 2048
RESULTS_FILE = "results.json"
ROUTES_FILE = "routes.jsonl"
RESULTS_FORMAT = 1

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "EVAL_MODES",
    "LM_EVAL_INSTALL_HINT",
    "RESULTS_FILE",
    "brainstacks_lm",
    "brainstacks_lm_class",
    "evaluate_run",
    "metrics_table",
    "require_lm_eval",
    "seeded_samples",
]


def require_lm_eval() -> Any:
    """Import lm-eval's ``HFLM`` (and its evaluator); raise :class:`BackendUnavailable` with the install hint.

    Raises:
        BackendUnavailable: lm-eval is not installed or fails to import.
    """
    try:
        import lm_eval.evaluator  # noqa: F401
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise BackendUnavailable(
            f"lm-eval is not installed or failed to import ({exc}): {LM_EVAL_INSTALL_HINT}") from exc
    return HFLM


def context_hash(text: str) -> str:
    """Short sha256 of a request context (the key of the routes log)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer (got {batch_size!r}); 'auto' is not supported: "
                          "it probes max_batch_size x max_length token forwards")
    return batch_size


def _parse_mode(mode: str, domains: Sequence[str]):
    """``None`` for routed, else the :class:`Mode` (checked against ``domains``) and its weights by domain."""
    from ..stacks.modes import Mode, domain_weights

    if mode == "routed":
        return None, None
    parsed = Mode.parse(mode)
    if parsed.kind not in ("base_only", "ungated", "prefix", "isolated"):
        raise ConfigError(f"unknown evaluation mode {mode!r}; valid: {', '.join(EVAL_MODES)}")
    return parsed, domain_weights(parsed, list(domains))


RouteKey = tuple[tuple[str, float], ...]


def _strip_pad(tokens: Sequence[int]) -> tuple[int, ...]:
    """``tokens`` without trailing zeros: lm-eval right-pads loglikelihood batches with 0 (``pad_and_concat``)."""
    end = len(tokens)
    while end and tokens[end - 1] == 0:
        end -= 1
    return tuple(tokens[:end])


def _grouped(keys: Sequence[RouteKey], run_group: Callable[[RouteKey, list[int]], list[Any]]) -> list[Any]:
    """Run the items of each distinct route together (``run_group(key, indices)`` -> their answers, in order);
    the answers are put back in the order of ``keys``."""
    groups: dict[RouteKey, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    out: list[Any] = [None] * len(keys)
    for key, idx in groups.items():
        for i, a in zip(idx, run_group(key, idx), strict=True):
            out[i] = a
    return out


def _union(keys: Sequence[RouteKey]) -> dict[str, float]:
    """Every domain of ``keys`` at its largest weight (the stacks a mixed-route call must have attached)."""
    out: dict[str, float] = {}
    for key in keys:
        for d, w in key:
            out[d] = max(out.get(d, 0.0), w)
    return out


_LM_CLASS: type | None = None


def brainstacks_lm_class() -> type:
    """The ``HFLM`` subclass (built on first use, so lm-eval is imported only when an evaluation runs).

    Raises:
        BackendUnavailable: lm-eval is missing (with ``pip install 'brainstacks-hooks[eval]'``).
    """
    hflm = require_lm_eval()  # checked on every call, also when the class is already built
    global _LM_CLASS
    if _LM_CLASS is not None:
        return _LM_CLASS

    import torch
    from tqdm.auto import tqdm

    class BrainstacksLM(hflm):  # type: ignore[misc, valid-type]
        """lm-eval ``HFLM`` on a :class:`RoutedModel`'s live model, every request under one evaluation mode.

        Attributes:
            routes: ``{context hash: {"weights", "gated_on", "gap"}}`` of every routed context (routed mode).
            request_routes: ``{(task, doc_id): context hash}`` of every routed request's document.
        """

        def __init__(self, rm: Any, mode: str = "base", *, batch_size: int = 8, max_length: int | None = None,
                     softmax_dtype: Any = None, mixed_batches: bool = True, **kwargs: Any) -> None:
            batch_size = _check_batch_size(batch_size)
            domains = rm.store.domains if rm.store is not None else []
            self.bs_mode_name = mode
            self.bs_mode, self.bs_weights = _parse_mode(mode, domains)
            self.rm = rm
            model = rm.model
            if softmax_dtype is None and getattr(model, "dtype", None) in (torch.float16, torch.bfloat16):
                softmax_dtype = torch.float32  # log-softmax over the vocabulary in fp32, not in half precision
            if max_length is None:
                max_length = min(DEFAULT_MAX_LENGTH,
                                 int(getattr(model.config, "max_position_embeddings", DEFAULT_MAX_LENGTH)))
            super().__init__(pretrained=model, tokenizer=rm.tokenizer, backend="causal", batch_size=batch_size,
                             max_length=max_length, softmax_dtype=softmax_dtype, **kwargs)
            self.routes: dict[str, dict[str, Any]] = {}
            self.request_routes: dict[tuple[str | None, int | None], str] = {}
            self.mixed_batches = bool(mixed_batches)
            #: forwards / generate calls of routed mode: ``mixed`` (several routes in one batch), ``single``
            #: (one route in the batch), ``grouped_calls`` (lm-eval calls that ran grouped by route)
            self.route_batches = {"mixed": 0, "single": 0, "grouped_calls": 0}
            self._context_routes: dict[str, RouteKey] | None = None  # context hash -> route, in a mixed call
            self._row_routes: dict[tuple[int, ...], RouteKey] | None = None  # model input -> route
            self._gen_rows: list[RouteKey] | None = None  # routes of the chunk tok_batch_encode just encoded
            if distributed.is_initialized():  # torchrun / accelerate launch: lm-eval deals the documents out by rank
                self._rank, self._world_size = distributed.rank(), distributed.world_size()

        # --------------------------------------------------- several processes
        # HFLM's own versions go through the Accelerator it makes on the string path only; a live model has none.
        def all_gather(self, tensor: Any) -> Any:
            if self.world_size <= 1:
                return tensor
            home = tensor.device
            if torch.distributed.get_backend() == "nccl" and home.type != "cuda":  # nccl gathers CUDA tensors only
                tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
            torch.distributed.all_gather(parts, tensor.contiguous())
            return torch.cat([p.reshape(1) if p.dim() == 0 else p for p in parts]).to(home)  # as accelerate's gather

        def barrier(self) -> None:
            distributed.barrier()

        # ---------------------------------------------------------------- modes
        def _using(self, mode: Any):
            return self.rm.stacks.using(mode) if self.rm.stacks is not None else contextlib.nullcontext()

        def _route_keys(self, requests: Sequence[Any]) -> list[tuple[tuple[str, float], ...]]:
            """The route of every request (its context routed once per distinct context), as a sortable key."""
            texts = [str(r.args[0]) for r in requests]
            hashes = [context_hash(t) for t in texts]
            new: dict[str, str] = {}
            for h, t in zip(hashes, texts, strict=True):
                if h not in self.routes and h not in new:
                    new[h] = t
            if new:
                decided = self.rm.route(list(new.values()))
                if len(decided) != len(new):
                    raise ConfigError(f"the router returned {len(decided)} routes for {len(new)} contexts")
                for h, r in zip(new, decided, strict=True):
                    self.routes[h] = {"weights": {d: float(w) for d, w in r.weights.items()},
                                      "gated_on": list(getattr(r, "gated_on", sorted(r.weights))),
                                      "gap": bool(getattr(r, "gap", False))}
            for r, h in zip(requests, hashes, strict=True):
                self.request_routes.setdefault((r.task_name, r.doc_id), h)
            return [tuple(sorted((d, w) for d, w in self.routes[h]["weights"].items() if w > 0)) for h in hashes]

        def _run(self, method: Callable[..., list[Any]], requests: list[Any], disable_tqdm: bool,
                 mixed: bool = False) -> list[Any]:
            if not requests:
                return []
            if self.bs_mode is not None:
                if self.rm.store is not None:
                    self.rm.store.activate(self.bs_weights, set_mode=False)
                with self._using(self.bs_mode):
                    return method(requests, disable_tqdm=disable_tqdm)
            keys = self._route_keys(requests)
            if mixed and self.mixed_batches:
                from ..inference.records import StackBudgetError

                try:
                    self.rm.store.activate(_union(keys), set_mode=False)
                except StackBudgetError as exc:
                    logger.warning("mixed-route batches off for this call (%s): running grouped by route", exc)
                else:
                    self._context_routes = {context_hash(str(r.args[0])): k for r, k in zip(requests, keys,
                                                                                            strict=True)}
                    try:
                        return method(requests, disable_tqdm=disable_tqdm)
                    finally:
                        self._context_routes = self._row_routes = self._gen_rows = None
            self.route_batches["grouped_calls"] += 1
            bar = tqdm(total=len(requests), disable=disable_tqdm, desc=f"{method.__name__} ({len(set(keys))} routes)")

            def run_group(key: RouteKey, idx: list[int]) -> list[Any]:
                report = self.rm.store.activate(dict(key), set_mode=False)
                with self._using(report.mode):
                    answers = method([requests[i] for i in idx], disable_tqdm=True)
                bar.update(len(idx))
                return answers

            try:
                return _grouped(keys, run_group)
            finally:
                bar.close()

        # ---------------------------------------------------------------- mixed-route batches
        def _batch_mode(self, rows: Sequence[RouteKey]) -> Any:
            """One route for the batch (``stacks.routed``) or one per row (``stacks.routed_rows``)."""
            from ..stacks.modes import Mode

            if len(set(rows)) == 1:
                self.route_batches["single"] += 1
                return Mode.routed(dict(rows[0]))
            self.route_batches["mixed"] += 1
            return Mode.routed_rows([dict(k) for k in rows])

        def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False,
                                  override_bs: int | None = None) -> list[tuple[float, bool]]:
            routes = self._context_routes
            if routes is None:
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            table: dict[tuple[int, ...], RouteKey] = {}
            clash = False
            for strings, ctx, cont in requests:
                key = routes[context_hash(str(strings[0]))]
                inp = _strip_pad((ctx + cont)[-(self.max_length + 1):][:-1])  # the row lm-eval feeds the model
                clash |= table.setdefault(inp, key) != key
            if not clash:
                self._row_routes = table
                try:
                    return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
                finally:
                    self._row_routes = None
            # the same model input under two routes: lm-eval would compute it once; run grouped by route
            logger.warning("two requests share a model input but not a route: this call runs grouped by route")
            self.route_batches["grouped_calls"] += 1

            def run_group(key: RouteKey, idx: list[int]) -> list[Any]:
                with self._using(self._batch_mode([key])):
                    return super(BrainstacksLM, self)._loglikelihood_tokens(
                        [requests[i] for i in idx], disable_tqdm=True, override_bs=override_bs)

            return _grouped([routes[context_hash(str(strings[0]))] for strings, _, _ in requests], run_group)

        def _model_call(self, inps: Any, attn_mask: Any = None, labels: Any = None) -> Any:
            table = self._row_routes
            if table is None:
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            rows = [table.get(_strip_pad(r)) for r in inps.tolist()]  # inps: [B, L] right-padded with 0
            if any(k is None for k in rows):
                raise StackStateError("a loglikelihood batch row matches no request of the call (has lm-eval's "
                                      "batching changed?); evaluate with mixed_batches=False")
            with self._using(self._batch_mode(rows)):
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

        def tok_batch_encode(self, strings: list[str], padding_side: str = "left",
                             left_truncate_len: int | None = None, truncation: bool = False) -> Any:
            if self._context_routes is not None:  # generate_until: the contexts of the chunk about to generate
                try:
                    self._gen_rows = [self._context_routes[context_hash(str(t))] for t in strings]
                except KeyError:
                    raise StackStateError("a generation batch holds a context of no request of the call (has "
                                          "lm-eval's batching changed?); evaluate with mixed_batches=False") from None
            return super().tok_batch_encode(strings, padding_side=padding_side, left_truncate_len=left_truncate_len,
                                            truncation=truncation)

        # ---------------------------------------------------------------- lm-eval entry points
        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return self._run(super().loglikelihood, requests, disable_tqdm, mixed=True)

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            return self._run(super().loglikelihood_rolling, requests, disable_tqdm)

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            return self._run(super().generate_until, requests, disable_tqdm, mixed=True)

        def _model_generate(self, context: Any, max_length: int, stop: list[str], **generation_kwargs: Any) -> Any:
            rows, self._gen_rows = self._gen_rows, None
            if rows is None:
                return self._generate(context, max_length, stop, **generation_kwargs)
            if len(rows) != context.shape[0]:
                raise StackStateError(f"{len(rows)} routes for a generation batch of {context.shape[0]} rows")
            with self._using(self._batch_mode(rows)):
                return self._generate(context, max_length, stop, **generation_kwargs)

        def _generate(self, context: Any, max_length: int, stop: list[str], **generation_kwargs: Any) -> Any:
            # lm-eval hard-codes use_cache=True (huggingface.py:1187); Unsloth's fast decode would skip the hooks
            if getattr(self.rm, "use_cache", True):
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
            model = self.model
            generate = model.generate
            own = model.__dict__.get("generate")  # Unsloth patches generate on the instance: put it back after

            def no_cache_generate(*args: Any, **kw: Any) -> Any:
                kw["use_cache"] = False
                return generate(*args, **kw)

            model.generate = no_cache_generate
            try:
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
            finally:
                if own is not None:
                    model.generate = own
                else:
                    del model.generate

        def get_model_info(self) -> dict[str, Any]:
            # HFLM's asks the hub for the model's sha (huggingface.py:1761-1777): nothing to ask for a live model
            return {"model_num_parameters": sum(p.numel() for p in self._model.parameters()),
                    "model_dtype": str(getattr(self._model, "dtype", "")), "mode": self.bs_mode_name}

    _LM_CLASS = BrainstacksLM
    return _LM_CLASS


def brainstacks_lm(rm: Any, mode: str = "base", *, batch_size: int = 8, max_length: int | None = None,
                   mixed_batches: bool = True, **kwargs: Any) -> Any:
    """An lm-eval ``HFLM`` on ``rm.model`` (the live object) running every request under ``mode``.

    With an initialised ``torch.distributed`` process group the object takes the process's rank and the world
    size, so lm-eval deals the documents out and its evaluation becomes collective: every process must run it.

    Args:
        rm: a :class:`~brainstacks_hooks.inference.routed_model.RoutedModel` (``model``, ``tokenizer``,
            ``stacks``, ``store``; ``route`` for routed mode).
        mode: ``base``, ``ungated``, ``prefix:D``, ``isolated:D`` or ``routed``.
        batch_size: fixed batch size (never ``"auto"``).
        max_length: longest input (default: ``min(2048, max_position_embeddings)``).
        mixed_batches: routed mode: each batch row under its own request's route (one lm-eval pass over all
            requests, the union of the routes' stacks attached); ``False``: one pass per distinct route.
        kwargs: more ``HFLM`` arguments (``softmax_dtype`` defaults to fp32 for half-precision models).

    Raises:
        BackendUnavailable: lm-eval is missing. ConfigError: bad mode, domain or batch size.
    """
    return brainstacks_lm_class()(rm, mode, batch_size=batch_size, max_length=max_length,
                                  mixed_batches=mixed_batches, **kwargs)


# ----------------------------------------------------------------------------------------------- evaluate_run
def seeded_samples(n_docs: dict[str, int], limit: int | float, seed: int) -> dict[str, list[int]]:
    """A seeded subset of document indices per task, for lm-eval's ``samples`` argument.

    ``limit`` >= 1 takes that many documents (all when the task has fewer); ``0 < limit < 1`` a fraction
    (rounded up). Task ``t`` draws with ``random.Random(f"{seed}:{t}")``, so a subset depends only on the
    seed, the task name and its document count. Indices are sorted: lm-eval maps a sample's position back to
    its index in the order given (``evaluator.py:629-637``) while it iterates documents in file order.
    """
    if limit <= 0:
        raise ConfigError(f"limit must be > 0 (got {limit})")
    out = {}
    for task, n in n_docs.items():
        k = math.ceil(limit * n) if limit < 1 else min(int(limit), n)
        out[task] = sorted(random.Random(f"{seed}:{task}").sample(range(n), k))
    return out


def _versions() -> dict[str, str]:
    from ..run_dir import library_versions

    out = library_versions()
    for name in ("lm-eval", "tokenizers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _jsonable(obj: Any) -> Any:
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(obj, default=handle_non_serializable))


def metrics_table(results: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{task: {metric: {"value", "stderr"}}}`` from lm-eval's ``results`` block.

    lm-eval keys are ``<metric>,<filter>`` (``acc,none``, ``exact_match,strict-match``); the metric is named
    ``acc`` for the ``none`` filter and ``exact_match,strict-match`` otherwise. A stderr lm-eval could not
    compute (``"N/A"``) is ``None``.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for task, res in results.items():
        rows: dict[str, dict[str, Any]] = {}
        for key, value in res.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            stderr = res.get(f"{metric}_stderr,{filt}")
            name = metric if filt == "none" else f"{metric},{filt}"
            rows[name] = {"value": _float_or_none(value), "stderr": _float_or_none(stderr)}
        out[task] = rows
    return out


def _float_or_none(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _write_jsonl(path: Path, rows: list[Any]) -> None:
    from lm_eval.utils import handle_non_serializable

    from ..utils.io import atomic_write_bytes

    text = "".join(json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_bytes(path, text.encode("utf-8"))


def _router_identity(run: Any) -> dict[str, Any] | None:
    from ..utils.io import read_json, sha256_file

    path = run.router_dir / "router.json"
    if not path.is_file():
        return None
    meta = read_json(path)
    return {"weights_sha256": meta.get("sha256"), "router_json_sha256": sha256_file(path),
            "domains": meta.get("domains"), "trained_on": meta.get("stacks")}


def evaluate_run(run_dir: str | os.PathLike, tasks: Sequence[str], mode: str, limit: int | float | None = None,
                 data_dir: str | os.PathLike | None = None, batch_size: int = 8, seed: int = 1234,
                 out_dir: str | os.PathLike | None = None, max_length: int | None = None,
                 rm: Any = None, mixed_batches: bool = True) -> dict[str, Any]:
    """Evaluate a run on the shipped ``bs_*`` tasks under ``mode`` and write ``<out_dir>/`` (default
    ``RUN_DIR/eval/<mode>/``): ``results.json``, ``samples_<task>.jsonl`` and, routed, ``routes.jsonl``.

    Args:
        run_dir: the run directory (its base model, stacks and, for ``routed``, router).
        tasks: task names (``bs_arc_easy``, ... ``bs_gsm8k``; see ``brainstacks_hooks.evaluation.tasks``).
        mode: ``base``, ``ungated``, ``prefix:D``, ``isolated:D`` or ``routed``.
        limit: a seeded subset per task (:func:`seeded_samples`): ``N`` documents or a fraction; ``None``: all.
        data_dir: the directory holding ``eval/*.jsonl`` (else ``$BRAINSTACKS_DATA_DIR``).
        batch_size: fixed lm-eval batch size.
        seed: the subset seed and the python / numpy / torch seeds set before evaluating.
        out_dir: where to write (default ``RUN_DIR/eval/<mode>``, ``:`` in the mode replaced by ``-``).
        max_length: longest input (default ``min(2048, max_position_embeddings)``).
        rm: an already built :class:`RoutedModel` of this run (default: built from the run).
        mixed_batches: routed mode: mixed-route batches (default) or one lm-eval pass per distinct route
            (``False``); see the module docstring. The answers agree up to float rounding.

    Returns:
        The ``results.json`` dictionary.

    Raises:
        BackendUnavailable: lm-eval missing. DataError: data directory or a task file missing or bad.
        ConfigError: unknown task, mode or domain. RunDirError: not a run directory.
    """
    from .tasks import TASK_NAMES, force_hf_offline, task_file_path

    force_hf_offline()  # before the model, tokenizer or datasets are touched
    require_lm_eval()
    tasks = list(dict.fromkeys(tasks))
    unknown = [t for t in tasks if t not in TASK_NAMES]
    if not tasks or unknown:
        raise ConfigError(f"unknown task(s) {unknown or '(none given)'}; shipped tasks: {', '.join(TASK_NAMES)}")
    _check_batch_size(batch_size)

    import numpy as np
    import torch
    from lm_eval import evaluator

    from ..inference.routed_model import RoutedModel
    from ..run_dir import RunDir
    from ..utils.io import sha256_file
    from .tasks import task_manager

    run = RunDir.open(run_dir)
    _parse_mode(mode, run.manifest.domain_order)  # a bad mode or domain fails before the model loads
    distributed.init_distributed()  # torchrun / accelerate launch: before the model loads (a GPU per process)
    log_on_main_process_only()
    tm = task_manager(data_dir)  # checks the data directory
    data_files = {}
    for t in tasks:
        path = task_file_path(t, data_dir)
        data_files[t] = {"file": str(path), "sha256": sha256_file(path) if path.is_file() else None}
    t0 = time.perf_counter()
    # the router evaluated, identified before it loads (not when results are written: it may be retrained meanwhile)
    router_identity = _router_identity(run) if mode == "routed" else None
    if rm is None:
        rm = RoutedModel.from_run(run, require_router=mode == "routed")
    loaded_sha = (getattr(rm, "router_meta", None) or {}).get("sha256")
    if router_identity is not None and loaded_sha and loaded_sha != router_identity["weights_sha256"]:
        logger.warning("the router changed on disk while it loaded: recording the loaded weights' sha256")
        router_identity = {**router_identity, "weights_sha256": loaded_sha, "router_json_sha256": None}
    lm = brainstacks_lm(rm, mode, batch_size=batch_size, max_length=max_length, mixed_batches=mixed_batches)
    loaded = tm.load(tasks)
    for task_obj in loaded["tasks"].values():  # what simple_evaluate does per task (evaluator.py:326-330)
        if task_obj.get_config("num_fewshot") is None:
            task_obj.set_config(key="num_fewshot", value=0)
        task_obj.set_fewshot_seed(seed=seed)
    samples = None
    n_docs = {name: len(t.eval_docs) for name, t in loaded["tasks"].items()}
    if limit is not None:
        samples = seeded_samples(n_docs, limit, seed)
        n_docs = {name: len(ids) for name, ids in samples.items()}
    few = {name: n for name, n in n_docs.items() if n < distributed.world_size()}
    if few:  # a process without documents would leave lm-eval's collectives unmatched
        raise ConfigError(f"{distributed.world_size()} processes but only {few} documents per task: every process "
                          "needs one; raise --limit or launch fewer processes")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    # no use_cache / CachingLM: lm-eval's result cache ignores mode, stacks and router (see the module docstring)
    res = evaluator.evaluate(lm=lm, task_dict=loaded, limit=None, samples=samples, cache_requests=False,
                             log_samples=True)
    eval_s = time.perf_counter() - t1
    # several processes: lm-eval gathered the metrics and samples on the main process (res is None elsewhere);
    # the routes each process decided for its documents are gathered here
    routes, request_routes, route_batches = _gather_routes(lm)
    out = Path(out_dir) if out_dir is not None else run.eval_dir / mode.replace(":", "-")
    record = distributed.computed_on_main(
        _write_results, out, res, run=run, mode=mode, tasks=tasks, limit=limit, seed=seed, samples=samples,
        batch_size=batch_size, lm=lm, rm=rm, data_files=data_files, router=router_identity, routes=routes,
        request_routes=request_routes, route_batches=route_batches, mixed_batches=mixed_batches,
        wall_time_s={"load": round(load_s, 3), "evaluate": round(eval_s, 3)})
    logger.info("evaluation %s written to %s (%.1f s)", mode, out / RESULTS_FILE, eval_s)
    return record


def _gather_routes(lm: Any) -> tuple[dict[str, Any], dict[tuple[Any, Any], str], dict[str, int]]:
    """The routes, request routes and route-batch counts of every process (this process's alone when not
    distributed), merged: each process routed the documents lm-eval dealt to it."""
    parts = distributed.all_gather_object((lm.routes, list(lm.request_routes.items()), lm.route_batches))
    routes: dict[str, Any] = {}
    request_routes: dict[tuple[Any, Any], str] = {}
    batches = dict.fromkeys(lm.route_batches, 0)
    for theirs, requests, counts in parts:
        routes.update(theirs)
        request_routes.update((tuple(k), h) for k, h in requests)
        for k, n in counts.items():
            batches[k] = batches.get(k, 0) + n
    return routes, request_routes, batches


def _write_results(out: Path, res: dict[str, Any], *, run: Any, mode: str, tasks: list[str], limit: Any, seed: int,
                   samples: dict[str, list[int]] | None, batch_size: int, lm: Any, rm: Any,
                   data_files: dict[str, Any], router: dict[str, Any] | None, routes: dict[str, Any],
                   request_routes: dict[tuple[Any, Any], str], route_batches: dict[str, int], mixed_batches: bool,
                   wall_time_s: dict[str, float]) -> dict[str, Any]:
    """Write ``results.json``, the samples and the routes log of :func:`evaluate_run` (the main process)."""
    from ..utils.io import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    logged = res.pop("samples", {}) or {}
    for name, rows in logged.items():  # per filter in document order (several processes: gathered rank by rank)
        filters = {f: i for i, f in reversed(list(enumerate(r.get("filter") for r in rows)))}
        rows = sorted(rows, key=lambda r: (filters[r.get("filter")], r.get("doc_id") is None, r.get("doc_id") or 0))
        repeats = int(((res.get("configs") or {}).get(name) or {}).get("repeats") or 1)
        for r in rows:  # lm-eval's padding copies (several processes) appended answers to a real request
            r["resps"] = [list(x)[:repeats] for x in r.get("resps") or []]
        _write_jsonl(out / f"samples_{name}.jsonl", rows)
    routes_log = []
    if mode == "routed":
        for (task, doc_id), h in sorted(request_routes.items(), key=lambda kv: (str(kv[0][0]), kv[0][1] or 0)):
            true_id = samples[task][doc_id] if samples is not None and task in samples and doc_id is not None \
                else doc_id
            routes_log.append({"task": task, "doc_id": true_id, "context_sha256": h, **routes[h]})
        _write_jsonl(out / ROUTES_FILE, routes_log)
    record: dict[str, Any] = {
        "format_version": RESULTS_FORMAT,
        "run_dir": str(run.path),
        "mode": mode,
        "tasks": tasks,
        "limit": limit,
        "seed": seed,
        "samples": samples,
        "batch_size": batch_size,
        "processes": distributed.world_size(),
        "max_length": lm.max_length,
        "softmax_dtype": str(lm.softmax_dtype) if lm.softmax_dtype is not None else None,
        "model_dtype": str(getattr(rm.model, "dtype", "")),
        "versions": _versions(),
        "data_files": data_files,
        "stack_identity": run.stack_identity(),
        "router": router,
        "metrics": metrics_table(res.get("results", {})),
        "results": res.get("results", {}),
        "n_samples": res.get("n-samples", {}),
        "n_shot": res.get("n-shot", {}),
        "task_versions": res.get("versions", {}),
        "task_configs": res.get("configs", {}),
        "routes": {h: r["weights"] for h, r in routes.items()} if mode == "routed" else None,
        "mixed_batches": mixed_batches if mode == "routed" else None,
        "route_batches": route_batches if mode == "routed" else None,
        "files": {"samples": {n: f"samples_{n}.jsonl" for n in logged},
                  "routes": ROUTES_FILE if mode == "routed" else None},
        "wall_time_s": wall_time_s,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    record = _jsonable(record)
    atomic_write_json(out / RESULTS_FILE, record)
    return record
