"""Timing and training helpers shared by the benchmarks (run as `python bench/<name>.py`,
so importable as a sibling module)."""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pyarrow as pa
import torch
import torch.distributed as dist

from recsys.batch import BatchConverter
from recsys.config import ExperimentConfig
from tables.sharding import combined_optimizer, shard_model


def interleaved(
    steps: dict[str, Callable[[Any], None]],
    batches: Sequence[Any],
    blocks: int,
    per_block: int,
    batch_size: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median examples per clock second, per name, over alternating blocks of steps.

    The order of the configurations flips every block, so that a neighbour's load or a
    warming cache hits each alike; `time.process_time` as the clock counts CPU seconds.
    """
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():  # warm-up: first-call allocations, lazy init
        step(batches[0])
    for block in range(blocks):
        order = list(steps) if block % 2 == 0 else list(reversed(steps))
        for name in order:
            start = clock()
            for i in range(per_block):
                steps[name](batches[(block * per_block + i) % len(batches)])
            rates[name].append(per_block * batch_size / (clock() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def init_single_rank_group() -> None:
    """A gloo group of one process on a free loopback port, for DistributedModelParallel."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)


def shard_for_training(
    model: torch.nn.Module, cfg: ExperimentConfig, sharding: dict[str, str]
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """`model` under DistributedModelParallel on the current group with the config's fused
    sparse optimizer, and Adam for the dense part: the training path of `recsys train`."""
    t = cfg.train
    dmp = shard_model(
        model, sharding, t.sparse_optimizer, t.sparse_lr, dist.group.WORLD, torch.device("cpu")
    )
    optimizer = combined_optimizer(
        dmp, t.sparse_optimizer, t.sparse_lr, lambda ps: torch.optim.Adam(ps, lr=t.dense_lr)
    )
    return dmp, optimizer


def train_in_order(
    dmp: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: ExperimentConfig,
    tables: Iterable[pa.Table],
) -> tuple[int, float]:
    """One step per validated Arrow table, in the order given; (examples, seconds).
    Tables of one row are skipped: BatchNorm cannot train on them."""
    convert = BatchConverter(cfg.features)
    start, examples = time.perf_counter(), 0
    for table in tables:
        if table.num_rows < 2:
            continue
        batch = convert(table)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(dmp(batch), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        examples += batch.batch_size
    return examples, time.perf_counter() - start
