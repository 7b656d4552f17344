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

from recsys.serving.manifest import ExportError
from recsys.serving.model import ServedTable
from recsys.serving.schema import Manifest
from tables.collisionless.transform import CollisionlessTransform

Previous = tuple[Manifest, dict[str, ServedTable]]  # the base's checked manifest and tables


def collisionless_rows(
    transform: CollisionlessTransform, entry: dict[str, Any], out: Path, previous: Previous | None
) -> tuple[np.ndarray, np.ndarray]:
    """(IDs, global rows) to write for the table `entry` describes: every live row, or with
    a base export the rows trained since it, the base's IDs rowless now written as
    deletions. Records the training steps seen, which the next incremental export reads."""
    entry["lookup"] = "id"
    entry["trained_steps"] = transform.steps
    if previous is None:
        ids, rows = transform.live_rows()
        return ids.numpy(), rows.numpy()
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
