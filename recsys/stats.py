"""Statistics of a Parquet log (`recsys stats`): one lazy polars pass, nothing per row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from recsys.config import ExperimentConfig
from recsys.logs import parquet_files, scan_log


def log_statistics(cfg: ExperimentConfig, path: str | Path) -> dict[str, Any]:
    """Rows, days, click rate per day, distinct IDs and bag/history lengths per feature."""
    f = cfg.features
    files = [str(p) for p in parquet_files(path)]
    log = scan_log(files)
    day = (pl.col(f.timestamp) // 86_400 * 86_400 * 1000).cast(pl.Datetime("ms")).dt.date()
    per_day = (
        log.group_by(day.alias("day"))
        .agg(pl.len().alias("rows"), pl.col(f.label).mean().alias("ctr"))
        .sort("day")
        .collect()
    )
    exprs: list[pl.Expr] = [pl.len().alias("rows"), pl.col(f.label).mean().alias("ctr")]
    if f.user_id:
        exprs.append(pl.col(f.user_id).n_unique().alias("users"))
    for feature in f.sparse:
        ids = pl.col(feature.name)
        if feature.multi_valued:
            exprs.append(ids.list.len().mean().alias(f"{feature.name}.mean_bag"))
            ids = ids.explode()
        exprs.append(ids.n_unique().alias(f"{feature.name}.distinct"))
    for seq in f.sequences:
        lengths = pl.col(seq.name).list.len()
        exprs += [
            lengths.mean().alias(f"{seq.name}.mean_len"),
            lengths.min().alias(f"{seq.name}.min_len"),
            lengths.max().alias(f"{seq.name}.max_len"),
        ]
    totals = log.select(exprs).collect().row(0, named=True)
    return {
        "files": len(files),
        "bytes": sum(Path(p).stat().st_size for p in files),
        **{k: v for k, v in totals.items() if "." not in k},
        "days": [
            {"day": str(r["day"]), "rows": r["rows"], "ctr": round(r["ctr"], 4)}
            for r in per_day.iter_rows(named=True)
        ],
        "features": _per_feature(totals),
    }


def _per_feature(totals: dict[str, Any]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for key, value in totals.items():
        if "." in key:
            name, stat = key.split(".", 1)
            out.setdefault(name, {})[stat] = round(value, 3) if isinstance(value, float) else value
    return out
