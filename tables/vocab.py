"""Vocabularies of the full-table variant: one lazy polars pass over the training log."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from recsys.config import ExperimentConfig, TableConfig
from recsys.logs import parquet_files, scan_log


def _ids_of(feature_names: list[str], multi: set[str]) -> list[pl.Expr]:
    return [
        (pl.col(f).explode() if f in multi else pl.col(f)).drop_nulls().alias("id")
        for f in feature_names
    ]


def build_vocabularies(
    cfg: ExperimentConfig, rows: str | Path | pl.LazyFrame
) -> dict[str, np.ndarray]:
    """Sorted int64 IDs per table with a vocabulary (full, or decoupled over full), seen at
    least `min_count` times in `rows` (a log path, or the training rows of a split, so that
    validation rows never leak into the vocabulary).

    With `num_embeddings` set, the most frequent `num_embeddings - 1` IDs are kept (row 0
    is the out-of-vocabulary row).
    """
    log = rows if isinstance(rows, pl.LazyFrame) else scan_log(parquet_files(rows))
    multi = {f.name for f in cfg.features.sparse if f.multi_valued}
    multi |= {s.name for s in cfg.features.sequences}
    out: dict[str, np.ndarray] = {}
    for table in cfg.tables:
        if not table.uses_vocabulary:
            continue
        for name, features in _features_per_table(table, cfg).items():
            out[name] = _vocabulary(log, features, multi, table)
    return out


def _features_per_table(table: TableConfig, cfg: ExperimentConfig) -> dict[str, list[str]]:
    """Table name -> every column whose IDs it serves (sequence histories included)."""
    by_table: dict[str, list[str]] = {}
    mapping = cfg.feature_tables()
    for feature, name in mapping.items():
        if name in table.table_names().values():
            by_table.setdefault(name, []).append(feature)
    return by_table


def _vocabulary(
    log: pl.LazyFrame, features: list[str], multi: set[str], table: TableConfig
) -> np.ndarray:
    ids = pl.concat([log.select(e) for e in _ids_of(features, multi)])
    counts = ids.group_by("id").agg(pl.len().alias("n")).filter(pl.col("n") >= table.min_count)
    if table.num_embeddings is not None:
        counts = counts.sort(["n", "id"], descending=[True, False]).head(table.num_embeddings - 1)
    vocab = counts.select("id").collect().to_series().to_numpy()
    return np.sort(vocab.astype(np.int64))
