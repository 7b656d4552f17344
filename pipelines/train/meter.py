"""Rank 0's running figures and the metrics file the driver follows (pipelines.console)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys.metrics import auc

METRICS_FILE = "metrics.jsonl"


class Meter:
    """Rank-0 bookkeeping: loss and AUC over recent batches, the examples/s of the last
    logging interval (not since the start, which hides a slowdown), `metrics.jsonl`."""

    def __init__(self, run_dir: Path, world: int, window: int = 20) -> None:
        self.path = run_dir / METRICS_FILE
        self.world = world
        self.window = window
        self.scores: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.losses: list[float] = []
        self._examples = 0
        self._since = time.perf_counter()

    def add(self, logits: torch.Tensor, labels: torch.Tensor, loss: float) -> None:
        self.scores = [*self.scores[-self.window + 1 :], logits.detach().float().cpu().numpy()]
        self.labels = [*self.labels[-self.window + 1 :], labels.cpu().numpy()]
        self.losses = [*self.losses[-self.window + 1 :], loss]
        self._examples += len(labels) * self.world

    def snapshot(self, step: int, epoch: int) -> dict[str, float]:
        """The interval's figures; the next interval's rate counts from here."""
        labels = np.concatenate(self.labels)
        running_auc = auc(labels, np.concatenate(self.scores)) if 0 < labels.mean() < 1 else 0.5
        now = time.perf_counter()
        rate = self._examples / max(now - self._since, 1e-9)
        self._examples, self._since = 0, now
        return {
            "step": step,
            "epoch": epoch,
            "loss": float(np.mean(self.losses)),
            "running_auc": float(running_auc),
            "examples_per_s": rate,
        }

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as out:
            out.write(json.dumps(record, default=float) + "\n")
