"""DPO on one domain of a finished SFT run: pairs (chosen = reference answer, rejected = the SFT
policy's sample, or your own prompt/chosen/rejected rows), a new zero-init stack trained against the reference
policy = the frozen stacks, accepted when the held-out DPO loss fell.

    python recipes/dpo_domain.py rl_dpo_chat_cpu [run_dir=runs/x trainer.max_steps=8 ...]

Same as ``brainstacks rl dpo CONFIG``. The round is recorded in the run's manifest like an SFT round (kind
``dpo``, metrics before/after, steps, wall time, checksum); its scratch (pairs, pre-RL metrics, samples) is
in ``RUN_DIR/rl/<domain>-r<k>/``. Rerunning resumes: recorded rounds are skipped, an interrupted one restarts.
Copy the config to edit it: ``brainstacks configs cp rl_dpo_chat_cpu .``
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
    config = load_config(RLConfig, argv[0], ["algorithm=dpo", *argv[1:]])
    run_rl(config)
    print(summary_table(RunDir.open(config.run_dir).manifest))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
