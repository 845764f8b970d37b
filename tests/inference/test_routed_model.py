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
from brainstacks_hooks.router.config import RouterConfig
from brainstacks_hooks.router.model import MetaRouter
from brainstacks_hooks.router.serialization import save_router

pytestmark = pytest.mark.slow

PROMPTS = ["Write a Python function that reverses a string.", "What are the symptoms of diabetes?"]
SETTINGS = GenerationSettings(max_new_tokens=6)


@pytest.fixture
def run_dir(tiny_sft_run, tmp_path):
    """A copy of the tiny run with a (random, untrained) router saved beside it."""
    out = tmp_path / "run"
    shutil.copytree(tiny_sft_run.run_dir, out)
    stacks = tiny_sft_run.stacks
    torch.manual_seed(0)
    router = MetaRouter(token_dim=stacks.model.config.hidden_size, domains=stacks.domains, hidden=16)
    cfg = RouterConfig()
    save_router(router, cfg, out / "router", feature_recipe=cfg.feature_recipe(),
                base_fingerprint=stacks.fingerprint_dict())
    return out


def _reference_text(run_dir, mode_ctx, prompt):
    """Generate with BrainStacks.load (all stacks resident) for comparison."""
    from brainstacks_hooks.data.formatting import format_prompt
    from brainstacks_hooks.models.loading import load_base_model

    manifest = json.loads((run_dir / "manifest.json").read_text())
    model, tok = load_base_model(manifest["config"]["model"]["name_or_path"], dtype="float32")
    model.eval()
    stacks = BrainStacks.load(model, run_dir / "stacks")
    enc = tok([format_prompt(tok, prompt)], return_tensors="pt", add_special_tokens=False)
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
