"""Which rows train and which validate, decided once per run.

A split is the training files, the validation files and, when validation rows are held out
of the training files, one polars predicate that picks them. Ray Data's streams, the
vocabularies and OptEmbed's search all apply that same predicate, so they agree row for
row. The predicate reads only the row itself (and, for leave_last, a per-user table built
here), never its position in a file, which is why it holds under any block order.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import pyarrow as pa
import ray.data

from recsys.config import ConfigError, ExperimentConfig
from recsys.logs import parquet_files, scan_log

DAY = 86_400
_U64 = pl.UInt64


@dataclass(frozen=True)
class Split:
    """Training files, validation files (None: no validation) and the rows of the training
    files that validate instead of training (None: all of them train)."""

    train_files: list[str]
    valid_files: list[str] | None
    held_out: pl.Expr | None = None

    def training_rows(self) -> pl.LazyFrame:
        """The training rows as a lazy polars scan (vocabularies count only these)."""
        log = scan_log(self.train_files)
        return log if self.held_out is None else log.filter(~self.held_out.fill_null(False))

    def datasets(self, columns: list[str]) -> dict[str, ray.data.Dataset]:
        """Ray Data streams `train` and, when there is validation, `valid`."""
        train = _read(self.train_files, columns)
        if self.valid_files is None:
            return {"train": train}
        if self.held_out is None:
            return {"train": train, "valid": _read(self.valid_files, columns)}
        return {
            "train": _rows(train, self.held_out, keep=False),
            "valid": _rows(train, self.held_out, keep=True),
        }


def make_split(cfg: ExperimentConfig) -> Split:
    """The run's split from the `data` section (see DataConfig for the choices)."""
    d = cfg.data
    if d.train is None:
        raise ConfigError("data.train: no training log given")
    train = [str(p) for p in parquet_files(d.train)]
    if d.valid is not None:
        return Split(train, [str(p) for p in parquet_files(d.valid)])
    if d.split == "days":
        if d.valid_days == 0:
            return Split(train, None)
        return Split(train, train, pl.col(cfg.features.timestamp) >= _day_cutoff(cfg, train))
    if d.split == "random":
        return Split(train, train, _random_rows(cfg, d.valid_ratio, d.split_seed))
    return Split(train, train, _newest_per_user(cfg, train))


def _day_cutoff(cfg: ExperimentConfig, files: list[str]) -> int:
    """First second of the newest `valid_days` UTC days."""
    ts = cfg.features.timestamp
    span = scan_log(files).select(
        pl.col(ts).min().alias("oldest"), pl.col(ts).max().alias("newest")
    )
    oldest, newest = span.collect().row(0)
    cutoff = (newest // DAY - cfg.data.valid_days + 1) * DAY
    if oldest >= cutoff:
        raise ValueError(
            f"{cfg.data.train}: data.valid_days={cfg.data.valid_days} leaves no training rows "
            f"(the log spans {(newest - oldest) // DAY + 1} day(s))"
        )
    return cutoff


def _random_rows(cfg: ExperimentConfig, ratio: float, seed: int) -> pl.Expr:
    """A seeded `ratio` of rows: splitmix64 over the row's timestamp and single-valued IDs,
    so a row's side depends on its content only (identical rows fall on one side)."""
    f = cfg.features
    columns = [f.timestamp, *(s.name for s in f.sparse if not s.multi_valued)]
    if f.user_id and f.user_id not in columns:
        columns.append(f.user_id)
    z = pl.lit(seed % 2**64, dtype=_U64)
    for name in columns:
        z = _splitmix64(z ^ pl.col(name).fill_null(0).cast(_U64, wrap_numerical=True))
    return (z // 2**11).cast(pl.Float64) < ratio * 2.0**53


def _splitmix64(z: pl.Expr) -> pl.Expr:
    """The splitmix64 finalizer in polars' wrapping UInt64 arithmetic (`//` is a shift)."""
    z = z + pl.lit(0x9E3779B97F4A7C15, dtype=_U64)
    z = (z ^ (z // 2**30)) * pl.lit(0xBF58476D1CE4E5B9, dtype=_U64)
    z = (z ^ (z // 2**27)) * pl.lit(0x94D049BB133111EB, dtype=_U64)
    return z ^ (z // 2**31)


def _newest_per_user(cfg: ExperimentConfig, files: list[str]) -> pl.Expr:
    """Each user's rows at their newest timestamp, for users seen at two or more.

    The per-user table travels inside the predicate to every reader: 16 bytes per user.
    """
    user, ts = cfg.features.user_id, cfg.features.timestamp
    assert user is not None  # the config refuses leave_last without features.user_id
    newest = (
        scan_log(files)
        .group_by(user)
        .agg(pl.col(ts).max().alias("newest"), pl.col(ts).min().alias("oldest"))
        .filter(pl.col("newest") > pl.col("oldest"))
        .collect()
    )
    if newest.height == 0:
        raise ValueError(
            f"{cfg.data.train}: data.split leave_last finds no user seen at two timestamps"
        )
    last = pl.col(user).replace_strict(
        newest[user], newest["newest"], default=None, return_dtype=pl.Int64
    )
    return pl.col(ts) == last


def _read(files: list[str], columns: list[str]) -> ray.data.Dataset:
    return ray.data.read_parquet(files, columns=columns, partitioning=None)


def _rows(log: ray.data.Dataset, predicate: pl.Expr, keep: bool) -> ray.data.Dataset:
    """The rows where `predicate` is `keep` (null counts as False), in stream order."""
    names = list(dict.fromkeys(predicate.meta.root_names()))

    def select(batch: pa.Table) -> pa.Table:
        mask = pl.from_arrow(batch.select(names)).select(predicate.fill_null(False))
        hit = mask.to_series().to_numpy()
        return batch.filter(pa.array(hit if keep else ~hit))

    return log.map_batches(select, batch_format="pyarrow", zero_copy_batch=True)


def count_rows(split: Split) -> tuple[int, int | None]:
    """Training rows and validation rows (None without validation), counted by polars."""
    train = split.training_rows().select(pl.len()).collect().item()
    if split.valid_files is None:
        return train, None
    valid = scan_log(split.valid_files)
    if split.held_out is not None:
        valid = valid.filter(split.held_out.fill_null(False))
    return train, valid.select(pl.len()).collect().item()
