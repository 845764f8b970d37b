"""The ``brainstacks`` command line reports user errors like a tool: one ``error:`` line, exit status 2.

Every case runs the real entry point in a subprocess (``python -m brainstacks_hooks.cli.main``), so the exit
status and stderr are exactly what a user sees; ``--debug`` shows the traceback instead. bitsandbytes is not
imported by the CLI unless the bnb backend is used.
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from brainstacks_hooks.cli import inference_commands
from brainstacks_hooks.cli.main import main
from brainstacks_hooks.configs import list_configs
from brainstacks_hooks.errors import ConfigError
from brainstacks_hooks.stacks.modes import Mode, domain_weights, select_frozen

PACKAGE = Path(__file__).resolve().parents[1] / "brainstacks_hooks"
DOMAINS = ["chat", "code", "math"]
UNKNOWN_DOMAIN = "unknown domain 'nosuch' in mode 'prefix:nosuch'; known domains: chat, code, math"


def run_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "brainstacks_hooks.cli.main", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The single stderr line of a user error (after checking status 2 and no traceback)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_missing_config_file_names_it_and_lists_the_shipped_configs(tmp_path):
    missing = tmp_path / "nosuch.yaml"
    line = error_line(run_cli("train", str(missing), cwd=tmp_path))
    assert str(missing) in line and "shipped configs: " + ", ".join(list_configs()) in line


def test_unknown_yaml_key_names_the_file_and_the_closest_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("trian: {max_steps: 3}\ndomains: [{name: chat}]\n")
    line = error_line(run_cli("train", str(cfg), cwd=tmp_path))
    assert str(cfg) in line and "'trian'" in line and "did you mean 'train'" in line


def test_bad_override_names_it(tmp_path):
    line = error_line(run_cli("train", "quickstart_fast", "domains.9.val_samples=3", cwd=tmp_path))
    assert "'domains.9.val_samples=3'" in line and "index from 0 to 2" in line


def test_a_directory_that_is_not_a_run_is_named(tmp_path):
    line = error_line(run_cli("generate", str(tmp_path), "--prompt", "x", "--mode", "ungated", cwd=tmp_path))
    assert str(tmp_path) in line


def test_debug_shows_the_traceback(tmp_path):
    proc = run_cli("--debug", "train", str(tmp_path / "nosuch.yaml"), cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    assert "brainstacks_hooks.errors.ConfigError" in proc.stderr and "nosuch.yaml" in proc.stderr


def test_configs_lists_the_shipped_configs_and_cp_copies_one_out(tmp_path):
    proc = run_cli("configs", cwd=tmp_path)
    assert proc.returncode == 0 and [line.split()[0] for line in proc.stdout.splitlines()] == list_configs()
    assert run_cli("configs", "cp", "quickstart_fast.yaml", ".", cwd=tmp_path).returncode == 0
    copy = tmp_path / "quickstart_fast.yaml"
    assert copy.read_text() == (PACKAGE / "configs" / "quickstart_fast.yaml").read_text()
    assert "already exists" in error_line(run_cli("configs", "cp", "quickstart_fast", str(copy), cwd=tmp_path))
    line = error_line(run_cli("configs", "cp", "nosuch", "x.yaml", cwd=tmp_path))
    assert "'nosuch'" in line and "quickstart_cpu" in line


def test_unknown_domain_in_a_mode_is_a_config_error_listing_the_domains():
    mode = Mode.parse("prefix:nosuch")
    with pytest.raises(ConfigError) as info:
        domain_weights(mode, DOMAINS)
    assert str(info.value) == UNKNOWN_DOMAIN
    with pytest.raises(ConfigError, match="known domains: chat, code, math"):
        select_frozen(Mode.parse("isolated:nosuch"), DOMAINS, ["chat", "code"])
    with pytest.raises(ConfigError, match="unknown mode 'prefx'"):
        inference_commands.check_mode("prefx:chat")
    inference_commands.check_mode("prefix:code", DOMAINS)  # valid modes pass
    inference_commands.check_mode("routed", DOMAINS)


def test_generate_with_an_unknown_domain_prints_one_error_line(monkeypatch, capsys):
    """The CLI checks ``--mode`` against the run's domains (the run itself is stubbed: no model needed)."""

    def no_generation(*args, **kwargs):
        raise AssertionError("generated despite a bad mode")

    run = types.SimpleNamespace(store=types.SimpleNamespace(domains=DOMAINS), generate=no_generation)
    monkeypatch.setattr(inference_commands, "_load", lambda args: run)
    monkeypatch.setattr("brainstacks_hooks.cli.main.enable_console_logging", lambda level: None)
    assert main(["generate", "runs/x", "--prompt", "hi", "--mode", "prefix:nosuch"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {UNKNOWN_DOMAIN}\n"


def test_cli_does_not_import_bitsandbytes(tmp_path):
    code = ("import sys, brainstacks_hooks, brainstacks_hooks.cli.main as m\n"
            "m.build_parser()\n"
            "assert 'bitsandbytes' not in sys.modules, 'bitsandbytes imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "gemm_4bit_forward" not in proc.stderr


@pytest.mark.slow
def test_trainer_stack_imports_without_bitsandbytes_which_stays_importable(tmp_path):
    """peft (installed by the dev/eval extras) imports bitsandbytes on import; the CLI's training commands
    import peft with bitsandbytes hidden first, and the bnb backend can still import it afterwards."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    code = ("import sys\n"
            "from brainstacks_hooks.models.backend_bnb import import_peft_without_bitsandbytes\n"
            "import_peft_without_bitsandbytes()\n"
            "import transformers.trainer_utils, trl\n"
            "from brainstacks_hooks.training.callbacks import BestStackCallback\n"
            "assert 'bitsandbytes' not in sys.modules, 'bitsandbytes imported by the trainer stack'\n"
            "from transformers.utils.import_utils import is_bitsandbytes_available\n"
            "from peft.import_utils import is_bnb_4bit_available\n"
            "assert is_bitsandbytes_available() and is_bnb_4bit_available()\n"
            "import bitsandbytes\n"
            "from peft.tuners.lora.bnb import Linear4bit\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
