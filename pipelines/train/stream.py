"""A worker's share of the training and validation streams, as validated Arrow tables,
the bad rows dropped before the streams are split, and the count of the rows Ray Data's
equal split leaves unread."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import ray.data
import torch
import torch.distributed as dist

from recsys.config import ExperimentConfig, FeaturesConfig
from recsys.contract import validate_table


def drop_bad_rows(log: ray.data.Dataset, features: FeaturesConfig) -> ray.data.Dataset:
    """The log without the rows `data.on_bad_rows: skip` drops (the preflight counted them).

    They are dropped before `streaming_split(equal=True)` divides the stream: dropped in
    the workers, a batch could shrink to one row or none (BatchNorm cannot train on
    either), and workers would hold unequal rows."""

    def clean(batch: pa.Table) -> pa.Table:
        return validate_table(batch, features, "Ray Data stream", on_bad_rows="skip")[0]

    return log.map_batches(clean, batch_format="pyarrow", zero_copy_batch=True)


def arrow_batches(
    shard: Any, cfg: ExperimentConfig, seed: int | None = None
) -> Iterator[tuple[int, pa.Table]]:
    """The worker's share of the stream as (rows read, validated Arrow table) pairs;
    shuffled through a buffer of `data.shuffle_buffer` rows when `seed` is given.

    An epoch's last batch of one row joins the batch before it: BatchNorm cannot train on
    one row. Every worker gets as many rows (`streaming_split(equal=True)`), so all make
    the same choice and still take the same number of steps."""
    buffer = cfg.data.shuffle_buffer if seed is not None else 0
    held: pa.Table | None = None  # one batch behind, to see whether the next is a last row
    for table in shard.iter_batches(
        batch_size=cfg.train.batch_size,
        batch_format="pyarrow",
        prefetch_batches=2,
        local_shuffle_buffer_size=buffer or None,
        local_shuffle_seed=seed if buffer else None,
    ):
        if held is not None and table.num_rows < 2:
            held = pa.concat_tables([held, table])
            continue
        if held is not None:
            yield _validated(held, cfg)
        held = table
    if held is not None:
        yield _validated(held, cfg)


def _validated(table: pa.Table, cfg: ExperimentConfig) -> tuple[int, pa.Table]:
    """The batch, checked again: a bad row here is one the preflight did not see (bad
    rows are dropped before the split), so it stops the run whatever `on_bad_rows` says."""
    validate_table(table, cfg.features, "Ray Data stream (the log changed since the preflight?)")
    return table.num_rows, table


def unread_rows(pulled: int, train_rows: int, device: torch.device) -> int:
    """Training rows no worker read in the epoch (a collective call): the rows Ray Data's
    `streaming_split(equal=True)` drops so that every worker takes as many batches.
    `train_rows` counts the good rows only: bad ones never reach the split."""
    read = torch.tensor([pulled], dtype=torch.int64, device=device)
    dist.all_reduce(read)
    return train_rows - int(read.item())
