"""GPU verification of the toolkit: one JSON report, at most a few minutes on one GPU.

    python scripts/gpu_check.py [--model smollm2-135m-instruct] [--out gpu_check.json] [--steps 20]

From a copy of the repository (``pip install --no-deps wheels/*.whl`` first when the machine has no index). On
each backend that loads here (``hf``; ``bnb4`` with CUDA + bitsandbytes; ``unsloth`` when it imports) it checks:

* hook calls in a training forward, in ``generate`` and in ``generate(use_cache=False)`` (every projection's hook
  must fire for every decoding step, or the stacks are being bypassed);
* 20 training steps of a new stack on top of a random frozen one, in bf16 and in fp16 with a ``GradScaler``: the
  frozen stack's tensors bit-identical after training (zero forgetting), the load-balance gradient reaching the
  router (non-zero, and the same order of magnitude in fp16 as in bf16), the bypass guard raising on a forward that
  skips the hooks;
* timings: a MoE-LoRA step vs a single-LoRA step at matched parameters, the forward with 0 / 1 / 5 frozen stacks,
  with 5 stacks in sparse experts (``frozen_compute="sparse"``) and the first forward after a route switch;
* the stack store's CUDA prefetch (pinned host buffers, side stream): load throughput vs a raw ``safetensors``
  read of the same files.

On a machine without CUDA the GPU-only parts are reported as ``"skipped": "<reason>"`` and the rest runs on the
CPU (this is how ``tests/test_gpu_check.py`` keeps the script working).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import platform
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from brainstacks_hooks.models.hardware import native_bf16


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, repeats: int = 5) -> float:
    fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync()
    return (time.perf_counter() - t0) / repeats * 1000.0  # ms


def _batch(tok, device, n: int = 4, length: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, min(tok.vocab_size, 30000), (n, length), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def check_backend(backend: str, model_name: str, steps: int, dtype: str) -> dict[str, Any]:
    from brainstacks_hooks.models.loading import load_base_model
    from brainstacks_hooks.stacks.brainstacks import BrainStacks
    from brainstacks_hooks.stacks.config import StackConfig
    from brainstacks_hooks.testing import add_random_stack

    out: dict[str, Any] = {"backend": backend}
    t0 = time.perf_counter()
    device_map = {"": 0} if torch.cuda.is_available() and backend == "hf" else None  # hf loads on the CPU otherwise
    model, tok = load_base_model(model_name, backend=backend, dtype=dtype, device_map=device_map)
    out["load_s"] = round(time.perf_counter() - t0, 2)
    device = next(model.parameters()).device
    stacks = BrainStacks.attach(model, StackConfig())
    add_random_stack(stacks, "frozen", 1)
    frozen_before = {k: v.clone() for k, v in stacks.frozen_stacks[0].tensors().items()}
    stacks.new_stack("active")
    n_hooks = len(stacks.keys)
    batch = _batch(tok, device)

    # hook calls: training forward, generate with and without the KV cache
    calls = {"n": 0}
    handles = [m.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
               for m in stacks.targets.values()]
    model.train()
    model(**batch)
    out["hook_calls_train_forward"] = {"calls": calls["n"], "expected": n_hooks}
    model.eval()
    prompt = {k: v[:1, :16] for k, v in batch.items() if k != "labels"}
    for use_cache in (True, False):
        calls["n"] = 0
        try:
            with torch.no_grad():
                model.generate(**prompt, max_new_tokens=8, do_sample=False, use_cache=use_cache,
                               pad_token_id=tok.pad_token_id)
            out[f"hook_calls_generate_use_cache_{use_cache}"] = {"calls": calls["n"], "expected_at_least": n_hooks * 8}
        except Exception as e:  # recorded in the report; the check goes on
            out[f"hook_calls_generate_use_cache_{use_cache}"] = {"error": f"{type(e).__name__}: {e}"}
    for h in handles:
        h.remove()

    # training: bf16 autocast and fp16 + GradScaler; frozen stack untouched, aux gradient reaches the router
    for precision in ("bf16", "fp16"):
        if precision == "fp16" and device.type != "cuda":
            out["train_fp16"] = {"skipped": "GradScaler fp16 training needs CUDA (tests cover the scaling on CPU)"}
            continue
        if precision == "bf16" and device.type == "cuda" and not native_bf16():
            out["train_bf16"] = {"skipped": "no bf16 on this GPU"}
            continue
        stacks.discard_active()
        stacks.new_stack("active")
        opt = torch.optim.AdamW(stacks.trainable_parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        stacks.aux_grad_scale = float(scaler.get_scale()) if scaler.is_enabled() else 1.0
        model.train()
        losses, router_grad, first_router_grad = [], 0.0, None
        t0 = time.perf_counter()
        for _ in range(steps):
            with torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16):
                loss = model(**batch).loss
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            router_grad = sum(float(m.router.grad.abs().sum()) for _, m in stacks.active.items()
                              if m.router.grad is not None)
            if first_router_grad is None:  # step 1: B = 0, so this is the load-balance gradient alone
                first_router_grad = router_grad
            scaler.step(opt)
            scaler.update()
            stacks.aux_grad_scale = float(scaler.get_scale()) if scaler.is_enabled() else 1.0
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
        _sync()
        unchanged = all(torch.equal(frozen_before[k], v) for k, v in stacks.frozen_stacks[0].tensors().items())
        out[f"train_{precision}"] = {"steps": steps, "first_loss": losses[0], "last_loss": losses[-1],
                                     "s_per_step": round((time.perf_counter() - t0) / steps, 4),
                                     "frozen_bit_identical": unchanged, "router_grad_abs_sum": router_grad,
                                     "step1_aux_router_grad_abs_sum": first_router_grad}
    if "step1_aux_router_grad_abs_sum" in out.get("train_fp16", {}) and "train_bf16" in out:
        key = "step1_aux_router_grad_abs_sum"
        bf, fp = out["train_bf16"].get(key), out["train_fp16"][key]
        out["aux_grad_fp16_over_bf16"] = fp / bf if bf else None  # about 1 when the injection follows the loss scale

    # bypass guard: a forward whose hooks do not fire must raise
    from brainstacks_hooks.errors import StackBypassed

    handles_backup = list(stacks._handles)
    for h in handles_backup[: n_hooks]:
        h.remove()
    try:
        model.eval()
        with torch.no_grad():
            model(**{k: v for k, v in batch.items() if k != "labels"})
        out["bypass_guard"] = {"raised": False}
    except StackBypassed:
        out["bypass_guard"] = {"raised": True}
    stacks.detach()

    # timings: MoE-LoRA vs LoRA step, frozen-stack forward overhead
    timings: dict[str, float] = {}
    for label, cfg in (("moe_lora_step_ms", StackConfig()), ("lora_r64_step_ms", StackConfig(num_experts=1, top_k=1,
                                                                                              rank=64))):
        s = BrainStacks.attach(model, cfg)
        s.new_stack("t")
        opt = torch.optim.AdamW(s.trainable_parameters(), lr=1e-4)
        model.train()

        def step(s=s, opt=opt):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        timings[label] = round(_timed(step), 2)
        s.detach()
    model.eval()
    s = BrainStacks.attach(model, StackConfig())
    fwd = {k: v for k, v in batch.items() if k != "labels"}
    for n in (0, 1, 5):
        while len(s.frozen_stacks) < n:
            add_random_stack(s, f"d{len(s.frozen_stacks)}", len(s.frozen_stacks) + 2)
        with torch.no_grad(), s.ungated():
            timings[f"forward_{n}_frozen_ms"] = round(_timed(lambda: model(**fwd)), 2)
    # sparse experts (top-k only, torch._grouped_mm) vs dense on this device, and the first forward after a
    # route switch among stacks already in the pools (StackConfig.frozen_compute="auto" is dense until measured)
    with torch.no_grad(), s.ungated():
        dense_logits = model(**fwd).logits.float()
        s.config.frozen_compute = "sparse"
        s.clear_group_cache()
        try:  # torch._grouped_mm supports only some dtypes / devices
            sparse_logits = model(**fwd).logits.float()
            timings["forward_5_frozen_sparse_ms"] = round(_timed(lambda: model(**fwd)), 2)
            timings["sparse_vs_dense_max_abs_logit_diff"] = float((sparse_logits - dense_logits).abs().max())
        except RuntimeError as e:
            out["sparse_error"] = str(e).splitlines()[0][:300]
        s.config.frozen_compute = "auto"
        s.clear_group_cache()
        model(**fwd)
    with torch.no_grad():
        with s.routed({"d0": 1.0}):
            model(**fwd)
        with s.ungated():
            _sync()
            t0 = time.perf_counter()
            model(**fwd)
            _sync()
            timings["forward_5_frozen_first_after_switch_ms"] = round((time.perf_counter() - t0) * 1000, 2)
    out["timings"] = timings

    # store prefetch (CUDA): pinned buffers + side stream vs a raw safetensors read
    if device.type == "cuda":
        from safetensors.torch import load_file

        from brainstacks_hooks.inference.store import StackStore

        with tempfile.TemporaryDirectory() as tmp:
            s.save(tmp)
            files = sorted(Path(tmp).glob("*.safetensors"))
            nbytes = sum(f.stat().st_size for f in files)
            t0 = time.perf_counter()
            for f in files:
                load_file(str(f), device=str(device))
            _sync()
            raw = time.perf_counter() - t0
            s.detach()
            s2 = BrainStacks.attach(model, StackConfig())
            store = StackStore(s2, tmp, budget_bytes=None)
            t0 = time.perf_counter()
            store.prefetch(dict.fromkeys(store.domains, 1.0))
            store.activate(dict.fromkeys(store.domains, 1.0))
            _sync()
            pref = time.perf_counter() - t0
            out["store_prefetch"] = {"bytes": nbytes, "raw_read_GBps": round(nbytes / raw / 1e9, 3),
                                     "prefetch_activate_GBps": round(nbytes / pref / 1e9, 3),
                                     "stats": dataclasses.asdict(store.stats())}
            s2.detach()
    else:
        s.detach()
        out["store_prefetch"] = {"skipped": "CUDA prefetch (pinned buffers, side stream) needs a GPU"}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--backends", default="hf,bnb4,unsloth")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    report: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu", "model": args.model, "backends": {}}
    for backend in args.backends.split(","):
        if backend == "bnb4" and not (cuda and importlib.util.find_spec("bitsandbytes")):
            report["backends"][backend] = {"skipped": "needs CUDA and bitsandbytes"}
            continue
        if backend == "unsloth" and not (cuda and importlib.util.find_spec("unsloth")):
            report["backends"][backend] = {"skipped": "needs CUDA and the unsloth extra (its own venv)"}
            continue
        dtype = "bfloat16" if native_bf16() else ("float16" if cuda else "float32")
        t0 = time.perf_counter()
        try:
            report["backends"][backend] = check_backend(backend, args.model, args.steps, dtype)
        except Exception as e:  # one backend failing must not hide the others
            report["backends"][backend] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        report["backends"][backend]["wall_s"] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
