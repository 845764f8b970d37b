"""RunDir: the old layout is refused with a clear message and converted without losing a stack."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from brainstacks_hooks.cli.main import main
from brainstacks_hooks.errors import RunDirError
from brainstacks_hooks.run_dir import RunDir
from brainstacks_hooks.stacks.brainstacks import BrainStacks

pytestmark = pytest.mark.slow


def _as_layout_1(run: Path) -> None:
    """Rewrite a run directory the way brainstacks-hooks 0.1 left it (each stack twice, null space apart)."""
    m = json.loads((run / "manifest.json").read_text())
    m["format_version"] = 1
    m.pop("rows", None)
    index = json.loads((run / "stacks" / "brainstacks.json").read_text())
    (run / "stacks" / "stacks").mkdir()
    (run / "null_space").mkdir()
    for i, e in enumerate(index["stacks"]):
        rel = f"stacks/{i:03d}-{e['domain']}-r{e['round']}.safetensors"
        shutil.copy(run / "stacks" / e["file"], run / "stacks" / rel)
        e["file"] = rel
    merged = {}
    for d, ns in index["null_space"].items():
        src = run / "stacks" / ns["file"]
        merged.update({f"{d}/{k}": v for k, v in load_file(str(src)).items()})
        src.rename(run / "null_space" / f"{d}.safetensors")
        m["domains"][d]["null_space"]["file"] = f"null_space/{d}.safetensors"
    save_file(merged, str(run / "stacks" / "null_space.safetensors"))
    index["format_version"] = 1
    index["null_space"] = {"file": "null_space.safetensors", "sha256": "x" * 64, "domains": list(merged)}
    (run / "stacks" / "brainstacks.json").write_text(json.dumps(index))
    (run / "manifest.json").write_text(json.dumps(m))


@pytest.fixture
def legacy_run(tiny_sft_run, tmp_path) -> Path:
    out = tmp_path / "old"
    shutil.copytree(tiny_sft_run.run_dir, out)
    _as_layout_1(out)
    return out


def test_an_old_layout_is_refused_with_the_conversion_command(legacy_run, capsys):
    with pytest.raises(RunDirError, match=r"layout 1.*brainstacks convert-run"):
        RunDir.open(legacy_run)
    assert main(["-q", "generate", str(legacy_run), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "convert-run" in err[0]


def test_conversion_keeps_every_stack_once_and_loads_identically(legacy_run, tiny_sft_run, capsys):
    before = {p.name: p.read_bytes() for p in (legacy_run / "stacks").glob("*-r*.safetensors")}
    assert main(["-q", "convert-run", str(legacy_run)]) == 0
    assert "layout 2" in capsys.readouterr().out
    run = RunDir.open(legacy_run)
    assert not (legacy_run / "stacks" / "stacks").exists() and not (legacy_run / "null_space").exists()
    files = sorted(p.name for p in legacy_run.rglob("*.safetensors"))
    assert files == sorted([*before, "null_space-chat.safetensors", "null_space-code.safetensors"])
    assert {p.name: p.read_bytes() for p in (legacy_run / "stacks").glob("*-r*.safetensors")} == before
    model, _ = run.load_base()
    stacks = BrainStacks.load(model, run.stacks_dir)
    ref = tiny_sft_run.stacks
    assert [(s.domain, s.round_index) for s in stacks.frozen_stacks] == [(s.domain, s.round_index)
                                                                        for s in ref.frozen_stacks]
    for a, b in zip(stacks.frozen_stacks, ref.frozen_stacks):
        assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())
    assert set(stacks.null_space_bases) == {"chat", "code"}
    assert RunDir.convert_legacy(legacy_run).path == legacy_run  # converting again is a no-op
