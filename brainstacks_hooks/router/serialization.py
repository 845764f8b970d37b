"""Saving and loading a trained :class:`MetaRouter`: ``router.safetensors`` plus ``router.json``.

``router.json`` holds everything needed to route exactly as in training: domains (in logit order),
architecture (token_dim, hidden, dropout, temperature clamp), the feature recipe (sequence length and
layer weights), chat floor, chat domain, gate threshold, the base fingerprint, the full
:class:`RouterConfig`, the format version and the sha256 of the weights file.

Loading is strict: a missing or unparsable file, an unknown format version, a checksum mismatch, missing
or unexpected tensors and shape mismatches raise :class:`StackLoadError`; a base fingerprint that differs
from the expected one raises :class:`FingerprintMismatch` naming the differing keys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..constants import ROUTER_FORMAT_VERSION
from ..errors import ConfigError, FingerprintMismatch, StackLoadError
from ..utils.io import atomic_write_json, load_safetensors_checked, read_json, save_safetensors_atomic
from ..utils.logging import get_logger
from .config import FeatureRecipe, RouterConfig
from .model import MetaRouter

logger = get_logger(__name__)

ROUTER_WEIGHTS_FILE = "router.safetensors"
ROUTER_META_FILE = "router.json"
_REQUIRED_META = (
    "format_version",
    "domains",
    "token_dim",
    "hidden",
    "dropout",
    "temp_clamp",
    "feature_recipe",
    "chat_floor",
    "chat_domain",
    "gate_threshold",
    "base_fingerprint",
    "sha256",
)


def _normalise(obj: Any) -> Any:
    """JSON round trip, so tuples and lists (and int/float keys) compare as they will after loading."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def dict_differences(expected: Any, actual: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON-like values differ (empty when equal)."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        out: list[str] = []
        for k in sorted(set(expected) | set(actual), key=str):
            path = f"{prefix}.{k}" if prefix else str(k)
            if k not in expected:
                out.append(f"{path} (unexpected)")
            elif k not in actual:
                out.append(f"{path} (missing)")
            else:
                out.extend(dict_differences(expected[k], actual[k], path))
        return out
    return [] if expected == actual else [prefix or "<value>"]


def save_router(
    router: MetaRouter,
    config: RouterConfig,
    directory: str | os.PathLike,
    *,
    feature_recipe: FeatureRecipe | dict[str, Any],
    base_fingerprint: dict[str, Any],
    stacks: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write ``router.safetensors`` and ``router.json`` into ``directory`` atomically.

    The weights are written first and the JSON (which carries their sha256) last, so a crash never leaves
    a JSON pointing at weights it does not describe.

    Args:
        router: The trained router.
        config: The :class:`RouterConfig` it was trained with (gating values are read from it).
        directory: Output folder (created if needed).
        feature_recipe: The recipe the training features were computed with; its ``seq_len`` must equal
            ``config.seq_len`` (the recipe is what inference will use).
        base_fingerprint: The base model's fingerprint dictionary.
        stacks: Domain, round and sha256 of every stack the router was trained on (its oracle targets
            came from them), e.g. ``StackIndex.identity()``; :func:`load_router` refuses other stacks.

    Returns:
        The metadata dictionary written to ``router.json``.
    """
    recipe = (
        feature_recipe
        if isinstance(feature_recipe, FeatureRecipe)
        else FeatureRecipe.from_dict(feature_recipe)
    )
    if recipe.seq_len != config.seq_len:
        raise ConfigError(
            f"feature recipe seq_len={recipe.seq_len} differs from config.seq_len={config.seq_len}; "
            "the router must be used with the sequence length it was trained with"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in router.state_dict().items()}
    sha = save_safetensors_atomic(
        state, directory / ROUTER_WEIGHTS_FILE, metadata={"format": "pt", "kind": "brainstacks_router"}
    )
    meta: dict[str, Any] = {
        "format_version": ROUTER_FORMAT_VERSION,
        "domains": list(router.domains),
        "token_dim": router.token_dim,
        "hidden": router.hidden,
        "dropout": router.dropout_p,
        "temp_clamp": list(router.temp_clamp),
        "per_domain_head": router.per_domain_head,
        "feature_recipe": recipe.to_dict(),
        "chat_floor": config.chat_floor,
        "chat_domain": config.chat_domain,
        "gate_threshold": config.gate_threshold,
        "base_fingerprint": _normalise(base_fingerprint),
        "stacks": _normalise(stacks) if stacks is not None else None,
        "router_config": config.to_dict(),
        "n_params": sum(p.numel() for p in router.parameters()),
        "dtype": str(next(iter(state.values())).dtype).replace("torch.", ""),
        "torch_version": torch.__version__,
        "sha256": sha,
    }
    atomic_write_json(directory / ROUTER_META_FILE, meta)
    logger.info(
        "saved router (%d domains, %d params) to %s", len(router.domains), meta["n_params"], directory
    )
    return meta


def read_router_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``router.json`` (without touching the weights)."""
    path = Path(directory) / ROUTER_META_FILE
    if not path.is_file():
        raise StackLoadError(f"{path}: file not found")
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise StackLoadError(f"{path}: expected a JSON object")
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise StackLoadError(f"{path}: missing keys {missing}")
    if meta["format_version"] != ROUTER_FORMAT_VERSION:
        raise StackLoadError(
            f"{path}: router format version {meta['format_version']} is not supported "
            f"(this version reads {ROUTER_FORMAT_VERSION})"
        )
    try:
        FeatureRecipe.from_dict(meta["feature_recipe"])
    except (ConfigError, TypeError) as e:
        raise StackLoadError(f"{path}: invalid feature_recipe ({e})") from e
    return meta


def stack_differences(trained_on: list[dict[str, Any]] | None, current: list[dict[str, Any]]) -> list[str]:
    """What changed between the stacks a router was trained on and ``current`` (empty when the same).

    Both are lists of ``{"domain", "round", "sha256"}``; the domain order is part of the identity.
    """
    if trained_on is None:
        return ["the router was saved without the identity of its stacks (older version)"]
    old = {(s["domain"], int(s["round"])): s["sha256"] for s in trained_on}
    new = {(s["domain"], int(s["round"])): s["sha256"] for s in current}
    out = [f"{d}/r{r} removed" for d, r in sorted(set(old) - set(new))]
    out += [f"{d}/r{r} added" for d, r in sorted(set(new) - set(old))]
    out += [f"{d}/r{r} changed (sha256 {old[(d, r)][:12]}... -> {new[(d, r)][:12]}...)"
            for d, r in sorted(set(old) & set(new)) if old[(d, r)] != new[(d, r)]]
    order_old = list(dict.fromkeys(s["domain"] for s in trained_on))
    order_new = list(dict.fromkeys(s["domain"] for s in current))
    if not out and order_old != order_new:
        out.append(f"domain order {order_old} -> {order_new}")
    return out


def load_router(
    directory: str | os.PathLike,
    expected_fingerprint: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    expected_stacks: list[dict[str, Any]] | None = None,
    allow_stack_mismatch: bool = False,
) -> tuple[MetaRouter, dict[str, Any]]:
    """Load a router saved by :func:`save_router`, strictly.

    Args:
        directory: Folder holding ``router.json`` and ``router.safetensors``.
        expected_fingerprint: The current base model's fingerprint; when given it must equal the stored
            one exactly (compared as JSON values).
        device: Device to put the router on.
        expected_stacks: The stacks it will route (``{"domain", "round", "sha256"}`` each, in order); when
            given they must be the stacks the router was trained on.
        allow_stack_mismatch: Load a router trained on other stacks anyway, with a warning.

    Returns:
        ``(router, meta)``: the router in eval mode and the ``router.json`` dictionary. Use
        ``FeatureRecipe.from_dict(meta["feature_recipe"])`` to build inference features.

    Raises:
        FingerprintMismatch: the router was trained on features of a different base model.
        StackLoadError: any file is missing or inconsistent (checksum, keys, shapes), or the router was
            trained on other stacks than ``expected_stacks``.
    """
    directory = Path(directory)
    meta = read_router_meta(directory)
    if expected_stacks is not None:
        diffs = stack_differences(meta.get("stacks"), expected_stacks)
        if diffs:
            msg = (f"{directory}: router was trained on other stacks than the ones it would route: "
                   f"{'; '.join(diffs[:6])}{' ...' if len(diffs) > 6 else ''}; retrain it (`brainstacks router "
                   "RUN_DIR`)")
            if not allow_stack_mismatch:
                raise StackLoadError(msg + " or pass allow_stack_mismatch=True")
            logger.warning("%s (loading anyway: allow_stack_mismatch=True)", msg)
    if expected_fingerprint is not None:
        diffs = dict_differences(_normalise(expected_fingerprint), _normalise(meta["base_fingerprint"]))
        if diffs:
            raise FingerprintMismatch(
                f"{directory}: router was trained on a different base model; differing fingerprint keys: "
                f"{diffs[:8]}{' ...' if len(diffs) > 8 else ''}"
            )
    state = load_safetensors_checked(directory / ROUTER_WEIGHTS_FILE, expected_sha256=meta["sha256"])
    try:
        router = MetaRouter(
            token_dim=int(meta["token_dim"]),
            domains=list(meta["domains"]),
            hidden=int(meta["hidden"]),
            dropout=float(meta["dropout"]),
            temp_clamp=(float(meta["temp_clamp"][0]), float(meta["temp_clamp"][1])),
            per_domain_head=bool(meta.get("per_domain_head", False)),
        )
    except (ConfigError, TypeError, ValueError, IndexError) as e:
        raise StackLoadError(f"{directory}: invalid router metadata ({e})") from e
    expected = router.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise StackLoadError(
            f"{directory}: router tensors do not match: missing {missing}, unexpected {unexpected}"
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise StackLoadError(
                f"{directory}: tensor {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}"
            )
        if not state[k].is_floating_point():
            raise StackLoadError(f"{directory}: tensor {k} has non-float dtype {state[k].dtype}")
    dtype = next(iter(state.values())).dtype
    router.to(dtype)
    router.load_state_dict(state, strict=True)
    router.to(device).eval()
    return router, meta
