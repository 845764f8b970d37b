"""The README's usage example runs as written (on the embedded SmolLM2)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_usage_example_runs(tmp_path, monkeypatch, capsys):
    block = re.search(r"## Usage\s+```python\n(.*?)```", README.read_text(), re.S)
    assert block, "README has no python usage block"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)
    stacks = scope["stacks"]
    assert stacks.domains == ["chat"] and len(stacks.frozen_stacks) == 1
    assert (tmp_path / "out" / "stacks" / "brainstacks.json").is_file()
    assert "tensor(" in capsys.readouterr().out
