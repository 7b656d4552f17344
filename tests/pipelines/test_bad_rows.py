"""`data.on_bad_rows: skip` on 2 Ray workers: bad rows are dropped before the stream is
split, so no worker gets a batch of one row or none, and every row is accounted for."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from sklearn.metrics import roc_auc_score

from pipelines.train.driver import train
from pipelines.train.split import make_split
from recsys.synth import generate
from tests.helpers import trained_probabilities
from tests.pipelines.runs import HELD_OUT_DAY, SMALL_CTR, run_config

BATCH = 128
BAD_TRAIN = 3 * BATCH + 5  # more than a batch of each worker: a batch of bad rows only
BAD_VALID = 7


def _corrupt(file: Path, start: int, count: int) -> None:
    """Labels of rows [start, start + count) set to 5, outside {0, 1}."""
    table = pq.read_table(file)
    label = table.column("label").to_numpy().copy()
    label[start : start + count] = 5
    column = table.schema.get_field_index("label")
    typed = pa.array(label).cast(table.schema.field(column).type)
    pq.write_table(table.set_column(column, "label", typed), file)


def test_skipped_rows_leave_full_batches_and_every_row_counted(tmp_path: Path) -> None:
    cfg = run_config(
        "demo.yaml",
        tmp_path,
        *SMALL_CTR,
        f"train.batch_size={BATCH}",
        "train.epochs=1",
        "train.log_every=1000",
        "model.batch_norm=true",  # a batch of one row would stop BatchNorm's training
        "data.on_bad_rows=skip",
    )
    generate(cfg, rows=6_000, out=tmp_path / "log")
    days = sorted(p for p in (tmp_path / "log").iterdir() if p.is_dir())
    _corrupt(next(days[0].glob("*.parquet")), 200, BAD_TRAIN)
    _corrupt(next((tmp_path / "log" / HELD_OUT_DAY).glob("*.parquet")), 10, BAD_VALID)

    # the reference: polars counts the good training rows of the split
    split = make_split(cfg)
    label = pl.col("label")
    good = split.training_rows().filter(label.is_in([0, 1])).select(pl.len()).collect().item()
    try:
        result = train(cfg)
    finally:
        ray.shutdown()
    m = result["metrics"]
    assert sum(result["skipped_rows"].values()) == BAD_TRAIN + BAD_VALID
    assert m["train_rows"] == good
    # Every worker read (good - unread) / 2 rows in full batches; a last batch of one row
    # joins the one before it, so the steps follow from the rows alone.
    per_worker, rest = divmod(good - m.get("rows_unread_per_epoch", 0), 2)
    assert rest == 0
    steps = -(-per_worker // BATCH) - (per_worker % BATCH == 1)
    assert m["step"] == steps
    # validation scored the good validation rows only: sklearn on the best checkpoint
    valid = pl.read_parquet(tmp_path / "log" / HELD_OUT_DAY).filter(label.is_in([0, 1]))
    valid.write_parquet(tmp_path / "good_valid.parquet")
    probs = trained_probabilities(result["run_dir"], tmp_path / "good_valid.parquet")
    reference = roc_auc_score(valid["label"].to_numpy(), probs)
    assert abs(m["valid_auc"] - reference) < 1e-6
