"""Routing from a run directory without training code: load the run's base model and its bound router.

This is what ``brainstacks route`` imports: the run directory, the router file and gating, nothing from
``training/`` or the router training pipeline.
"""

from __future__ import annotations

import os
from typing import Any

from ..run_dir import RunDir
from .gating import Route, route_prompts
from .model import MetaRouter
from .serialization import load_router


def router_fingerprint(model: Any, stack_config: Any) -> dict[str, Any]:
    """Base fingerprint the router is keyed by: the stacks' fingerprint, computable without attaching hooks.

    Equals ``BrainStacks.fingerprint_dict()`` of stacks attached to ``model`` with ``stack_config``, so
    the bare base model (``brainstacks route``) and the model with stacks agree.
    """
    from ..models.fingerprint import ModelFingerprint
    from ..models.targets import find_target_modules

    stacks = getattr(model, "_brainstacks", None)
    if stacks is not None:
        return stacks.fingerprint_dict()
    return ModelFingerprint.from_model(model, find_target_modules(model, stack_config.target_modules)).to_dict()


def load_run_router(run_dir: str | os.PathLike | RunDir, *, model: Any = None, tokenizer: Any = None,
                    device: str = "cpu", allow_stack_mismatch: bool = False
                    ) -> tuple[MetaRouter, dict[str, Any], Any, Any]:
    """Load the base model of a run (no stacks) and its router, checking its base fingerprint and that it was
    trained on the run's current stacks.

    Returns:
        ``(router, meta, model, tokenizer)``.
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir.open(run_dir)
    if model is None:
        model, tokenizer = run.load_base()
    router, meta = load_router(run.router_dir, router_fingerprint(model, run.stack_config), device,
                               expected_stacks=run.stack_index().identity(),
                               allow_stack_mismatch=allow_stack_mismatch)
    return router, meta, model, tokenizer


def route_prompt(run_dir: str | os.PathLike | RunDir, instruction: str, input: str = "", *, model: Any = None,
                 tokenizer: Any = None) -> Route:
    """Route one prompt with a run's router: base-only features, router scores, gating and the gap flag."""
    router, meta, model, tokenizer = load_run_router(run_dir, model=model, tokenizer=tokenizer)
    (route,) = route_prompts(model, tokenizer, router, meta, [(instruction, input)], batch_size=1)
    return route
