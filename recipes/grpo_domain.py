"""GRPO on one domain of a finished SFT run: a new zero-init stack trained on verifiable rewards
(GSM8K exact match + format, or code tests in the sandbox), accepted when the held-out mean reward rose.

    python recipes/grpo_domain.py rl_grpo_math_cpu [run_dir=runs/x trainer.max_steps=8 ...]

Same as ``brainstacks rl grpo CONFIG``. The round is recorded in the run's manifest like an SFT round (kind
``grpo``, metrics before/after, steps, wall time, checksum); its scratch (pairs, pre-RL metrics, samples) is
in ``RUN_DIR/rl/<domain>-r<k>/``. Rerunning resumes: recorded rounds are skipped, an interrupted one restarts.
Copy the config to edit it: ``brainstacks configs cp rl_grpo_math_cpu .``
"""

from __future__ import annotations

import sys

from brainstacks_hooks.config import load_config
from brainstacks_hooks.rl.config import RLConfig
from brainstacks_hooks.rl.round import run_rl, summary_table
from brainstacks_hooks.run_dir import RunDir
from brainstacks_hooks.utils.logging import enable_console_logging


def main(argv: list[str]) -> None:
    enable_console_logging()
    config = load_config(RLConfig, argv[0], ["algorithm=grpo", *argv[1:]])
    run_rl(config)
    print(summary_table(RunDir.open(config.run_dir).manifest))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
