"""A run stopped mid-epoch on 2 Ray workers and resumed on 1 skips what both consumed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import ray

from pipelines.train.driver import train
from pipelines.train.split import make_split
from recsys.synth import generate
from tests.pipelines.test_collisionless_pipeline import CAPACITY, _config

BATCH = 1024
STOP = 4  # steps of the 2-worker run: 2 x 4 x 1024 examples of a ~13k-row epoch


def test_mid_epoch_resume_on_fewer_workers_skips_all_consumed_examples(
    tmp_path: Path, repo: Path
) -> None:
    two = _config(tmp_path, f"train.max_steps={STOP}", "train.epochs=1")
    generate(two, rows=20_000, out=tmp_path / "log")
    try:
        first = train(two)
        assert first["metrics"]["step"] == STOP and first["metrics"]["epoch"] == 0
        one = _config(
            tmp_path, "train.workers=1", f"tables.0.capacity={2 * CAPACITY}", "train.epochs=1"
        )
        again = train(one, resume=True)
    finally:
        ray.shutdown()
    train_rows = make_split(one).training_rows().select(pl.len()).collect().item()
    # 1 worker skips the 2 x STOP batches both workers consumed, then trains the rest
    assert again["metrics"]["step"] == STOP + math.ceil(train_rows / BATCH) - 2 * STOP
    assert again["metrics"]["epoch"] == 1
    records = [json.loads(line) for line in (Path(again["run_dir"]) / "metrics.jsonl").open()]
    note = next(r["data_position"] for r in records if "data_position" in r)
    assert f"consumed {2 * STOP * BATCH} examples on 2 workers" in note
    assert f"skips its first {2 * STOP} batches" in note
