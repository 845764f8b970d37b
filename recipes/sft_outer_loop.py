"""SFT over all domains of a config: inner loop per domain, curriculum order, null space, resume.

    python recipes/sft_outer_loop.py quickstart_cpu [train.max_steps=40 ...]

Same as ``brainstacks train CONFIG``. Rerun the same command after a crash to resume.
"""

from __future__ import annotations

import sys

from brainstacks_hooks.config import load_config
from brainstacks_hooks.training.config import RunConfig
from brainstacks_hooks.training.outer_loop import run_sft, summary_table
from brainstacks_hooks.utils.logging import enable_console_logging


def main(argv: list[str]) -> None:
    enable_console_logging()
    config = load_config(RunConfig, argv[0], argv[1:])
    run = run_sft(config)
    print(summary_table(run.manifest))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
