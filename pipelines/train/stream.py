"""A worker's share of the training and validation streams, as validated Arrow tables,
and the count of the rows Ray Data's equal split leaves unread."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import torch
import torch.distributed as dist

from recsys.config import ExperimentConfig
from recsys.contract import validate_table


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
    clean, _ = validate_table(
        table, cfg.features, "Ray Data stream", on_bad_rows=cfg.data.on_bad_rows
    )
    return table.num_rows, clean


def unread_rows(pulled: int, train_rows: int, device: torch.device) -> int:
    """Training rows no worker read in the epoch (a collective call): the rows Ray Data's
    `streaming_split(equal=True)` drops so that every worker takes as many batches."""
    read = torch.tensor([pulled], dtype=torch.int64, device=device)
    dist.all_reduce(read)
    return train_rows - int(read.item())
