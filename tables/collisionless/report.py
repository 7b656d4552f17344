"""What the collisionless tables did, for the training log: per table, its counters since
the last report, live rows, load factor and bytes held, summed over ranks."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tables.collisionless.storage import collection_of, table_storage
from tables.collisionless.transform import collisionless_transforms


def table_report(sparse: nn.Module, group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """Per collisionless table, summed over ranks (a collective when `group` is given):
    counters since the last report, live rows, load factor, bytes of rows / ID map /
    optimizer state / filter."""
    report: dict[str, Any] = {}
    for transform in collisionless_transforms(sparse):
        counters = transform.take_counters()
        weights, states = [], []
        for table in transform.storage_tables:
            weight, table_states, _ = table_storage(collection_of(sparse, table), table)
            weights.append(weight)
            states += table_states
        values = {
            **asdict(counters.map),
            "expired": counters.expired,
            "live_rows": sum(s.idmap.num_live for s in transform.shards.values()),
            "row_bytes": sum(w.numel() * w.element_size() for w in weights),
            **transform.memory(),
            "optimizer_bytes": sum(s.numel() * s.element_size() for s in states),
        }
        if group is not None:
            summed = torch.tensor(list(values.values()), dtype=torch.int64)
            dist.all_reduce(summed, group=group)
            values = dict(zip(values, summed.tolist(), strict=True))
        values["load_factor"] = values["live_rows"] / transform.num_rows
        report[transform.name] = values
    return report


def format_report(report: dict[str, Any]) -> str:
    """One line per table for the training log."""
    mib = 1 << 20
    return "\n".join(
        f"table {name}: live={t['live_rows']} load={t['load_factor']:.3f} "
        f"admitted={t['admitted']} filtered={t['filtered']} overflowed={t['overflowed']} "
        f"evicted_lru={t['evicted_lru']} evicted_lfu={t['evicted_lfu']} expired={t['expired']} "
        f"MiB rows={t['row_bytes'] / mib:.2f} map={t['map_bytes'] / mib:.2f} "
        f"optimizer={t['optimizer_bytes'] / mib:.2f} filter={t['filter_bytes'] / mib:.2f}"
        for name, t in report.items()
    )
