"""Benchmark the disk-offloaded StackStore on the embedded SmolLM2-135M-Instruct.

Measures, in one run:

1. stack load throughput: ``StackStore`` loads (first load with sha256 verification, and reload of an
   already verified file) against a raw ``read()`` of the same file, with a warm page cache and, when
   ``/proc/sys/vm/drop_caches`` is writable (root), a cold one; the strict ``load_stack`` used by
   ``BrainStacks.load`` for context;
2. attach time (``activate``) vs the number of stacks on disk (2, 10, 20, 35): route switches between
   cached stacks (attach/detach only) and a switch that loads one stack from disk;
3. resident memory (process RSS and the store's ``resident_bytes``) with 2, 10, 20 and 35 stacks on disk,
   each in a fresh subprocess, after the same route and after cycling routes under a 2-stack budget.

Stacks are created by attaching to the model, ``new_stack`` + random B + ``freeze_active`` (paper defaults:
4 experts, rank 16, all 7 projections, frozen in bfloat16), and saved once (reused on later runs).

Run::

    .venv/bin/python benchmarks/bench_stack_store.py [--work-dir /tmp/bench_stack_store] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from brainstacks_hooks import BrainStacks, StackConfig
from brainstacks_hooks.inference import StackStore
from brainstacks_hooks.models.loading import load_base_model
from brainstacks_hooks.stacks.serialization import load_stack

ON_DISK = (2, 10, 20, 35)
CONFIG = StackConfig(frozen_dtype="bfloat16")


def _model():
    model, _ = load_base_model("smollm2-135m-instruct", dtype="float32")
    model.eval()
    return model


def _domain(i: int) -> str:
    return f"d{i:02d}"


def create_stacks(work: Path, count: int) -> Path:
    """Save ``count`` random frozen stacks (one per domain) under ``work/all`` (reused when present)."""
    full = work / "all"
    index = full / "brainstacks.json"
    if index.is_file() and len(json.loads(index.read_text())["stacks"]) == count:
        print(f"reusing {count} stacks in {full}")
        return full
    model = _model()
    stacks = BrainStacks.attach(model, CONFIG)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for i in range(count):
        stacks.new_stack(_domain(i))
        with torch.no_grad():
            for _, m in stacks.active.items():
                m.B.copy_(torch.randn(m.B.shape, generator=g) * 0.01)
        stacks.freeze_active()
    stacks.save(full)
    print(f"created and saved {count} stacks in {time.perf_counter() - t0:.1f} s -> {full}")
    stacks.detach()
    return full


def subset(full: Path, work: Path, n: int) -> Path:
    """A directory holding exactly the first ``n`` stacks (hard links) and their index."""
    out = work / f"n{n:02d}"
    index = json.loads((full / "brainstacks.json").read_text())
    index["stacks"] = index["stacks"][:n]
    index["domain_order"] = [e["domain"] for e in index["stacks"]]
    (out / "stacks").mkdir(parents=True, exist_ok=True)
    for e in index["stacks"]:
        dst = out / e["file"]
        if not dst.exists():
            os.link(full / e["file"], dst)
    (out / "brainstacks.json").write_text(json.dumps(index, indent=2))
    return out


def drop_caches() -> bool:
    """Drop the page cache (needs root); False when not possible."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def raw_read(path: Path) -> float:
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        f.read()
    return time.perf_counter() - t0


def bench_throughput(model, full: Path, files: int, cold: bool) -> dict:
    """Per-file seconds: raw read, store first load (verify), store reload, load_stack."""
    stacks = BrainStacks.attach(model, CONFIG)
    entries = json.loads((full / "brainstacks.json").read_text())["stacks"]
    rows = {"raw": [], "first": [], "reload": [], "load_stack": []}
    size = 0
    for i in range(files):
        e = entries[i]
        path, dom = full / e["file"], e["domain"]
        size = path.stat().st_size
        for kind in rows:
            if cold and not drop_caches():
                raise RuntimeError("cannot drop the page cache")
            if kind == "raw":
                rows[kind].append(raw_read(path))
            elif kind == "first":
                store = StackStore(stacks, full)  # fresh: nothing verified yet
                t0 = time.perf_counter()
                store.activate({dom: 1.0})
                rows[kind].append(time.perf_counter() - t0)
                store.clear()
            elif kind == "reload":
                store.activate({dom: 1.0})  # verified file, stack dropped by clear(): disk read without hashing
                store.clear()
                if cold:
                    drop_caches()
                t0 = time.perf_counter()
                store.activate({dom: 1.0})
                rows[kind].append(time.perf_counter() - t0)
                store.clear()
            elif cold or i < 2:  # load_stack is slow (random init per stack): two warm files are enough
                t0 = time.perf_counter()
                load_stack(path, stacks.shapes, stacks.fingerprint, CONFIG, expected_sha256=e["sha256"])
                rows[kind].append(time.perf_counter() - t0)
    stacks.detach()
    med = {k: statistics.median(v) for k, v in rows.items() if v}
    return {"file_mb": size / 1e6, "seconds": med, "mb_s": {k: size / 1e6 / v for k, v in med.items()},
            "vs_raw": {k: med["raw"] / v for k, v in med.items()}, "n": {k: len(v) for k, v in rows.items()}}


def bench_attach(model, work: Path, full: Path, switches: int) -> list[dict]:
    out = []
    for n in ON_DISK:
        d = subset(full, work, n)
        stacks = BrainStacks.attach(model, CONFIG)
        t0 = time.perf_counter()
        store = StackStore(stacks, d)
        init_ms = (time.perf_counter() - t0) * 1000
        a, b = {_domain(0): 1.0}, {_domain(1): 0.5}
        store.activate(a)
        store.activate(b)  # both resident now
        hit = []
        for k in range(switches):
            t0 = time.perf_counter()
            store.activate(a if k % 2 else b)
            hit.append((time.perf_counter() - t0) * 1000)
        miss = []
        for _ in range(3):
            store.clear()
            t0 = time.perf_counter()
            store.activate(a)  # verified file, warm page cache: read + build + attach
            miss.append((time.perf_counter() - t0) * 1000)
        stacks.detach()
        out.append({"on_disk": n, "init_ms": init_ms, "switch_hit_ms": statistics.median(hit),
                    "switch_hit_p90_ms": sorted(hit)[int(0.9 * len(hit))], "switch_miss_ms": statistics.median(miss)})
    return out


def _rss_kib() -> tuple[int, int]:
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                vals[line.split(":")[0]] = int(line.split()[1])
    return vals["VmRSS"], vals["VmHWM"]


def rss_worker(directory: Path) -> dict:
    """Run in a fresh process: model + store, one route, then cycle every domain under a 2-stack budget."""
    torch.set_num_threads(2)
    model = _model()
    stacks = BrainStacks.attach(model, CONFIG)
    ids = torch.randint(10, 1000, (1, 32))
    with torch.no_grad():
        model(input_ids=ids)
    base_rss, _ = _rss_kib()
    probe = StackStore(stacks, directory)
    one = next(iter(probe)).nbytes
    budget = probe.route_nbytes({_domain(0): 1.0, _domain(1): 0.5})  # two stacks + their pool slots
    stacks.detach()
    stacks = BrainStacks.attach(model, CONFIG)
    store = StackStore(stacks, directory, budget_bytes=budget)
    store.activate({_domain(0): 1.0, _domain(1): 0.5})
    with torch.no_grad():
        model(input_ids=ids)
    route_rss, _ = _rss_kib()
    resident_route = store.stats().resident_bytes
    n = len(store)
    peak_resident = peak_held = 0
    for k in range(2 * n):
        store.activate({_domain(k % n): 1.0, _domain((k + 1) % n): 0.5})
        with torch.no_grad():
            model(input_ids=ids)
        peak_resident = max(peak_resident, store.stats().resident_bytes)
        peak_held = max(peak_held, store.stats().resident_bytes + stacks.group_cache_bytes())
    cycle_rss, hwm = _rss_kib()
    s = store.stats()
    return {"on_disk": n, "stack_mb": one / 1e6, "base_rss_mb": base_rss / 1024, "route_rss_mb": route_rss / 1024,
            "resident_route_mb": resident_route / 1e6, "cycle_rss_mb": cycle_rss / 1024, "peak_rss_mb": hwm / 1024,
            "peak_resident_mb": peak_resident / 1e6, "peak_held_mb": peak_held / 1e6, "budget_mb": budget / 1e6,
            "misses": s.misses,
            "evictions": s.evictions}


def bench_rss(work: Path, full: Path) -> list[dict]:
    out = []
    for n in ON_DISK:
        d = subset(full, work, n)
        res = subprocess.run([sys.executable, __file__, "--rss-worker", str(d)], capture_output=True, text=True,
                             check=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import safetensors

    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, safetensors {safetensors.__version__}, "
            f"torch threads {torch.get_num_threads()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/bench_stack_store"))
    ap.add_argument("--files", type=int, default=5, help="stack files timed per throughput measurement")
    ap.add_argument("--switches", type=int, default=40, help="route switches timed per stack count")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold page-cache measurements")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--parts", default="throughput,attach,rss", help="comma-separated subset to run")
    ap.add_argument("--rss-worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_worker:
        print(json.dumps(rss_worker(args.rss_worker)))
        return
    torch.set_num_threads(2)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    full = create_stacks(args.work_dir, max(ON_DISK))
    model = _model()
    results: dict = {"machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
                     "loadavg_start": os.getloadavg()}
    parts = set(args.parts.split(","))
    results["warm"] = results["cold"] = None
    if "throughput" in parts:
        results["warm"] = bench_throughput(model, full, args.files, cold=False)
        cold_ok = not args.no_cold and drop_caches()
        results["cold"] = bench_throughput(model, full, min(3, args.files), cold=True) if cold_ok else None
    results["attach"] = bench_attach(model, args.work_dir, full, args.switches) if "attach" in parts else []
    results["rss"] = bench_rss(args.work_dir, full) if "rss" in parts else []

    results["loadavg_end"] = os.getloadavg()
    print(f"\nmachine: {results['machine']}\ncommand: {results['command']}")
    print(f"load average (1/5/15 min) at start {results['loadavg_start']}, at end {results['loadavg_end']}")
    file_mb = results["warm"]["file_mb"] if results["warm"] else float("nan")
    print(f"\n### Load throughput (one stack file, {file_mb:.1f} MB, bfloat16)\n")
    print("| page cache | path | ms | MB/s | vs raw read |\n|---|---|---:|---:|---:|")
    labels = {"raw": "raw `read()`", "first": "StackStore first load (sha256 verify)",
              "reload": "StackStore reload (verified)", "load_stack": "`load_stack` (BrainStacks.load path)"}
    for cache in ("warm", "cold"):
        r = results[cache]
        if r is None:
            print(f"| {cache} | not measured | | | |")
            continue
        for k, label in labels.items():
            if k in r["seconds"]:
                print(f"| {cache} | {label} | {r['seconds'][k] * 1000:.1f} | {r['mb_s'][k]:.0f} | "
                      f"{r['vs_raw'][k] * 100:.0f}% |")
    print("\n### activate() vs stacks on disk\n")
    print("| stacks on disk | StackStore() ms | switch, cached (median / p90) ms | switch, 1 stack from disk ms |"
          "\n|---:|---:|---:|---:|")
    for r in results["attach"]:
        print(f"| {r['on_disk']} | {r['init_ms']:.1f} | {r['switch_hit_ms']:.2f} / {r['switch_hit_p90_ms']:.2f} | "
              f"{r['switch_miss_ms']:.1f} |")
    print("\n### Resident memory (fresh process each, budget = 2 stacks + their pool slots)\n")
    print("| stacks on disk | RSS model only MB | RSS after route MB | resident_bytes MB | RSS after cycling MB | "
          "peak RSS MB | peak resident MB | peak resident + pools MB | budget MB | loads / evictions |"
          "\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["rss"]:
        print(f"| {r['on_disk']} | {r['base_rss_mb']:.0f} | {r['route_rss_mb']:.0f} | {r['resident_route_mb']:.1f} | "
              f"{r['cycle_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['peak_resident_mb']:.1f} | "
              f"{r['peak_held_mb']:.1f} | {r['budget_mb']:.1f} | {r['misses']} / {r['evictions']} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
