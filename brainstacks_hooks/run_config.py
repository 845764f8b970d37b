"""Configs of the SFT pipeline (paper sections 3.3-3.5 defaults), loadable from YAML."""

from __future__ import annotations

from dataclasses import dataclass, field

from .constants import EMBEDDED_MODEL_NAME
from .data.decontamination import DecontaminationConfig
from .data.sources import HFSource
from .errors import ConfigError
from .stacks.config import StackConfig


@dataclass
class ModelConfig:
    """Which base model to load and how."""

    name_or_path: str = EMBEDDED_MODEL_NAME
    backend: str = "hf"  # hf | bnb4 | unsloth
    dtype: str = "auto"
    revision: str | None = None
    max_seq_length: int = 2048


@dataclass
class TrainArgs:
    """Per-round SFT settings (passed to TRL ``SFTConfig``)."""

    max_steps: int = 500
    batch_size: int = 4
    gradient_accumulation_steps: int = 4
    learning_rate: float = 1e-4
    warmup_steps: int = 40
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "linear"
    adam_beta2: float = 0.95
    max_length: int = 512
    eval_steps: int = 50
    logging_steps: int = 10
    eval_batch_size: int = 8
    bf16: bool = True  # autocast in bf16 (CPU too); fp32 otherwise
    fp16: bool = False  # fp16 autocast + GradScaler (GPUs without bf16, e.g. Colab's T4); set bf16: false with it
    gradient_checkpointing: bool = False
    use_cpu: bool | None = None  # None: CPU when no CUDA device is present

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_size < 1 or self.eval_steps < 1:
            raise ConfigError("max_steps, batch_size and eval_steps must be >= 1")
        if self.bf16 and self.fp16:
            raise ConfigError("train.bf16 and train.fp16 are exclusive: set one (fp16 on GPUs without bf16, e.g. T4)")


@dataclass
class InnerLoopConfig:
    """Residual boosting: rounds, acceptance and the best-weights callback."""

    max_inner_rounds: int = 3
    min_loss_delta: float = 0.002
    spike_threshold: float = 0.1
    patience: int = 4


@dataclass
class NullSpaceConfig:
    """Null-space projection against earlier domains (paper 3.5)."""

    enabled: bool = True
    directions_per_domain: int = 64
    num_samples: int = 64  # validation sequences of each previous domain
    max_rows: int = 1024  # token rows kept per projection for the SVD (uniformly sampled)
    niter: int = 2
    # whose deltas a finished domain's directions come from: "isolated" (its own stacks, the default) or
    # "aggregate" (the summed delta of every frozen stack up to it, the condition the paper collects under)
    collection: str = "isolated"

    def __post_init__(self) -> None:
        if self.collection not in ("isolated", "aggregate"):
            raise ConfigError(f"null_space.collection: {self.collection!r} is not 'isolated' or 'aggregate'")


@dataclass
class RouterRowsConfig:
    """Rows SFT sets aside for the meta-router: never trained on by any stack, recorded in the run directory.

    ``train_per_domain`` rows of each domain's *train* split outside SFT's sample become the oracle's rows
    (``rows/router_train.jsonl``: outcome targets on prompts the stacks never saw, paper 5.1);
    ``test_per_domain`` rows of its *validation* split outside SFT's validation sample are the held-out rows
    every router quality number is measured on (``rows/router_test.jsonl``). ``gap_domains`` (e.g.
    ``[medical, reasoning]`` when the run trains neither) contribute test rows only, to measure the gap flag
    on prompts of untrained domains.
    """

    train_per_domain: int = 200
    test_per_domain: int = 100
    gap_domains: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.train_per_domain < 0 or self.test_per_domain < 0:
            raise ConfigError("router_rows.train_per_domain and test_per_domain must be >= 0")


@dataclass
class DomainConfig:
    """One domain of the curriculum.

    ``rl`` names RL configs (files or shipped names such as ``rl_grpo_math_cpu``) whose rounds run after the
    domain's SFT rounds and before its null space is collected and the next domain starts (the paper's order;
    ``brainstacks train`` runs them through :func:`brainstacks_hooks.rl.round.refine_domain`).
    """

    name: str
    hf_sources: list[HFSource] = field(default_factory=list)
    train_samples: int | None = None
    val_samples: int = 64
    max_steps: int | None = None
    max_inner_rounds: int | None = None
    learning_rate: float | None = None
    rl: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    """A whole SFT run: model, stacks, data, training and the domain curriculum."""

    output_dir: str = "runs/brainstacks"
    seed: int = 42
    data_dir: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    stack: StackConfig = field(default_factory=StackConfig)
    train: TrainArgs = field(default_factory=TrainArgs)
    inner: InnerLoopConfig = field(default_factory=InnerLoopConfig)
    null_space: NullSpaceConfig = field(default_factory=NullSpaceConfig)
    decontamination: DecontaminationConfig = field(default_factory=DecontaminationConfig)
    eval_benchmarks: list[str] = field(default_factory=list)  # n-gram decontamination against these eval sets
    domains: list[DomainConfig] = field(default_factory=list)
    router_rows: RouterRowsConfig = field(default_factory=RouterRowsConfig)

    def __post_init__(self) -> None:
        names = [d.name for d in self.domains]
        if len(set(names)) != len(names):
            raise ConfigError(f"domain names must be unique: {names}")

    def domain(self, name: str) -> DomainConfig:
        """The config of one domain."""
        for d in self.domains:
            if d.name == name:
                return d
        raise ConfigError(f"unknown domain {name!r}; configured: {[d.name for d in self.domains]}")
