"""Timing helpers shared by the benchmarks (run as `python bench/<name>.py`, so importable
as a sibling module)."""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch.distributed as dist


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
