"""Train the meta-router of a finished SFT run: outcome oracle, cached features, router, report.

    python recipes/train_router.py router_quickstart [run_dir=runs/x router.epochs=4 ...]

Same as ``brainstacks router RUN_DIR --config YAML`` (also under ``torchrun --nproc_per_node N``, sharded).
Everything lands in ``RUN_DIR/router``: the router (``router.json`` + ``router.safetensors``), the oracle and
feature caches (a rerun recomputes nothing that is cached), ``report.json``, ``val_routes.json`` and
``cross_domain.png``.
"""

from __future__ import annotations

import sys

from brainstacks_hooks.config import load_config
from brainstacks_hooks.router.pipeline import REPORT_FILE, RouterPipelineConfig, summary_table, train_router_for_run
from brainstacks_hooks.utils.distributed import is_main_process
from brainstacks_hooks.utils.logging import enable_console_logging


def main(argv: list[str]) -> None:
    enable_console_logging()
    config = load_config(RouterPipelineConfig, argv[0], argv[1:])
    result = train_router_for_run(config.run_dir, config)  # torchrun: every process, sharded
    if not is_main_process():
        return
    print(summary_table(result.report))
    print(f"\nreport: {result.router_dir / REPORT_FILE}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
