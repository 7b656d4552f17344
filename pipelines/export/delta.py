"""Incremental export of collisionless tables (Monolith's parameter sync).

An incremental export names an earlier one as its base. Each collisionless table then
holds only the rows trained since the base was exported (upserts) and lists the IDs the
base served that have no row now (deletions: evicted or expired); the serving loader
applies both to the base (`recsys.serving.model.load_tables`). Pooled and sequence tables use
the same rule, so one helper serves both exports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recsys.serving.manifest import ExportError
from recsys.serving.model import ServedTable
from recsys.serving.schema import Manifest
from tables.transforms import IdTransform

Previous = tuple[Manifest, dict[str, ServedTable]]  # the base's checked manifest and tables


def served_entry(
    transform: IdTransform,
    table: str,
    weights: torch.Tensor,
    entry: dict[str, Any],
    previous: Previous | None,
    out: Path,
) -> tuple[np.ndarray, np.ndarray]:
    """(IDs, rows) to write for `table`, with the manifest fields of how a raw ID finds
    them set in `entry`: what the table serves (`IdTransform.served_rows`), or, for a
    table whose IDs come and go, with a base export the rows trained since it."""
    served = transform.served_rows(table, weights)
    entry["lookup"] = served.lookup
    if served.num_rows is not None:
        entry["num_rows"] = served.num_rows
    if served.default is not None:
        entry["default_embedding"] = served.default.tolist()
    if not transform.dynamic_ids:
        return served.ids.numpy(), served.rows.numpy()
    entry["trained_steps"] = transform.steps  # what the next incremental export reads
    if previous is None:
        return served.ids.numpy(), served.rows.numpy()
    ids, rows = _delta_rows(transform, entry, out, previous)
    return ids, weights[rows].numpy()


def _delta_rows(
    transform: IdTransform, entry: dict[str, Any], out: Path, previous: Previous
) -> tuple[np.ndarray, np.ndarray]:
    """(IDs, global rows) trained since the base export; the base's IDs rowless now are
    written as deletions."""
    manifest, served = previous
    name = entry["name"]
    before = next((t for t in manifest.tables if t.name == name), None)
    if before is None or before.trained_steps is None:
        raise ExportError(
            f"table {name!r}: the base export has no collisionless table of that name "
            "to build a delta on; export it in full"
        )
    if before.trained_steps > transform.steps:
        raise ExportError(
            f"table {name!r}: the base export saw {before.trained_steps} training "
            f"steps, this checkpoint only {transform.steps}"
        )
    ids, rows = transform.touched_since(before.trained_steps)
    gone = np.setdiff1d(served[name].ids.numpy(), transform.live_rows()[0].numpy())
    path = out / "deleted" / f"{name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": pa.array(gone, pa.int64())}), path)
    entry.update(delta=True, deleted=len(gone), deleted_files=[str(path.relative_to(out))])
    return ids.numpy(), rows.numpy()
