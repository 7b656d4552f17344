"""The output side every text converter here shares: converted batches gathered into row
groups, written as day-partitioned Parquet (`out/day=YYYY-MM-DD/part-NNNNN.parquet`, by the
UTC day of each row's `timestamp`), staged in `out/.partial` until the conversion commits,
removed if it fails.
"""

from __future__ import annotations

import json
import resource
import shutil
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Converted batches are gathered into chunks of CHUNK_ROWS rows, the Parquet row groups.
CHUNK_ROWS = 1 << 17
ROWS_PER_FILE = 1_000_000
PARTIAL_DIR = ".partial"
SECONDS_PER_DAY = 86_400
MAX_OPEN_FILES = 64
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def gathered(batches: Iterable[pa.RecordBatch], rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
    """Batches glued into tables of >= `rows` rows (the last shorter): the row groups."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += batch.num_rows
        if count >= rows:
            yield pa.Table.from_batches(pending)
            pending, count = [], 0
    if pending:
        yield pa.Table.from_batches(pending)


def utc_day_name(day: int) -> str:
    """`YYYY-MM-DD` of a day number since 1970-01-01 UTC."""
    return (_EPOCH + timedelta(days=day)).strftime("%Y-%m-%d")


class DayPartitionedLog:
    """Writes `out/day=YYYY-MM-DD/part-NNNNN.parquet` by the UTC day of each row's
    `timestamp`, in `out/.partial` until `commit` moves the days into place; leaving the
    `with` block by an exception removes the staging (and `out`, if this created it), so
    a failed conversion leaves nothing behind.

    One file per day is open at a time (the least recently used closes past
    MAX_OPEN_FILES; its day continues in a new part), rolling every `rows_per_file` rows.
    """

    def __init__(self, out: Path, schema: pa.Schema, rows_per_file: int = ROWS_PER_FILE) -> None:
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"{out}: output directory is not empty; remove it or choose another")
        self.out, self.schema, self.rows_per_file = out, schema, rows_per_file
        self._created = not out.exists()
        self.staging = out / PARTIAL_DIR
        self.staging.mkdir(parents=True)
        self._open: dict[int, tuple[pq.ParquetWriter, int]] = {}  # day -> (writer, rows)
        self._parts: dict[int, int] = {}
        self.files: list[Path] = []
        self.day_rows: dict[str, int] = {}
        self.nulls = dict.fromkeys(schema.names, 0)
        self.rows = 0

    def __enter__(self) -> DayPartitionedLog:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None:
            self.abort()

    def write(self, table: pa.Table) -> None:
        """Append rows (of any days, in any order); each day keeps their order."""
        if table.schema != self.schema:
            raise TypeError(f"schema {table.schema} differs from the log's {self.schema}")
        for name in self.schema.names:
            self.nulls[name] += table.column(name).null_count
        self.rows += table.num_rows
        days = np.floor_divide(table.column("timestamp").to_numpy(), SECONDS_PER_DAY)
        if len(days) and days[0] == days[-1] and (days == days[0]).all():
            self._append(int(days[0]), table)
            return
        order = np.argsort(days, kind="stable")
        ordered = days[order]
        cuts = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
        for lo, hi in zip([0, *cuts], [*cuts, len(ordered)], strict=True):
            self._append(int(ordered[lo]), table.take(pa.array(order[lo:hi])))

    def _append(self, day: int, table: pa.Table) -> None:
        name = utc_day_name(day)
        self.day_rows[name] = self.day_rows.get(name, 0) + table.num_rows
        while table.num_rows:
            writer, rows = self._open.pop(day, (None, 0))
            if writer is None or rows >= self.rows_per_file:
                if writer is not None:
                    writer.close()
                writer, rows = self._new_file(day, name), 0
            take = min(table.num_rows, self.rows_per_file - rows)
            writer.write_table(table.slice(0, take), row_group_size=take)
            self._open[day] = (writer, rows + take)  # now the most recently used
            table = table.slice(take)

    def _new_file(self, day: int, name: str) -> pq.ParquetWriter:
        while len(self._open) >= MAX_OPEN_FILES:
            oldest = next(iter(self._open))
            self._open.pop(oldest)[0].close()
        part = self._parts.get(day, 0)
        self._parts[day] = part + 1
        path = self.staging / f"day={name}" / f"part-{part:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.files.append(path)
        return pq.ParquetWriter(path, self.schema, compression="zstd")

    def _close(self) -> None:
        for writer, _ in self._open.values():
            writer.close()
        self._open.clear()

    def commit(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Move the days into `out`; write and return `summary` plus the log's figures."""
        self._close()
        for day_dir in sorted(self.staging.iterdir()):
            day_dir.rename(self.out / day_dir.name)
        self.staging.rmdir()
        seconds = summary.get("seconds") or 0.0
        summary = {
            **summary,
            "out": str(self.out),
            "rows": self.rows,
            "days": len(self.day_rows),
            "files": len(self.files),
            "day_rows": dict(sorted(self.day_rows.items())),
            "rows_per_s": round(self.rows / seconds) if seconds else None,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "nulls": self.nulls,
        }
        (self.out / "_convert.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def abort(self) -> None:
        self._close()
        shutil.rmtree(self.staging, ignore_errors=True)
        if self._created and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()
