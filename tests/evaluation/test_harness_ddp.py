"""``brainstacks eval`` under ``torchrun`` with 2 gloo processes equals one process and writes its files once.

lm-eval deals the documents out by rank (``lm.rank`` / ``lm.world_size`` of the toolkit's ``HFLM`` subclass), each
process routes and scores its share, the metrics, samples and routes are gathered on the main process, which
alone writes ``results.json``, the samples and ``routes.jsonl``. Both runs evaluate one finished tiny SFT run (with
a router of random weights, so the routes differ from document to document) in child processes with one thread.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytest.importorskip("lm_eval")

from brainstacks_hooks.testing import RECORD_REPLACES, run_script, save_random_router

pytestmark = pytest.mark.slow

#: ``brainstacks eval`` in a process that records the files it replaces and how many requests it scored.
_CHILD = RECORD_REPLACES + r"""
import json, os, sys
import torch
out, run_dir, mode, data_dir = sys.argv[1:5]
torch.set_num_threads(1)
from brainstacks_hooks.cli.main import main
from brainstacks_hooks.evaluation import harness

calls = {"loglikelihood": 0}
cls = harness.brainstacks_lm_class()
loglikelihood = cls.loglikelihood

def counting(self, requests, disable_tqdm=False):
    calls["loglikelihood"] += len(requests)
    return loglikelihood(self, requests, disable_tqdm)

cls.loglikelihood = counting
code = main(["-q", "eval", run_dir, "--tasks", "bs_arc_easy", "--mode", mode, "--limit", "7", "--batch-size", "3",
             "--data-dir", data_dir, "--out-dir", os.path.join(out, mode)])
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
with open(os.path.join(out, f"{mode}_rank{rank}.json"), "w") as f:
    json.dump({"writes": writes, "calls": calls}, f)
sys.exit(code)
"""


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("mode", ["routed", "ungated"])
def test_eval_under_torchrun_equals_one_process_and_writes_once(tmp_path, tiny_sft_run, data_dir, mode):
    run = shutil.copytree(tiny_sft_run.run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("trainer"))
    save_random_router(run, tiny_sft_run.stacks, seed=3, weight_std=0.5)  # routes that differ per document
    child = tmp_path / "eval_child.py"
    child.write_text(_CHILD)
    outs = {}
    for name, nproc in (("single", 1), ("ddp", 2)):
        (tmp_path / name).mkdir()
        outs[name] = run_script(child, tmp_path / name, run, mode, data_dir, nproc=nproc)
        assert outs[name].count("results: ") == 1, outs[name]  # the main process alone reports

    one = json.loads((tmp_path / "single" / f"{mode}_rank0.json").read_text())
    rank0, rank1 = (json.loads((tmp_path / "ddp" / f"{mode}_rank{r}.json").read_text()) for r in (0, 1))
    # the documents were dealt out: each process scored a share, together every request once
    shares = (rank0["calls"]["loglikelihood"], rank1["calls"]["loglikelihood"])
    assert min(shares) > 0 and sum(shares) >= one["calls"]["loglikelihood"] > max(shares), shares

    # the main process wrote the files one process writes, each once; the other process wrote nothing
    def written(state, root):
        return sorted(os.path.relpath(w, root) for w in state["writes"] if w.startswith(str(root)))

    files = written(one, tmp_path / "single")
    assert files == written(rank0, tmp_path / "ddp") and not written(rank1, tmp_path / "ddp")
    assert len(files) == len(set(files)) and f"{mode}/results.json" in files
    assert (f"{mode}/routes.jsonl" in files) == (mode == "routed")

    a, b = (json.loads((tmp_path / d / mode / "results.json").read_text()) for d in ("single", "ddp"))
    assert (a["processes"], b["processes"]) == (1, 2)
    assert a["samples"] == b["samples"] and len(a["samples"]["bs_arc_easy"]) == 7
    for metric, m in a["metrics"]["bs_arc_easy"].items():
        assert b["metrics"]["bs_arc_easy"][metric]["value"] == pytest.approx(m["value"], abs=1e-9), metric
        assert b["metrics"]["bs_arc_easy"][metric]["stderr"] == pytest.approx(m["stderr"], abs=1e-9), metric
    sa, sb = (_rows(tmp_path / d / mode / "samples_bs_arc_easy.jsonl") for d in ("single", "ddp"))
    assert [s["doc_id"] for s in sa] == [s["doc_id"] for s in sb] == sorted(a["samples"]["bs_arc_easy"])
    for x, y in zip(sa, sb, strict=True):
        assert x["acc"] == y["acc"] and x["acc_norm"] == y["acc_norm"]
        # one answer per request: lm-eval's padding copies under 2 processes are trimmed
        assert [len(r) for r in x["resps"]] == [len(r) for r in y["resps"]] == [1] * len(x["resps"])
        for (lx, _), (ly, _) in zip((r[0] for r in x["resps"]), (r[0] for r in y["resps"]), strict=True):
            assert ly == pytest.approx(lx, abs=1e-4)
    if mode == "routed":
        ra, rb = (_rows(tmp_path / d / mode / "routes.jsonl") for d in ("single", "ddp"))
        assert [(r["doc_id"], r["context_sha256"]) for r in ra] == [(r["doc_id"], r["context_sha256"]) for r in rb]
        for x, y in zip(ra, rb, strict=True):
            assert x["weights"].keys() == y["weights"].keys()
            assert all(y["weights"][d] == pytest.approx(w, abs=1e-5) for d, w in x["weights"].items())
        assert len({json.dumps(r["weights"], sort_keys=True) for r in ra}) > 1  # the routes differ per document
        assert a["route_batches"]["mixed"] + a["route_batches"]["single"] > 0
        assert sum(b["route_batches"].values()) >= sum(a["route_batches"].values())  # + lm-eval's padding
