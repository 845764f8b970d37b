"""Shared helpers of the benchmark scripts: model, batch, machine info, interleaved timing, peak memory.

Timing protocol (:func:`bracketed`): every variant lives in the same process and every run of a variant is
bracketed by two runs of the reference (``ref, v1, ref, v2, ref, ..., ref``; the variant order rotates
between repetitions). Each run's ratio is its time over the mean of the two reference runs next to it, so
a burst of load from another process moves both sides of the ratio; the median of these ratios over the
repetitions is reported, with their range and the ratio of the minimum times.

Memory protocol: each variant runs in its own child process (``--child``); the child resets the kernel's
RSS high-water mark (``/proc/self/clear_refs``) once the model and adapters are set up, runs the steps and
reports the peak RSS (``VmHWM``) and the peak minus the RSS before the steps.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

MODEL_NAME = "smollm2-135m-instruct"


def load_model():
    """The embedded SmolLM2-135M-Instruct in float32, eval mode, and its tokenizer."""
    from brainstacks_hooks.models.loading import load_base_model

    model, tok = load_base_model(MODEL_NAME, dtype="float32")
    model.eval()
    return model, tok


def make_batch(vocab_size: int, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``batch`` x ``seq`` random token ids (ids 100.. avoid special tokens), labels = inputs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, vocab_size, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def machine_info() -> dict[str, str]:
    """CPU model, core count, torch/transformers versions, intra-op threads."""
    import transformers

    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        model = m.group(1).strip() if m else model
        flags = re.search(r"Flags:\s*(.+)", out)
        if flags and "avx512_bf16" in flags.group(1).split():
            model += " (avx512_bf16)"
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": str(torch.get_num_threads()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
    }


def macs_per_token(model: torch.nn.Module, seq: int, num_experts: int = 4, rank: int = 16,
                   lora_rank: int = 64) -> dict[str, float]:
    """Multiply-accumulates per token (forward): base model, one MoE-LoRA stack, one LoRA of ``lora_rank``.

    Base: the 7 projections of every layer, causal attention (QK^T and AV over seq/2 keys on average) and
    the LM head. MoE-LoRA (eval): ``x @ [A; router]^T`` then the gated rank-(E*r) B matmul; training adds the
    noise rows. Dense compute: the E-K unused experts are multiplied by a zero gate, not skipped.
    """
    from brainstacks_hooks.constants import DEFAULT_TARGET_MODULES
    from brainstacks_hooks.models.targets import find_target_modules, projection_features

    shapes = [projection_features(m) for m in find_target_modules(model, DEFAULT_TARGET_MODULES).values()]
    cfg = model.config
    proj = sum(i * o for i, o in shapes)
    attn = cfg.num_hidden_layers * cfg.hidden_size * seq  # 2 matmuls x hidden x seq/2 keys, per layer
    head = cfg.hidden_size * cfg.vocab_size
    E, r = num_experts, rank
    return {
        "base": proj + attn + head,
        "projections": proj,
        "stack_eval": sum((E * r + E) * i + E * r * o for i, o in shapes),
        "stack_train": sum((E * r + 2 * E) * i + E * r * o for i, o in shapes),
        "lora": sum(lora_rank * (i + o) for i, o in shapes),
    }


def print_header(title: str, args) -> None:
    info = machine_info()
    print(f"# {title}")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print("command: " + " ".join([os.path.basename(sys.executable), *sys.argv]))
    print("args: " + ", ".join(f"{k}={v}" for k, v in vars(args).items() if k != "child"))
    print(f"load average at start: {os.getloadavg()[0]:.2f} (other processes share the CPU; see the ratios)")
    sys.stdout.flush()


def bracketed(ref: Callable[[], None], variants: dict[str, Callable[[], None]], repeats: int, steps: int,
              label: str = "ref") -> tuple[list[float], dict[str, list[float]], dict[str, list[float]]]:
    """Time ``variants`` against ``ref``, each variant run between two reference runs.

    Returns ``(reference seconds per call, {name: seconds per call}, {name: ratio to the neighbouring
    reference runs})``, one entry per repetition (each run is ``steps`` calls, timed together).
    """

    def timed(fn: Callable[[], None]) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - t0) / steps

    names = list(variants)
    ref_times = [timed(ref)]
    times: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(repeats):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            times[name].append(timed(variants[name]))
            ref_times.append(timed(ref))
            ratios[name].append(times[name][-1] / (0.5 * (ref_times[-2] + ref_times[-1])))
        print(f"  rep {rep + 1}/{repeats}: {label}={statistics.median(ref_times[-len(names):]):.3f}s  "
              + "  ".join(f"{n}={times[n][-1]:.3f}s ({ratios[n][-1]:.2f}x)" for n in names), flush=True)
    return ref_times, times, ratios


def summary(ratios: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of a list of ratios."""
    return statistics.median(ratios), min(ratios), max(ratios)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) if m else 0


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark of this process (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_probe(run: Callable[[], None]) -> dict[str, float]:
    """Run ``run`` and return peak RSS (MiB) during it, RSS before it, and ru_maxrss of the whole process."""
    import gc

    gc.collect()
    resettable = reset_peak_rss()
    before = _status_kib("VmRSS")
    run()
    peak = _status_kib("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "rss_before_mib": before / 1024,
        "peak_mib": peak / 1024,
        "peak_over_before_mib": (peak - before) / 1024,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "reset_ok": resettable,
    }


def run_child(script: str, child_args: list[str]) -> dict:
    """Run ``script --child ...`` in a fresh interpreter and parse its last ``RESULT {json}`` line."""
    cmd = [sys.executable, script, *child_args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"child {' '.join(cmd)} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")


def emit_child_result(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def table(rows: list[list[str]], header: list[str]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def heldout_prompts(run, domains: list[str], n: int) -> list[str]:
    """The first ``n`` held-out prompts of a run (``rows/router_test``: neither SFT nor the router trained on
    them), the domains interleaved (row 0 of each domain, then row 1, ...)."""
    from brainstacks_hooks.run_dir import ROUTER_TEST

    test = run.rows_by_domain(ROUTER_TEST)
    depth = max((len(test.get(d, [])) for d in domains), default=0)
    return [test[d][i]["instruction"] for i in range(depth) for d in domains if i < len(test.get(d, []))][:n]
