"""The SFT run configs live in :mod:`brainstacks_hooks.run_config` (low in the package, next to the run
directory that records them); they are re-exported here for ``from brainstacks_hooks.training.config import``."""

from ..run_config import (
    DomainConfig,
    InnerLoopConfig,
    ModelConfig,
    NullSpaceConfig,
    RouterRowsConfig,
    RunConfig,
    TrainArgs,
)

__all__ = ["DomainConfig", "InnerLoopConfig", "ModelConfig", "NullSpaceConfig", "RouterRowsConfig", "RunConfig",
           "TrainArgs"]
