"""Router input features from the base model (all stacks off), computed once and cached on disk.

Features follow a :class:`~brainstacks_hooks.router.config.FeatureRecipe`::

    ids      = encode_prompt(tokenizer, instruction, input, max_length=seq_len)   # the one prompt format
    hs       = base_model(ids, output_hidden_states=True).hidden_states          # inside bs.base_only()
    features = mid_weight * hs[len(hs) // 2] + last_weight * hs[-1]             # [S, D], fp16 on disk

Prompts are right-padded (so real tokens see the same positions as alone) and padded positions are
zero; the attention mask marks real tokens. The same recipe, stored in the router checkpoint, builds the
features at inference.

**Cache layout** (:class:`FeatureCache`)::

    <cache_dir>/fp-<fingerprint sha256[:16]>_recipe-<recipe sha256[:16]>/
        index.json                       # {prompt key: [chunk, row]}, chunk checksums, fingerprint, recipe
        chunk-<sha256[:16]>.safetensors  # "features" [n, S_chunk, D], "lengths" [n]

* The namespace folder is keyed by the base fingerprint hash and the recipe hash, so a different base
  model or recipe is a miss by construction (old folders are never read; :meth:`FeatureCache.prune`
  removes them).
* A prompt's key is the sha256 of the exact token ids the model sees (after formatting and truncation),
  so a change of chat template or tokenizer is a miss too.
* Checking hit/miss reads only ``index.json``. New prompts are appended as new chunks (a growing prompt
  set never recomputes old prompts); the index is rewritten atomically after each chunk. Concurrent
  writers do not corrupt the cache (atomic writes) but the last index written wins.

**Several processes** (``shard=True`` under ``torchrun``; collective, every process calls it): every process runs
every ``world_size``-th batch of the length-sorted prompts and the batches are gathered back in place
(:func:`~brainstacks_hooks.utils.distributed.map_sharded`), so each batch is the batch one process would run.
With the cache, the main process decides what is missing, writes every chunk (per chunk, after its gather)
and the others then read the same files (a shared filesystem, as for the run directory).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import StackLoadError
from ..loss import eval_mode
from ..utils import distributed
from ..utils.dtypes import DTYPES
from ..utils.io import atomic_write_json, load_safetensors_checked, read_json, save_safetensors_atomic
from ..utils.logging import get_logger
from .config import FeatureRecipe

logger = get_logger(__name__)

FEATURE_CACHE_FORMAT_VERSION = 1

#: A prompt: plain instruction text, an ``(instruction, input)`` pair, or a mapping with those keys.
PromptLike = str | tuple[str, str] | Mapping[str, str]
EncodeFn = Callable[..., Mapping[str, Any]]


def _instruction_input(prompt: PromptLike) -> tuple[str, str]:
    if isinstance(prompt, str):
        return prompt, ""
    if isinstance(prompt, Mapping):
        return str(prompt["instruction"]), str(prompt.get("input", "") or "")
    instruction, inp = prompt
    return str(instruction), str(inp or "")


def _json_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_hash(fingerprint: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a fingerprint dictionary."""
    return _json_hash(json.loads(json.dumps(fingerprint, sort_keys=True, default=str)))


def _stacks_of(model: Any) -> Any:
    """The :class:`BrainStacks` of ``model``: itself, or the one attached to a bare HF model, or None."""
    if hasattr(model, "base_only") and hasattr(model, "model"):
        return model
    return getattr(model, "_brainstacks", None)


def _hf_model(model: Any) -> torch.nn.Module:
    """The HF model inside a :class:`BrainStacks`, or ``model`` itself."""
    bs = _stacks_of(model)
    return bs.model if bs is not None else model


def base_fingerprint(model: Any) -> dict[str, Any]:
    """The base-model fingerprint dictionary of a :class:`BrainStacks` (or of a bare HF model).

    Accepts ``bs.fingerprint_dict()``, a ``bs.fingerprint()`` method, a ``bs.fingerprint`` attribute with
    ``to_dict()``, or, for a bare model, ``{"model": name, "config_hash": ...}``.
    """
    model = _stacks_of(model) or model
    if hasattr(model, "fingerprint_dict"):
        return dict(model.fingerprint_dict())
    fp = getattr(model, "fingerprint", None)
    if callable(fp) and not hasattr(fp, "to_dict"):
        fp = fp()
    if fp is not None:
        return dict(fp.to_dict()) if hasattr(fp, "to_dict") else dict(fp)
    from ..models.fingerprint import config_hash

    hf = _hf_model(model)
    name = getattr(hf.config, "_name_or_path", "") or type(hf).__name__
    return {"model": str(name), "config_hash": config_hash(hf.config)}


def _base_only(model: Any) -> contextlib.AbstractContextManager:
    """``bs.base_only()`` when stacks are attached (also to a bare model passed in), else a no-op."""
    bs = _stacks_of(model)
    return bs.base_only() if bs is not None else contextlib.nullcontext()


def encode_prompts(
    tokenizer: Any, prompts: Sequence[PromptLike], recipe: FeatureRecipe, encode_fn: EncodeFn | None = None
) -> list[list[int]]:
    """Token ids of each prompt exactly as the router sees them (formatted, truncated to ``seq_len``).

    ``encode_fn`` defaults to :func:`brainstacks_hooks.data.formatting.encode_prompt`.
    """
    if encode_fn is None:
        from ..data.formatting import encode_prompt as encode_fn
    out = []
    for p in prompts:
        instruction, inp = _instruction_input(p)
        ids = encode_fn(tokenizer, instruction, inp, max_length=recipe.seq_len)["input_ids"]
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
        if not ids:
            raise ValueError(f"prompt encodes to no tokens: {instruction[:60]!r}")
        out.append(ids[: recipe.seq_len])
    return out


def prompt_key(ids: Sequence[int]) -> str:
    """Cache key of a prompt: sha256 of its token ids (int64 little-endian)."""
    return hashlib.sha256(np.asarray(ids, dtype="<i8").tobytes()).hexdigest()


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None) if tokenizer is not None else None
        if v is not None:
            return int(v)
    return 0


@torch.no_grad()
def features_from_ids(
    model: Any,
    ids: Sequence[Sequence[int]],
    recipe: FeatureRecipe,
    batch_size: int = 8,
    *,
    pad_id: int = 0,
    progress: bool = True,
    shard: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the base model on token ids and mix hidden states per ``recipe``.

    Args:
        model: A :class:`BrainStacks` (run inside ``bs.base_only()``) or a bare HF causal LM.
        ids: Token ids per prompt (already truncated).
        recipe: The feature recipe.
        batch_size: Prompts per forward; prompts are batched by length to minimise padding.
        pad_id: Token used for right padding (masked, never seen by real tokens).
        progress: Show a tqdm bar.
        shard: Split the batches over the processes of ``torch.distributed`` and gather them, so every
            process returns the whole result (collective: every process calls it with the same ``ids``);
            a no-op in a single process.

    Returns:
        ``(features [N, S, D] in recipe.dtype, attention_mask [N, S] int64)`` with ``S`` the longest prompt.
    """
    hf = _hf_model(model)
    n = len(ids)
    if n == 0:
        raise ValueError("no prompts")
    lengths = torch.tensor([len(x) for x in ids])  # [N]
    S = int(lengths.max())
    device = next(hf.parameters()).device
    dtype = DTYPES[recipe.dtype]
    order = sorted(range(n), key=lambda i: -len(ids[i]))  # longest first: little padding per batch
    starts = list(range(0, n, batch_size))
    shard = shard and distributed.world_size() > 1
    bar = tqdm(total=len(distributed.shard_of(starts)) if shard else len(starts), desc="router features",
               disable=not progress)

    def run_batch(start: int) -> tuple[list[int], torch.Tensor]:
        """Rows of one batch and their features ``[b, L, D]`` (on the CPU, in ``recipe.dtype``)."""
        rows = order[start : start + batch_size]
        L = len(ids[rows[0]])
        input_ids = torch.full((len(rows), L), pad_id, dtype=torch.long)  # [b, L]
        mask = torch.zeros(len(rows), L, dtype=torch.long)  # [b, L]
        for j, i in enumerate(rows):
            input_ids[j, : len(ids[i])] = torch.tensor(ids[i])
            mask[j, : len(ids[i])] = 1
        out = hf(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            output_hidden_states=True,
            use_cache=False,
        )
        hs = out.hidden_states  # (n_layers + 1) x [b, L, D]
        mid = len(hs) // 2
        f = recipe.mid_weight * hs[mid].float() + recipe.last_weight * hs[-1].float()  # [b, L, D]
        f = f * mask.to(f.device).unsqueeze(-1)  # zero padded positions
        bar.update(1)
        return rows, f.to("cpu", dtype)

    features: torch.Tensor | None = None
    with eval_mode(hf), _base_only(model):
        # one process: batch by batch (no list of all batches in memory); several: gathered in batch order
        batches = distributed.map_sharded(run_batch, starts) if shard else (run_batch(s) for s in starts)
        for rows, f in batches:
            if features is None:
                features = torch.zeros(n, S, f.shape[-1], dtype=dtype)  # [N, S, D]
            features[rows, : f.shape[1]] = f
    bar.close()
    attention_mask = (torch.arange(S)[None, :] < lengths[:, None]).long()  # [N, S]
    if features is None:  # unreachable: n >= 1
        raise ValueError("no prompts")
    return features, attention_mask


def compute_features(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[PromptLike],
    recipe: FeatureRecipe,
    batch_size: int = 8,
    *,
    encode_fn: EncodeFn | None = None,
    progress: bool = True,
    shard: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router features of ``prompts`` (no cache): ``(features [N, S, D] fp16, attention_mask [N, S])``.

    ``model`` is a :class:`BrainStacks` (features are computed inside ``bs.base_only()``) or a bare HF model.
    ``shard``: split the batches over the processes (collective; see :func:`features_from_ids`).
    """
    ids = encode_prompts(tokenizer, prompts, recipe, encode_fn)
    return features_from_ids(model, ids, recipe, batch_size, pad_id=_pad_id(tokenizer), progress=progress,
                             shard=shard)


class FeatureCache:
    """Disk cache of router features keyed by base fingerprint, feature recipe and prompt tokens.

    See the module docstring for the layout. ``hits`` and ``misses`` count prompts served and computed
    by :meth:`get_or_compute` over the object's lifetime.
    """

    def __init__(self, cache_dir: str | os.PathLike) -> None:
        self.cache_dir = Path(cache_dir)
        self.hits = 0
        self.misses = 0

    # ---- layout
    def namespace(self, fingerprint: Mapping[str, Any], recipe: FeatureRecipe) -> Path:
        """The folder holding features for this base fingerprint and recipe."""
        return self.cache_dir / f"fp-{fingerprint_hash(fingerprint)[:16]}_recipe-{recipe.hash()[:16]}"

    def _read_index(self, ns: Path, fingerprint: Mapping[str, Any], recipe: FeatureRecipe) -> dict[str, Any]:
        path = ns / "index.json"
        if not path.is_file():
            return {
                "format_version": FEATURE_CACHE_FORMAT_VERSION,
                "fingerprint": json.loads(json.dumps(fingerprint, default=str)),
                "fingerprint_hash": fingerprint_hash(fingerprint),
                "recipe": recipe.to_dict(),
                "recipe_hash": recipe.hash(),
                "chunks": {},
                "entries": {},
            }
        index = read_json(path)
        if (
            index.get("format_version") != FEATURE_CACHE_FORMAT_VERSION
            or index.get("fingerprint_hash") != fingerprint_hash(fingerprint)
            or index.get("recipe_hash") != recipe.hash()
        ):
            raise StackLoadError(f"{path}: feature cache index does not match its folder; delete {ns}")
        return index

    # ---- queries
    def lookup(
        self, keys: Sequence[str], fingerprint: Mapping[str, Any], recipe: FeatureRecipe
    ) -> list[bool]:
        """For each prompt key, whether its features are cached (reads only ``index.json``)."""
        entries = self._read_index(self.namespace(fingerprint, recipe), fingerprint, recipe)["entries"]
        return [k in entries for k in keys]

    def load(
        self, keys: Sequence[str], fingerprint: Mapping[str, Any], recipe: FeatureRecipe
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of cached prompts, in ``keys`` order: ``([N, S, D], [N, S])``.

        Raises:
            KeyError: a key is not cached.
            StackLoadError: a chunk file is missing or fails its checksum.
        """
        ns = self.namespace(fingerprint, recipe)
        index = self._read_index(ns, fingerprint, recipe)
        entries = index["entries"]
        missing = [k for k in keys if k not in entries]
        if missing:
            raise KeyError(f"{len(missing)} prompts are not in the feature cache (first {missing[0][:12]})")
        by_chunk: dict[str, list[int]] = {}
        for j, k in enumerate(keys):
            by_chunk.setdefault(entries[k][0], []).append(j)
        rows: list[tuple[torch.Tensor, int] | None] = [None] * len(keys)
        for chunk, positions in by_chunk.items():
            info = index["chunks"][chunk]
            tensors = load_safetensors_checked(ns / chunk, info["sha256"])
            feats, lengths = tensors["features"], tensors["lengths"]
            for j in positions:
                r = entries[keys[j]][1]
                n_tok = int(lengths[r])
                rows[j] = (feats[r, :n_tok], n_tok)
        S = max(n for _, n in rows)  # type: ignore[misc]
        D = rows[0][0].shape[-1]  # type: ignore[index]
        features = torch.zeros(len(keys), S, D, dtype=DTYPES[recipe.dtype])  # [N, S, D]
        lengths_t = torch.zeros(len(keys), dtype=torch.long)
        for j, (f, n_tok) in enumerate(rows):  # type: ignore[misc]
            features[j, :n_tok] = f
            lengths_t[j] = n_tok
        mask = (torch.arange(S)[None, :] < lengths_t[:, None]).long()  # [N, S]
        return features, mask

    def store(
        self,
        keys: Sequence[str],
        features: torch.Tensor,
        attention_mask: torch.Tensor,
        fingerprint: Mapping[str, Any],
        recipe: FeatureRecipe,
    ) -> str:
        """Write one chunk (``features [n, S, D]``, right-padded ``attention_mask [n, S]``) and index it.

        Returns the chunk file name.
        """
        if features.shape[0] != len(keys) or attention_mask.shape != features.shape[:2]:
            raise ValueError("keys, features and attention_mask disagree on the number of prompts or length")
        ns = self.namespace(fingerprint, recipe)
        index = self._read_index(ns, fingerprint, recipe)
        lengths = attention_mask.long().sum(dim=1)  # [n]
        S = int(lengths.max())
        name = f"chunk-{_json_hash(list(keys))[:16]}.safetensors"
        sha = save_safetensors_atomic(
            {"features": features[:, :S].to(DTYPES[recipe.dtype]).contiguous(), "lengths": lengths},
            ns / name,
            metadata={"format": "pt", "kind": "brainstacks_router_features", "recipe_hash": recipe.hash()},
        )
        index["chunks"][name] = {"sha256": sha, "n": len(keys)}
        for row, k in enumerate(keys):
            index["entries"][k] = [name, row]
        atomic_write_json(ns / "index.json", index)
        return name

    def prune(self, fingerprint: Mapping[str, Any], recipe: FeatureRecipe) -> list[Path]:
        """Delete every namespace folder except the one for ``fingerprint`` and ``recipe``."""
        keep = self.namespace(fingerprint, recipe)
        removed = []
        if self.cache_dir.is_dir():
            for p in self.cache_dir.iterdir():
                if p.is_dir() and p.name.startswith("fp-") and p != keep:
                    shutil.rmtree(p)
                    removed.append(p)
        return removed

    # ---- main entry point
    def get_or_compute(
        self,
        model: Any,
        tokenizer: Any,
        prompts: Sequence[PromptLike],
        recipe: FeatureRecipe,
        *,
        fingerprint: Mapping[str, Any] | None = None,
        batch_size: int = 8,
        chunk_size: int = 512,
        encode_fn: EncodeFn | None = None,
        progress: bool = True,
        shard: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of ``prompts`` (in order), computing and caching only the prompts not cached yet.

        Args:
            model: A :class:`BrainStacks` or a bare HF model (see :func:`features_from_ids`).
            tokenizer: The base model's tokenizer.
            prompts: Prompts (instruction text, ``(instruction, input)`` pairs or mappings).
            recipe: The feature recipe.
            fingerprint: Base fingerprint dictionary; by default :func:`base_fingerprint` of ``model``.
            batch_size: Prompts per base forward.
            chunk_size: Prompts per cache chunk (the index is saved after each, so a crash loses little).
            encode_fn: Prompt encoder (default :func:`~brainstacks_hooks.data.formatting.encode_prompt`).
            progress: Show tqdm bars.
            shard: Several processes (collective, every process calls it with the same prompts): the batches
                are split over them; the main process alone looks up and writes the cache, and every process
                then reads the result from it (see the module docstring). A no-op in a single process.

        Returns:
            ``(features [N, S, D], attention_mask [N, S])``.
        """
        fingerprint = dict(fingerprint) if fingerprint is not None else base_fingerprint(model)
        ids = encode_prompts(tokenizer, prompts, recipe, encode_fn)
        keys = [prompt_key(x) for x in ids]
        shard = shard and distributed.is_initialized()
        if shard:  # every process computes the same prompts: the ones the main process misses
            cached = distributed.broadcast_object(distributed.on_main_process(self.lookup, keys, fingerprint, recipe))
        else:
            cached = self.lookup(keys, fingerprint, recipe)
        todo: dict[str, list[int]] = {}
        for k, x, hit in zip(keys, ids, cached):
            if not hit:
                todo.setdefault(k, x)
        n_hit = sum(cached)
        logger.info("router features: %d of %d prompts cached, computing %d", n_hit, len(keys), len(todo))
        todo_keys = list(todo)
        for start in range(0, len(todo_keys), chunk_size):
            chunk = todo_keys[start : start + chunk_size]
            feats, mask = features_from_ids(
                model,
                [todo[k] for k in chunk],
                recipe,
                batch_size,
                pad_id=_pad_id(tokenizer),
                progress=progress,
                shard=shard,
            )
            if shard:  # the others wait until the chunk is on disk, then read it with the rest below
                distributed.on_main_process(self.store, chunk, feats, mask, fingerprint, recipe)
            else:
                self.store(chunk, feats, mask, fingerprint, recipe)
        self.hits += n_hit
        self.misses += len(keys) - n_hit
        return self.load(keys, fingerprint, recipe)
