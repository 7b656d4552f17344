"""Time-ordered train/validation split: the newest `data.valid_days` days validate."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recsys.config import ExperimentConfig
from recsys.logs import parquet_files

DAY = 86_400


def validation_cutoff(cfg: ExperimentConfig, path: str | Path) -> int | None:
    """First timestamp of the validation period (None when valid_days is 0)."""
    if cfg.data.valid_days == 0:
        return None
    files = [str(p) for p in parquet_files(path)]
    newest = (
        pl.scan_parquet(files, hive_partitioning=False)
        .select(pl.col(cfg.features.timestamp).max())
        .collect()
        .item()
    )
    cutoff = (newest // DAY - cfg.data.valid_days + 1) * DAY
    oldest = (
        pl.scan_parquet(files, hive_partitioning=False)
        .select(pl.col(cfg.features.timestamp).min())
        .collect()
        .item()
    )
    if oldest >= cutoff:
        raise ValueError(
            f"{path}: data.valid_days={cfg.data.valid_days} leaves no training rows "
            f"(the log spans {(newest - oldest) // DAY + 1} day(s))"
        )
    return cutoff
