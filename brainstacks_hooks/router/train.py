"""Training the meta-router from cached features (the heavy base model never runs here).

Inputs are tensors computed once by :mod:`.features` (``[N, S, D]`` fp16 features and ``[N, S]`` masks)
and targets from :mod:`.oracle` (``[N, n_domains]`` in [0, 1]). An epoch is a few small matmuls per
batch, so it costs seconds.

* **Loss**: BCE-with-logits + ``margin_coef * mean(relu(margin - |sigmoid(logit) - 0.5|))``.
* **Split**: by prompt (:func:`split_by_prompt`): identical prompts (after whitespace normalisation)
  always fall on the same side, so validation never sees a training prompt.
* **Duplicates**: rows sharing a prompt key have identical features; with different targets they would
  teach contradictory answers (the reference code's reused datasets did). :func:`merge_duplicate_prompts`
  merges them into one row whose target is the element-wise max (the union of the routes).
* **Optimisation**: AdamW, cosine learning-rate decay to 0 over all optimizer steps, gradient clipping.
* **Validation metrics** (computed every epoch on the held-out prompts):

  - ``val_bce``: mean BCE (no margin term) over all validation rows and domains;
  - ``single_top1``: over single-domain rows (``is_mixed`` False), the fraction whose most probable domain
    has the highest target value (ties in the target, e.g. chat and math both at 0.8, all count as
    correct);
  - ``mixed_set``: over mixed rows (``is_mixed`` True), the fraction whose predicted set
    ``{d : p_d > 0.5}`` equals the target set ``{d : t_d > 0.5}`` exactly;
  - ``composite = 0.50 * single_top1 + 0.35 * mixed_set - 0.15 * val_bce`` (weights from the config).
    A metric without rows (no mixed validation rows, say) is reported as NaN and contributes 0.

* **Selection**: the epoch with the highest composite (the earliest on ties) is restored at the end.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from ..utils.logging import get_logger
from ..utils.seeding import seed_everything
from .config import RouterConfig
from .model import MetaRouter

logger = get_logger(__name__)


def prompt_key(prompt: str) -> str:
    """Grouping key of a prompt: whitespace-normalised text (case and punctuation kept)."""
    return " ".join(prompt.split())


def split_by_prompt(
    prompts: Sequence[str], val_fraction: float, seed: int, min_val_groups: int = 1
) -> tuple[list[int], list[int]]:
    """Split row indices into train and validation with no prompt on both sides.

    Rows are grouped by :func:`prompt_key`; the sorted group keys are shuffled with ``random.Random(seed)``
    and the first ``n_val`` groups go to validation, where
    ``n_val = min(max(ceil(val_fraction * n_groups), min_val_groups), n_groups // 2)``: at least
    ``min_val_groups`` prompts, but never more than half of them (tiny data keeps a training majority).

    Returns:
        ``(train_indices, val_indices)``, each sorted.

    Raises:
        DataError: fewer than 2 distinct prompts.
    """
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(prompt_key(p), []).append(i)
    n_groups = len(groups)
    if n_groups < 2:
        raise DataError(f"need at least 2 distinct prompts to split (got {n_groups})")
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_val = min(max(math.ceil(val_fraction * n_groups), min_val_groups), n_groups // 2)
    val = sorted(i for k in keys[:n_val] for i in groups[k])
    train = sorted(i for k in keys[n_val:] for i in groups[k])
    return train, val


@dataclass
class RouterData:
    """Cached router training rows.

    Attributes:
        features: ``[N, S, D]`` base-model features (fp16 or fp32).
        attention_mask: ``[N, S]``, 1 on real tokens.
        targets: ``[N, n_domains]`` targets in [0, 1], columns in ``domains`` order.
        prompts: ``N`` prompt texts (or stable prompt keys); rows with the same :func:`prompt_key` are the
            same prompt.
        is_mixed: ``[N]`` bool, True for mixed-domain rows (scored by ``mixed_set``), False for single-
            domain rows (scored by ``single_top1``).
        domains: Domain names, one per target column.
    """

    features: torch.Tensor
    attention_mask: torch.Tensor
    targets: torch.Tensor
    prompts: list[str]
    is_mixed: torch.Tensor
    domains: list[str]

    def __post_init__(self) -> None:
        self.is_mixed = torch.as_tensor(self.is_mixed, dtype=torch.bool)
        self.targets = self.targets.float()
        self.prompts = list(self.prompts)
        self.domains = list(self.domains)
        n = self.features.shape[0]
        if self.features.dim() != 3:
            raise DataError(f"features must be [N, S, D], got {tuple(self.features.shape)}")
        if self.attention_mask.shape != self.features.shape[:2]:
            raise DataError(
                f"attention_mask {tuple(self.attention_mask.shape)} does not match features "
                f"{tuple(self.features.shape[:2])}"
            )
        if self.targets.shape != (n, len(self.domains)):
            raise DataError(f"targets must be [{n}, {len(self.domains)}], got {tuple(self.targets.shape)}")
        if len(self.prompts) != n or self.is_mixed.shape != (n,):
            raise DataError(
                f"prompts ({len(self.prompts)}) and is_mixed {tuple(self.is_mixed.shape)} need {n} rows"
            )
        if bool(((self.targets < 0) | (self.targets > 1)).any()) or not bool(
            torch.isfinite(self.targets).all()
        ):
            raise DataError("targets must be finite and in [0, 1]")

    def __len__(self) -> int:
        return self.features.shape[0]

    def subset(self, indices: Sequence[int]) -> RouterData:
        """Rows ``indices`` as a new :class:`RouterData` (tensors are indexed, not copied twice)."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return RouterData(
            self.features[idx],
            self.attention_mask[idx],
            self.targets[idx],
            [self.prompts[i] for i in idx.tolist()],
            self.is_mixed[idx],
            self.domains,
        )


def merge_duplicate_prompts(data: RouterData) -> tuple[RouterData, int]:
    """Merge rows with the same :func:`prompt_key` into one row.

    The merged target is the element-wise max of the rows' targets (the union of their routes) and the
    row is mixed if any merged row was mixed or more than one domain ends up above 0.5.

    Returns:
        ``(merged data, number of prompts whose rows had conflicting targets)``.
    """
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(data.prompts):
        groups.setdefault(prompt_key(p), []).append(i)
    if len(groups) == len(data):
        return data, 0
    keep = [rows[0] for rows in groups.values()]
    targets = torch.stack([data.targets[rows].amax(dim=0) for rows in groups.values()])  # [G, n_domains]
    n_conflicts = sum(
        1
        for rows in groups.values()
        if len(rows) > 1 and not bool((data.targets[rows] == data.targets[rows[0]]).all())
    )
    is_mixed = torch.tensor([bool(data.is_mixed[rows].any()) for rows in groups.values()])
    is_mixed |= (targets > 0.5).sum(dim=1) > 1
    idx = torch.tensor(keep)
    merged = RouterData(
        data.features[idx],
        data.attention_mask[idx],
        targets,
        [data.prompts[i] for i in keep],
        is_mixed,
        data.domains,
    )
    return merged, n_conflicts


@dataclass
class EpochMetrics:
    """Metrics of one epoch (validation metrics are NaN when their row set is empty)."""

    epoch: int
    train_loss: float
    train_bce: float
    train_margin: float
    val_bce: float
    single_top1: float
    mixed_set: float
    composite: float
    lr: float
    seconds: float
    top1_margin: float = float("nan")
    score_spread: float = float("nan")


@dataclass
class RouterTrainResult:
    """Outcome of :func:`train_router`.

    Attributes:
        router: The router with the best epoch's weights, in eval mode.
        best_epoch: 1-based epoch whose weights were restored.
        best_score: Its composite score.
        history: One :class:`EpochMetrics` per epoch.
        train_indices, val_indices: Rows of the (de-duplicated) data used on each side.
        n_conflicting_prompts: Prompts whose duplicate rows had different targets (merged).
    """

    router: MetaRouter
    best_epoch: int
    best_score: float
    history: list[EpochMetrics]
    train_indices: list[int]
    val_indices: list[int]
    n_conflicting_prompts: int = 0

    def history_dicts(self) -> list[dict[str, float]]:
        """History as JSON-ready dictionaries."""
        return [asdict(m) for m in self.history]


def composite_score(single_top1: float, mixed_set: float, val_bce: float, config: RouterConfig) -> float:
    """``w_single * single_top1 + w_mixed * mixed_set - w_bce * val_bce``; NaN terms count as 0."""

    def z(x: float) -> float:
        return 0.0 if math.isnan(x) else x

    return (
        config.score_weight_single * z(single_top1)
        + config.score_weight_mixed * z(mixed_set)
        - config.score_weight_bce * z(val_bce)
    )


def select_best_epoch(history: Sequence[EpochMetrics]) -> EpochMetrics:
    """The epoch with the highest composite score; the earliest wins ties."""
    if not history:
        raise ValueError("empty history")
    best = history[0]
    for m in history[1:]:
        if m.composite > best.composite:
            best = m
    return best


def calibration_error(probs: torch.Tensor, targets: torch.Tensor, bins: int = 10) -> float:
    """Expected calibration error of independent sigmoid scores against 0/1 targets (``targets > 0.5``).

    Scores are put in ``bins`` equal-width bins; the error is the mean over bins of
    ``|mean score - fraction positive|`` weighted by the bin's share of all (row, domain) scores.
    """
    p, y = probs.reshape(-1).float(), (targets.reshape(-1) > 0.5).float()
    if not len(p):
        return float("nan")
    idx = (p * bins).long().clamp(0, bins - 1)
    err = torch.zeros(())
    for b in range(bins):
        sel = idx == b
        if bool(sel.any()):
            err += sel.float().mean() * (p[sel].mean() - y[sel].mean()).abs()
    return float(err)


def validation_metrics(
    probs: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, is_mixed: torch.Tensor,
    min_margin: float = 0.05,
) -> dict[str, float]:
    """``val_bce``, ``single_top1``, ``mixed_set`` and the tie diagnostics (see the module docstring).

    ``single_top1`` counts a single-domain row only when its top domain has the highest target *and* beats the
    runner-up score by at least ``min_margin``: a router whose scores differ in the fourth decimal scores 0.
    ``top1_margin`` (mean top minus runner-up score), ``score_spread`` (mean highest minus lowest score) and
    ``calibration`` (:func:`calibration_error`) are reported beside them.

    Args:
        probs: ``[N, n]`` sigmoid probabilities.
        logits: ``[N, n]`` logits (for the BCE).
        targets: ``[N, n]`` targets.
        is_mixed: ``[N]`` bool.
        min_margin: Score margin a top-1 needs to count.
    """
    nan = float("nan")
    val_bce = float(F.binary_cross_entropy_with_logits(logits, targets)) if len(targets) else nan
    single = ~is_mixed
    top1_margin = spread = nan
    if bool(single.any()):
        ps = probs[single]  # [Ns, n]
        top = ps.argmax(dim=1, keepdim=True)  # [Ns, 1]
        t = targets[single]  # [Ns, n]
        best = t.gather(1, top).squeeze(1) >= t.max(dim=1).values - 1e-6  # [Ns]
        two = ps.topk(min(2, ps.shape[1]), dim=1).values  # [Ns, 2]
        margin = two[:, 0] - two[:, -1] if ps.shape[1] > 1 else two[:, 0]  # [Ns]
        single_top1 = float((best & (margin >= min_margin)).float().mean())
        top1_margin = float(margin.mean())
        spread = float((ps.max(dim=1).values - ps.min(dim=1).values).mean())
    else:
        single_top1 = nan
    if bool(is_mixed.any()):
        same = ((probs[is_mixed] > 0.5) == (targets[is_mixed] > 0.5)).all(dim=1)  # [Nm]
        mixed_set = float(same.float().mean())
    else:
        mixed_set = nan
    return {"val_bce": val_bce, "single_top1": single_top1, "mixed_set": mixed_set, "top1_margin": top1_margin,
            "score_spread": spread, "calibration": calibration_error(probs, targets)}


@torch.no_grad()
def evaluate_router(
    router: MetaRouter,
    data: RouterData,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    indices: Sequence[int] | None = None,
    min_margin: float = 0.05,
) -> dict[str, float]:
    """Validation metrics of ``router`` on ``data`` (or its rows ``indices``), in eval mode."""
    rows = torch.as_tensor(list(indices) if indices is not None else range(len(data)), dtype=torch.long)
    was_training = router.training
    router.eval()
    logits = []
    for start in range(0, len(rows), batch_size):
        idx = rows[start : start + batch_size]
        f = data.features[idx].to(device)  # [b, S, D]
        m = data.attention_mask[idx].to(device)  # [b, S]
        logits.append(router(f, m).float().cpu())
    router.train(was_training)
    z = torch.cat(logits) if logits else torch.zeros(0, len(data.domains))  # [N, n]
    return validation_metrics(torch.sigmoid(z), z, data.targets[rows], data.is_mixed[rows], min_margin)


def _cosine(total_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))

    return f


def train_router(
    data: RouterData,
    config: RouterConfig | None = None,
    *,
    device: str | torch.device | None = None,
    split: tuple[Sequence[int], Sequence[int]] | None = None,
    on_epoch_end: Callable[[EpochMetrics, MetaRouter], None] | None = None,
    progress: bool = True,
) -> RouterTrainResult:
    """Train a :class:`MetaRouter` on cached features and restore its best epoch.

    Args:
        data: Cached rows (see :class:`RouterData`). Duplicate prompts are merged first.
        config: Router configuration (paper defaults when ``None``).
        device: Training device; CUDA when available by default.
        split: Optional explicit ``(train_indices, val_indices)`` into the *merged* data; by default
            :func:`split_by_prompt` with the config's ``val_fraction``, ``min_val_groups`` and ``seed``.
        on_epoch_end: Called after each epoch's validation with the metrics and the live router.
        progress: Show a tqdm bar over epochs.

    Returns:
        A :class:`RouterTrainResult`.
    """
    config = config or RouterConfig()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data, n_conflicts = merge_duplicate_prompts(data)
    if n_conflicts:
        logger.warning(
            "merged %d prompts whose duplicate rows had different targets (element-wise max)", n_conflicts
        )
    if split is None:
        train_idx, val_idx = split_by_prompt(
            data.prompts, config.val_fraction, config.seed, config.min_val_groups
        )
    else:
        train_idx, val_idx = list(split[0]), list(split[1])
        overlap = {prompt_key(data.prompts[i]) for i in train_idx} & {
            prompt_key(data.prompts[i]) for i in val_idx
        }
        if overlap:
            raise ConfigError(f"explicit split has {len(overlap)} prompts on both sides")
    if not train_idx or not val_idx:
        raise DataError(f"empty split (train {len(train_idx)}, val {len(val_idx)})")
    # Rows are gathered per batch from the cached tensors (no copy of the features per split).
    train_rows = torch.tensor(train_idx, dtype=torch.long)
    logger.info(
        "router data: %d train rows, %d val rows (%d mixed), %d domains",
        len(train_idx),
        len(val_idx),
        int(data.is_mixed[val_idx].sum()),
        len(data.domains),
    )

    seed_everything(config.seed)
    router = MetaRouter(
        data.features.shape[-1], data.domains, config.hidden, config.dropout, config.temperature_clamp,
        query_init_std=config.query_init_std, per_domain_head=config.per_domain_head,
    )
    if config.normalize_features:
        router.fit_feature_norm(data.features[train_rows], data.attention_mask[train_rows])
    router = router.to(device)
    optimizer = torch.optim.AdamW(router.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_rows) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(steps_per_epoch * config.epochs))
    gen = torch.Generator().manual_seed(config.seed)

    history: list[EpochMetrics] = []
    best_state: dict[str, torch.Tensor] | None = None
    best: EpochMetrics | None = None
    for epoch in tqdm(range(1, config.epochs + 1), desc="router epochs", disable=not progress):
        t0 = time.perf_counter()
        router.train()
        order = train_rows[torch.randperm(len(train_rows), generator=gen)]
        sums = torch.zeros(3)
        for start in range(0, len(order), config.batch_size):
            idx = order[start : start + config.batch_size]
            f = data.features[idx].to(device)  # [b, S, D]
            m = data.attention_mask[idx].to(device)  # [b, S]
            t = data.targets[idx].to(device)  # [b, n]
            logits = router(f, m)  # [b, n]
            loss, bce, pen = router.loss(logits, t, config.margin_coef, config.margin)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(router.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            sums += torch.stack([loss.detach(), bce.detach(), pen.detach()]).cpu() * len(idx)
        train_loss, train_bce, train_margin = (sums / len(train_rows)).tolist()
        vm = evaluate_router(router, data, max(64, config.batch_size), device, indices=val_idx,
                             min_margin=config.top1_margin)
        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=train_loss,
            train_bce=train_bce,
            train_margin=train_margin,
            val_bce=vm["val_bce"],
            single_top1=vm["single_top1"],
            mixed_set=vm["mixed_set"],
            composite=composite_score(vm["single_top1"], vm["mixed_set"], vm["val_bce"], config),
            lr=optimizer.param_groups[0]["lr"],
            seconds=time.perf_counter() - t0,
            top1_margin=vm["top1_margin"],
            score_spread=vm["score_spread"],
        )
        history.append(metrics)
        logger.info(
            "router epoch %d: loss %.4f val_bce %.4f single_top1 %.3f mixed_set %.3f composite %.4f",
            epoch,
            train_loss,
            metrics.val_bce,
            metrics.single_top1,
            metrics.mixed_set,
            metrics.composite,
        )
        if best is None or metrics.composite > best.composite:
            best = metrics
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in router.state_dict().items()}
        if on_epoch_end is not None:
            on_epoch_end(metrics, router)

    if best is None or best_state is None:  # unreachable: config.epochs >= 1
        raise ConfigError("no epoch was run")
    router.load_state_dict(best_state)
    router.eval()
    logger.info("router: restored epoch %d (composite %.4f)", best.epoch, best.composite)
    return RouterTrainResult(
        router=router,
        best_epoch=best.epoch,
        best_score=best.composite,
        history=history,
        train_indices=list(train_idx),
        val_indices=list(val_idx),
        n_conflicting_prompts=n_conflicts,
    )
