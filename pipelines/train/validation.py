"""Validation during training: score the held-out split, track the best checkpoint, stop
early when the monitored metric stops improving.

Every validation row is scored once (the split is not balanced by dropping rows). The ranks'
predictions go to rank 0 only (`gather_object`), which computes the metrics
once and broadcasts them: no rank holds everyone's predictions but rank 0, which needs
them all for AUC. The monitor's state lives in the checkpointed progress, so a resumed
run stops (and picks its best) where an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from recsys.batch import BatchConverter
from recsys.config import ExperimentConfig
from recsys.metrics import evaluate_predictions

LOWER_IS_BETTER = frozenset({"logloss"})


@dataclass
class Monitor:
    """Early stopping on `metric` (`valid_<metric>` of each validation): the best value,
    the checkpoint that holds it, the validations since it improved and the learning-rate
    scale that reduce-on-plateau (`lr_decay` per validation without a gain) has reached."""

    metric: str
    patience: int | None
    lr_decay: float | None = None
    lr_scale: float = 1.0
    best_value: float | None = None
    best_step: int | None = None
    best_checkpoint: str | None = None
    since_best: int = 0
    validated_step: int = -1  # the last step validated, so no step is validated twice
    history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def of(cls, cfg: ExperimentConfig, saved: dict[str, Any] | None) -> Monitor:
        """A new monitor, or the one of a resumed run's progress."""
        monitor = cls(cfg.train.monitor, cfg.train.patience, cfg.train.lr_decay)
        if saved:
            for key, value in saved.items():
                setattr(monitor, key, value)
            # a resumed run may be given others
            monitor.patience, monitor.lr_decay = cfg.train.patience, cfg.train.lr_decay
        return monitor

    def state(self) -> dict[str, Any]:
        return asdict(self)

    def update(self, step: int, scores: dict[str, Any], checkpoint: str) -> bool:
        """Record a validation at `step`, whose state `checkpoint` will hold; True when it
        is the best so far. A metric that is undefined here (no groups) never improves."""
        self.validated_step = step
        value = scores.get(self.metric)
        self.history.append({"step": step, **{k: v for k, v in scores.items() if _number(v)}})
        lower = self.metric in LOWER_IS_BETTER
        better = _number(value) and (
            self.best_value is None
            or (value < self.best_value if lower else value > self.best_value)
        )
        if better:
            self.best_value, self.best_step, self.best_checkpoint = float(value), step, checkpoint
            self.since_best = 0
        else:
            self.since_best += 1
            if self.lr_decay is not None:
                self.lr_scale *= self.lr_decay
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.since_best >= self.patience


def set_lr_scale(
    optimizer: torch.optim.Optimizer, initial: list[float], scale: float, floor: float
) -> None:
    """Every parameter group's learning rate at `scale` times its initial one, not below
    `floor` (torchrec's fused table optimizers read theirs at each `zero_grad`/`step`)."""
    for group, lr in zip(optimizer.param_groups, initial, strict=True):
        group["lr"] = max(lr * scale, min(floor, lr))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def validate(
    model: torch.nn.Module, shard: Any, cfg: ExperimentConfig, device: torch.device, batches: Any
) -> dict[str, Any]:
    """Metrics of the whole validation split (a collective call: every rank scores its
    share of `shard`, read through `batches`, and receives rank 0's figures)."""
    convert = BatchConverter(cfg.features)
    probs, labels, groups = [], [], []
    model.eval()
    with torch.no_grad():
        for table, real in _in_step((t for _, t in batches(shard, cfg)), device):
            batch = convert(table).to(device)
            prob = torch.sigmoid(model(batch)).float().cpu().numpy()
            if not real:
                continue
            probs.append(prob)
            labels.append(batch.labels.cpu().numpy())
            if batch.group is not None:
                groups.append(batch.group.cpu().numpy())
    model.train()
    local = (
        _joined(probs, np.float32),
        _joined(labels, np.float32),
        _joined(groups, np.int64) if groups else None,
    )
    rank, world = dist.get_rank(), dist.get_world_size()
    parts: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(local, parts, dst=0)
    scores: list[dict[str, Any]] = [{}]
    if rank == 0:
        assert parts is not None
        p, y = np.concatenate([q[0] for q in parts]), np.concatenate([q[1] for q in parts])
        grouped = [q[2] for q in parts if q[2] is not None]  # a rank may score no rows
        g = np.concatenate(grouped) if grouped else None
        if len(y) and 0 < y.sum() < len(y):
            scores[0] = evaluate_predictions(y, p, g if cfg.eval.gauc else None)
        else:
            scores[0] = {"rows": len(y), "positives": int(y.sum())}
    dist.broadcast_object_list(scores, src=0)
    return scores[0]


def _in_step(tables: Iterator[pa.Table], device: torch.device) -> Iterator[tuple[pa.Table, bool]]:
    """A rank's validation batches, as (batch, real) pairs, until every rank has run out.

    The validation split is not balanced (no row is dropped), so ranks may hold unequal
    batches; a sharded model's forward is a collective, so a rank that has run out scores
    a one-row stand-in (real=False, discarded) while others still score. The stand-in is a
    row of the first rank that has one: a rank may receive no rows at all."""
    first = next(tables, None)
    samples: list[pa.Table | None] = [None] * dist.get_world_size()
    dist.all_gather_object(samples, None if first is None else first.slice(0, 1))
    stand_in = next((s for s in samples if s is not None), None)
    pending = first
    while stand_in is not None:
        left = torch.tensor([pending is not None], dtype=torch.int64, device=device)
        dist.all_reduce(left, op=dist.ReduceOp.MAX)
        if not left.item():
            return
        yield (stand_in, False) if pending is None else (pending, True)
        pending = next(tables, None) if pending is not None else None


def _joined(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype)
