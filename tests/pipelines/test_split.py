"""Train/validation splits: each split against a reference written here, every `data:` split
key acting or refused, and Ray Data's two streams partitioning the log exactly as polars."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import ray

from pipelines.train.driver import preflight
from pipelines.train.split import DAY, _splitmix64, count_rows, make_split
from recsys.config import ExperimentConfig, config_from_dict
from recsys.contract import BadInputError
from recsys.logs import parquet_files
from recsys.synth.common import splitmix64
from tables.vocab import build_vocabularies

ROWS = 4_000


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three days of 40 users, several rows per user and second, split over two files."""
    tmp = tmp_path_factory.mktemp("split")
    rng = np.random.default_rng(7)
    base = 20_000 * DAY
    frame = pl.DataFrame(
        {
            "label": rng.integers(0, 2, ROWS).astype(np.int8),
            "timestamp": base + rng.integers(0, 3 * DAY, ROWS) // 600 * 600,
            "user_id": rng.integers(0, 40, ROWS),
            "item": rng.integers(0, 1_000, ROWS),
        }
    )
    (tmp / "log").mkdir()
    frame[: ROWS // 2].write_parquet(tmp / "log" / "a.parquet")
    frame[ROWS // 2 :].write_parquet(tmp / "log" / "b.parquet")
    return tmp


def _cfg(tmp: Path, user_id: str | None = "user_id", seed: int = 0, **data: object):
    return config_from_dict(
        {
            "name": "split",
            "data": {"train": str(tmp / "log"), **data},
            "features": {"user_id": user_id, "sparse": ["user_id", "item"]},
            "tables": [{"features": ["user_id", "item"], "embedding_dim": 4}],
            "model": {"name": "deepfm"},
            "train": {"seed": seed},
        }
    )


def _rows(frame: pl.DataFrame) -> list[tuple]:
    return sorted(frame.select("timestamp", "user_id", "item", "label").rows())


def _whole(tmp: Path) -> pl.DataFrame:
    return pl.read_parquet(tmp / "log")


def _held_out(cfg: ExperimentConfig) -> pl.DataFrame:
    split = make_split(cfg)
    assert split.held_out is not None
    return pl.read_parquet(split.train_files).filter(split.held_out.fill_null(False))


def test_day_split_holds_out_the_newest_utc_days(log: Path) -> None:
    frame = _whole(log)
    held = _held_out(_cfg(log, valid_days=2))
    first_day = frame["timestamp"].max() // DAY - 1
    assert _rows(held) == _rows(frame.filter(pl.col("timestamp") // DAY >= first_day))


def test_polars_splitmix64_equals_the_numpy_reference() -> None:
    keys = np.array([0, 1, 2**40 + 3, 2**63 + 7, 2**64 - 1], dtype=np.uint64)
    got = pl.DataFrame({"k": keys}).select(_splitmix64(pl.col("k"))).to_series().to_numpy()
    np.testing.assert_array_equal(got, splitmix64(keys, 0))


def test_random_split_is_a_seeded_ratio_of_rows(log: Path) -> None:
    frame = _whole(log)
    held = _held_out(_cfg(log, split="random", valid_ratio=0.25))
    # 4,000 Bernoulli(0.25) draws: 5 standard deviations is 137 rows
    assert abs(held.height - ROWS / 4) < 5 * (ROWS * 0.25 * 0.75) ** 0.5
    again = _held_out(_cfg(log, split="random", valid_ratio=0.25))
    assert _rows(held) == _rows(again)
    other = _held_out(_cfg(log, split="random", valid_ratio=0.25, split_seed=1))
    assert _rows(held) != _rows(other)
    # the same rows whatever the seed of training
    seeded = _held_out(_cfg(log, seed=5, split="random", valid_ratio=0.25))
    assert _rows(held) == _rows(seeded)
    assert set(_rows(held)) <= set(_rows(frame))


def test_leave_last_holds_out_each_users_newest_timestamp(log: Path) -> None:
    frame = _whole(log)
    newest: dict[int, int] = {}
    oldest: dict[int, int] = {}
    for ts, user in frame.select("timestamp", "user_id").rows():
        newest[user] = max(newest.get(user, ts), ts)
        oldest[user] = min(oldest.get(user, ts), ts)
    expected = [r for r in _rows(frame) if r[0] == newest[r[1]] and newest[r[1]] > oldest[r[1]]]
    assert _rows(_held_out(_cfg(log, split="leave_last"))) == expected


def test_explicit_valid_and_glob_paths(log: Path) -> None:
    cfg = _cfg(log, train=str(log / "log" / "a*.parquet"), valid=str(log / "log" / "b.parquet"))
    split = make_split(cfg)
    assert split.train_files == [str(log / "log" / "a.parquet")]
    assert split.valid_files == [str(log / "log" / "b.parquet")] and split.held_out is None
    with pytest.raises(FileNotFoundError, match=r"c\*\.parquet: the glob matches no Parquet"):
        parquet_files(log / "log" / "c*.parquet")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"split": "random", "valid_days": 2}, "data.valid_days: only split 'days'"),
        ({"valid_ratio": 0.2}, "data.valid_ratio: only split 'random'"),
        ({"split_seed": 3}, "data.split_seed: only split 'random'"),
        ({"valid": "x.parquet", "valid_days": 2}, "data.valid_days: has no effect"),
        ({"valid": "x.parquet", "split": "random"}, "data.split: has no effect"),
        ({"eval": "x.parquet"}, "eval"),
    ],
)
def test_split_keys_a_split_does_not_read_are_refused(log: Path, data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _cfg(log, **data)


def test_leave_last_needs_users(log: Path) -> None:
    with pytest.raises(ValueError, match=r"'leave_last' needs features\.user_id"):
        _cfg(log, user_id=None, split="leave_last")


@pytest.mark.parametrize("split", ["random", "leave_last"])
def test_ray_streams_partition_the_log_as_polars_does(log: Path, split: str) -> None:
    cfg = _cfg(log, split=split)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        datasets = make_split(cfg).datasets(["timestamp", "user_id", "item", "label"])
        train, valid = (pl.from_pandas(datasets[k].to_pandas()) for k in ("train", "valid"))
    finally:
        ray.shutdown()
    assert _rows(valid) == _rows(_held_out(cfg))
    assert sorted(_rows(train) + _rows(valid)) == _rows(_whole(log))


def test_columns_no_feature_names_may_differ_between_files(log: Path, tmp_path: Path) -> None:
    """A log that gains a column one day: every reader (polars counts and vocabularies,
    Ray Data's streams) reads the contract's columns and ignores the rest."""
    whole = _whole(log)
    (tmp_path / "log").mkdir()
    whole[: ROWS // 2].write_parquet(tmp_path / "log" / "a.parquet")
    later = whole[ROWS // 2 :].with_columns(pl.lit("x").alias("campaign"))
    later.write_parquet(tmp_path / "log" / "b.parquet")
    cfg = _cfg(tmp_path, split="random")
    plain = make_split(_cfg(log, split="random"))
    split = make_split(cfg)
    assert count_rows(split) == count_rows(plain)
    vocab = build_vocabularies(cfg, split.training_rows())
    assert all(
        np.array_equal(vocab[k], v)
        for k, v in build_vocabularies(cfg, plain.training_rows()).items()
    )
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        datasets = split.datasets(["timestamp", "user_id", "item", "label"])
        streamed = sum(datasets[k].count() for k in ("train", "valid"))
    finally:
        ray.shutdown()
    assert streamed == ROWS


def test_a_damaged_file_is_named_before_any_work(log: Path, tmp_path: Path) -> None:
    (tmp_path / "log").mkdir()
    for name in ("a.parquet", "b.parquet"):
        (tmp_path / "log" / name).write_bytes((log / "log" / name).read_bytes())
    damaged = tmp_path / "log" / "b.parquet"
    damaged.write_bytes(damaged.read_bytes()[:5_000])
    cfg = _cfg(tmp_path)
    with pytest.raises(BadInputError, match=rf"{damaged}: not a readable Parquet file"):
        preflight(cfg)
