"""Find the projections of every decoder layer and give them stable names.

Stacks are keyed by ``layers.{index}.{projection}`` (for example ``layers.3.q_proj``), never by the
transformers module path, so a stack file survives renames such as ``model.layers`` ->
``model.language_model.layers`` between transformers versions.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

from torch import nn

from ..errors import ConfigError

# A decoder-layer projection: "<prefix>layers.<i>.<block>.<proj>" where <block> is attention or MLP.
_PROJ_RE = re.compile(
    r"^(?P<prefix>.*?)layers\.(?P<idx>\d+)\.(?:[A-Za-z_]*attn[A-Za-z_]*|mlp|feed_forward)\.(?P<proj>\w+)$"
)
# Towers that must never receive stacks on multimodal checkpoints.
_EXCLUDED_TOWERS = ("vision", "visual", "audio", "image", "multi_modal_projector")


def target_key(layer_index: int, projection: str) -> str:
    """Stable name of one target projection, e.g. ``layers.3.q_proj``."""
    return f"layers.{layer_index}.{projection}"


def projection_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` read from the module, never from its (possibly packed) weight."""
    try:
        return int(module.in_features), int(module.out_features)
    except AttributeError as e:
        raise ConfigError(f"{type(module).__name__} has no in_features/out_features; not a linear projection") from e


def find_target_modules(model: nn.Module, target_modules: Sequence[str]) -> dict[str, nn.Module]:
    """Return ``{stable key: projection module}`` for the language decoder, in layer then target order.

    Only the decoder whose layer list holds the most matching projections is used, so vision or
    audio towers of multimodal models are never wrapped.

    Raises:
        ConfigError: no decoder projection matches ``target_modules``.
    """
    wanted = set(target_modules)
    by_prefix: dict[str, dict[tuple[int, str], nn.Module]] = defaultdict(dict)
    for name, module in model.named_modules():
        m = _PROJ_RE.match(name)
        if m is None or m["proj"] not in wanted:
            continue
        if any(t in name for t in _EXCLUDED_TOWERS):
            continue
        if not hasattr(module, "in_features"):
            continue
        by_prefix[m["prefix"]][(int(m["idx"]), m["proj"])] = module
    if not by_prefix:
        raise ConfigError(
            f"no decoder projection named {sorted(wanted)} found in {type(model).__name__}; "
            "set StackConfig.target_modules to this architecture's projection names"
        )
    prefix = max(by_prefix, key=lambda p: len(by_prefix[p]))
    found = by_prefix[prefix]
    order = {p: i for i, p in enumerate(target_modules)}
    keys = sorted(found, key=lambda t: (t[0], order[t[1]]))
    return {target_key(i, p): found[(i, p)] for i, p in keys}
