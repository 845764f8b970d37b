"""Residual boosting for one domain of a config (the inner loop alone).

    python recipes/sft_inner_loop.py quickstart_cpu code [overrides ...]

Trains only ``DOMAIN`` (on the bare base) into ``<output_dir>-<domain>``; prints each round's decision.
"""

from __future__ import annotations

import sys

from brainstacks_hooks.config import load_config
from brainstacks_hooks.training.config import RunConfig
from brainstacks_hooks.training.outer_loop import run_sft, summary_table
from brainstacks_hooks.utils.logging import enable_console_logging


def main(argv: list[str]) -> None:
    enable_console_logging()
    config = load_config(RunConfig, argv[0], argv[2:])
    config.domains = [config.domain(argv[1])]
    config.output_dir = f"{config.output_dir}-{argv[1]}"
    run = run_sft(config)
    print(summary_table(run.manifest))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1:])
