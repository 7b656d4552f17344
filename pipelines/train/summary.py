"""The table `recsys train` closes with: what was read, how the best model scores, what it
cost, and where the artefacts are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.console import mebibytes, seconds, table
from pipelines.train.curve import CURVE_FILE
from pipelines.train.meter import METRICS_FILE


def best_validation(run_dir: Path) -> dict[str, Any] | None:
    """The validation record of the best checkpoint (the last one marked best)."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return None
    best = None
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("best") is True:
            best = record
    return best


def _per_feature(counts: dict[str, int] | None) -> str | None:
    """`12,340 (item 12,000, user 340)`: the total, then the features that have some."""
    if not counts:
        return None
    named = ", ".join(f"{f} {n:,}" for f, n in sorted(counts.items(), key=lambda c: -c[1]) if n)
    return f"{sum(counts.values()):,} ({named})"


def train_table(summary: dict[str, Any]) -> str:
    run_dir = Path(summary["run_dir"])
    m = summary["metrics"]
    best = best_validation(run_dir) or {}
    skipped = sum(summary["skipped_rows"].values())
    rows: list[tuple[str, Any]] = [
        ("training rows per epoch", m.get("train_rows")),
        ("rows skipped (bad)", skipped),
        ("rows unread per epoch", m.get("rows_unread_per_epoch")),
        ("IDs read as the OOV row", _per_feature(m.get("unknown_ids"))),
        ("steps", m.get("step")),
        ("epochs completed", m.get("epoch")),
        ("stopped early", m.get("stopped_early")),
        ("best step", best.get("step")),
        ("valid AUC", best.get("valid_auc")),
        ("valid logloss", best.get("valid_logloss")),
        ("valid GAUC", best.get("valid_gauc")),
        ("time", seconds(summary["seconds"])),
        ("peak memory (process tree)", mebibytes(summary["peak_tree_rss_bytes"])),
        ("best checkpoint", summary["checkpoint"]),
        ("learning curve", run_dir / CURVE_FILE if (run_dir / CURVE_FILE).exists() else None),
        ("logs", summary["logs"]),
    ]
    return table(f"train {run_dir.name}: done", rows)
