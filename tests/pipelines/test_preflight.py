"""What would fail later is refused before Ray starts: tables the host cannot hold, with
their sizes, against a count written here."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import psutil
import pytest
import ray
import torch

from pipelines.build import build_model
from pipelines.train.driver import train
from recsys.config import ConfigError, ExperimentConfig, config_from_dict
from recsys.synth import generate
from tables.footprint import check_fits, table_bytes
from tests.pipelines.runs import REPO, SMALL_CTR, run_config


def _hashed(tmp: Path, rows: int) -> ExperimentConfig:
    """conf/demo.yaml, small, with its one table hashed to `rows` rows of dim 8."""
    cfg = run_config("demo.yaml", tmp, *SMALL_CTR)
    doc = cfg.model_dump(mode="json")
    table = doc["tables"][0]
    doc["tables"] = [
        {
            "features": table["features"],
            "variant": "hash",
            "num_embeddings": rows,
            "embedding_dim": 8,
        }
    ]
    return config_from_dict(doc, str(REPO / "conf" / "demo.yaml"))


def test_table_bytes_count_rows_and_optimizer_state(tmp_path: Path) -> None:
    cfg = _hashed(tmp_path, 1000)
    model = build_model(cfg, {}, table_device=torch.device("meta"))
    features = cfg.tables[0].features
    dim = cfg.tables[0].embedding_dim
    for optimizer, state in (
        ("sgd", 0),
        ("rowwise_adagrad", 1),
        ("adagrad", dim),
        ("adam", 2 * dim),
    ):
        sizes = table_bytes(model, optimizer)
        assert len(sizes) == len(features)
        assert set(sizes.values()) == {1000 * (dim + state) * 4}


def test_check_fits_names_the_largest_tables() -> None:
    sizes = {"small": 2**20, "big": 3 * 2**30, "mid": 2**30}
    check_fits(sizes, 5 * 2**30, "this host")
    with pytest.raises(
        MemoryError, match=r"need 4\.00 GiB .*largest: big 3\.00 GiB, mid 1\.00 GiB"
    ):
        check_fits(sizes, 2**30, "this host")


def test_tables_the_host_cannot_hold_are_refused_before_ray_starts(tmp_path: Path) -> None:
    # every feature's table alone as large as the host (dim 8, one rowwise accumulator)
    cfg = _hashed(tmp_path, psutil.virtual_memory().total // (4 * 9))
    generate(cfg, rows=2_000, out=tmp_path / "log")
    assert not ray.is_initialized()
    with pytest.raises(ConfigError, match=r"tables: the embedding tables need [\d,.]+ GiB"):
        train(cfg)
    assert not ray.is_initialized()


def test_an_epoch_ending_in_one_row_trains_with_batch_norm(tmp_path: Path) -> None:
    """513 rows in batches of 256 end in a batch of one, on which BatchNorm cannot train:
    it joins the batch before it, and every row is read."""
    cfg = run_config("demo.yaml", tmp_path, *SMALL_CTR)
    generate(cfg, rows=3_000, out=tmp_path / "log")
    whole = pl.read_parquet(tmp_path / "log" / "**" / "*.parquet", hive_partitioning=False)
    whole[:513].write_parquet(tmp_path / "train.parquet")
    whole[513:1000].write_parquet(tmp_path / "valid.parquet")
    cfg = run_config(
        "demo.yaml",
        tmp_path,
        *SMALL_CTR,
        f"data.train={tmp_path / 'train.parquet'}",
        f"data.valid={tmp_path / 'valid.parquet'}",
        "data.valid_days=1",  # the default: data.valid replaces the split
        "train.workers=1",
        "train.batch_size=256",
        "model.batch_norm=true",
    )
    try:
        result = train(cfg)
    finally:
        ray.shutdown()
    assert result["metrics"]["step"] == 2  # 256, then 256 + 1
    assert result["metrics"]["rows_unread_per_epoch"] == 0
