"""RoutedModel and the generate/chat CLI on a tiny finished SFT run."""

from __future__ import annotations

import io
import json
import shutil
import sys

import pytest
import torch

from brainstacks_hooks import BrainStacks
from brainstacks_hooks.inference.routed_model import GenerationSettings, RoutedModel
from brainstacks_hooks.run_dir import RunDir
from brainstacks_hooks.testing import save_random_router

pytestmark = pytest.mark.slow

PROMPTS = ["Write a Python function that reverses a string.", "What are the symptoms of diabetes?"]
SETTINGS = GenerationSettings(max_new_tokens=6)


@pytest.fixture
def run_dir(tiny_sft_run, tmp_path):
    """A copy of the tiny run with a (random, untrained) router saved beside it."""
    out = tmp_path / "run"
    shutil.copytree(tiny_sft_run.run_dir, out)
    save_random_router(out, tiny_sft_run.stacks)
    return out


def _reference_text(run_dir, mode_ctx, prompt):
    """Generate with BrainStacks.load (all stacks resident) from the training encoding of the prompt."""
    from brainstacks_hooks.data.formatting import encode_prompt

    model, tok = RunDir.open(run_dir).load_base(dtype="float32")
    model.eval()
    stacks = BrainStacks.load(model, run_dir / "stacks")
    ids = torch.tensor([encode_prompt(tok, prompt)["input_ids"]])
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with mode_ctx(stacks), torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_generation_identical_from_disk_and_from_cache_and_to_a_resident_load(run_dir):
    rm = RoutedModel.from_run(run_dir)
    first = rm.generate(PROMPTS[:1], mode="ungated", settings=SETTINGS)[0]
    assert first.explain.loaded and not first.explain.cache_hits
    second = rm.generate(PROMPTS[:1], mode="ungated", settings=SETTINGS)[0]
    assert second.explain.cache_hits and not second.explain.loaded
    assert first.text == second.text
    assert first.text == _reference_text(run_dir, lambda s: s.ungated(), PROMPTS[0])


def test_routed_generation_explains_its_route(run_dir):
    rm = RoutedModel.from_run(run_dir)
    gens = rm.generate(PROMPTS, mode="routed", settings=SETTINGS)
    assert [g.prompt for g in gens] == PROMPTS
    for g in gens:
        e = g.explain
        assert set(e.scores) == {"chat", "code"}
        assert {s.split("/")[0] for s in e.stacks_used} == set(e.weights)  # only gated-on domains are loaded
        assert {"features_ms", "router_ms", "route_ms", "load_ms", "generate_ms"} <= set(e.timings)
        assert e.timings["route_ms"] >= e.timings["features_ms"] > 0  # route_ms is the whole routing wall time
    base = rm.generate(PROMPTS[:1], mode="base", settings=SETTINGS)[0]
    assert base.explain.stacks_used == []


def test_min_new_tokens_fixes_the_length(run_dir):
    rm = RoutedModel.from_run(run_dir)
    (g,) = rm.generate(PROMPTS[0], mode="base", settings=GenerationSettings(max_new_tokens=6, min_new_tokens=6))
    assert g.new_tokens == 6


def test_stream_yields_text_then_the_result(run_dir):
    rm = RoutedModel.from_run(run_dir)
    pieces = list(rm.stream(PROMPTS[0], mode="isolated:chat", settings=SETTINGS))
    assert pieces[-1].text == "".join(p for p in pieces[:-1])


def test_chat_cli_reports_a_corrupt_stack_and_keeps_serving(run_dir, monkeypatch, capsys):
    from brainstacks_hooks.cli.main import main

    index = json.loads((run_dir / "stacks" / "brainstacks.json").read_text())
    code_file = next(e["file"] for e in index["stacks"] if e["domain"] == "code")
    path = run_dir / "stacks" / code_file
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n:mode isolated:chat\nhello\n:quit\n"))
    assert main(["-q", "chat", str(run_dir), "--mode", "isolated:code", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "error:" in out and "checksum" in out  # the code route fails clearly
    assert "[isolated(chat)]" in out  # and the next route is served


def test_generate_cli_json(run_dir, capsys):
    from brainstacks_hooks.cli.main import main

    assert main(["-q", "generate", str(run_dir), "--prompt", PROMPTS[0], "--json", "--max-new-tokens", "4"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["prompt"] == PROMPTS[0] and "weights" in row["explain"] and "gap" in row["explain"]


def test_a_router_trained_on_other_stacks_is_refused(run_dir, caplog):
    from brainstacks_hooks.errors import StackLoadError

    meta_path = run_dir / "router" / "router.json"
    meta = json.loads(meta_path.read_text())
    meta["stacks"][0]["sha256"] = "0" * 64  # as if the chat stack had been retrained since
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StackLoadError, match=r"trained on other stacks.*chat/r0 changed"):
        RoutedModel.from_run(run_dir)
    rm = RoutedModel.from_run(run_dir, allow_stack_mismatch=True)  # explicit override: warns, loads
    assert rm.router is not None and "allow_stack_mismatch=True" in caplog.text


_SERVING = """
import sys
from brainstacks_hooks.cli.main import main
from brainstacks_hooks.inference import StackStore
from brainstacks_hooks.inference.routed_model import GenerationSettings, RoutedModel
from brainstacks_hooks.router.serving import route_prompt

rm = RoutedModel.from_run({run!r})
rm.generate(["hello"], mode="routed", settings=GenerationSettings(max_new_tokens=2))
rm.generate(["hello"], mode="prefix:chat", settings=GenerationSettings(max_new_tokens=2))
route_prompt({run!r}, "hello")
assert main(["-q", "route", {run!r}, "hello", "--json"]) == 0
assert main(["-q", "generate", {run!r}, "--prompt", "hi", "--max-new-tokens", "2"]) == 0
TRAINING = ("brainstacks_hooks.training", "brainstacks_hooks.router.pipeline", "brainstacks_hooks.router.train",
            "brainstacks_hooks.router.oracle", "trl", "peft")
bad = sorted(m for m in sys.modules if m.startswith(TRAINING))
print("TRAINING_MODULES", bad)
"""


def test_serving_imports_no_training_module(run_dir):
    import subprocess

    out = subprocess.run([sys.executable, "-c", _SERVING.format(run=str(run_dir))], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("TRAINING_MODULES"))
    assert line == "TRAINING_MODULES []", line


def test_mixed_route_generation_equals_one_batch_per_route(run_dir):
    rm = RoutedModel.from_run(run_dir)
    prompts = [*PROMPTS, "Solve 3 + 4.", "Tell me a story about a cat."]
    mixed = rm.generate(prompts, mode="routed", settings=SETTINGS)
    grouped = rm.generate(prompts, mode="routed", settings=SETTINGS, mixed_batches=False)
    assert [g.text for g in mixed] == [g.text for g in grouped]
    assert [g.explain.weights for g in mixed] == [g.explain.weights for g in grouped]
    assert len({json.dumps(sorted(g.explain.weights.items())) for g in mixed}) > 1  # routes differ: one batch
    for g in mixed:  # each prompt reports the stacks of its own route, not the batch's union
        assert {s.split("/")[0] for s in g.explain.stacks_used} == set(g.explain.weights)
