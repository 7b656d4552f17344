"""The partitions of a followed log folder, and when each is complete enough to train on.

A partition is a Parquet file directly in the followed folder, or a folder under it that
directly holds Parquet files (a Hive folder such as `day=2026-01-01/` or
`day=2026-01-01/hour=03/`). Names starting with `_` or `.` are writers' scratch and
markers (`_temporary/`, `.staging`, `_SUCCESS`) and are never read as data.

A writer may still be writing a partition the follower sees, so one is taken only when
complete, by one of two rules:

* marker: a folder holding `_SUCCESS` (what Hadoop/Spark/Hive output committers write
  last) is complete at once; its files must then read, or it is a bad partition;
* stable: a partition without the marker is complete when its files, their sizes and
  modification times are the same at two looks and every file's Parquet footer reads (a
  Parquet writer writes the footer last, so a file cut short has none). `require_marker`
  turns this rule off: such partitions wait for their marker.

Each partition's event-time range comes from the Parquet statistics of its timestamp
column (the column itself is read where a file has none), and partitions train in that
order (their names are no clock).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.contract import BadInputError

MARKER = "_SUCCESS"
Files = dict[str, tuple[int, int]]  # file relative to the partition -> (size, mtime in ns)


def _hidden(name: str) -> bool:
    return name.startswith(("_", "."))


@dataclass(frozen=True)
class Seen:
    """A partition as one look found it."""

    name: str  # relative to the followed folder ("day=2026-01-01", "log-0001.parquet")
    path: Path
    files: Files
    marked: bool  # holds `_SUCCESS`


@dataclass(frozen=True)
class Partition:
    """A complete partition: its files as they were taken, rows and event-time range."""

    name: str
    path: Path
    files: Files
    rows: int
    first_event: int | None  # None: no rows
    last_event: int | None

    @property
    def order(self) -> tuple[int, int, str]:
        """Oldest events first; an empty partition sorts first (it trains nothing)."""
        return (self.first_event or -1, self.last_event or -1, self.name)


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return (st.st_size, st.st_mtime_ns)


def look(root: Path) -> dict[str, Seen]:
    """Every partition under `root` now, by name."""
    found: dict[str, Seen] = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not _hidden(d))
        here = Path(folder)
        parquet = sorted(n for n in names if n.endswith(".parquet") and not _hidden(n))
        if here == root:
            for name in parquet:
                with_stat = _files(here, [name])
                if with_stat:
                    found[name] = Seen(name, here / name, with_stat, marked=False)
            continue
        if parquet or MARKER in names:
            name = here.relative_to(root).as_posix()
            found[name] = Seen(name, here, _files(here, parquet), marked=MARKER in names)
    return found


def _files(folder: Path, names: list[str]) -> Files:
    """The files' (size, mtime); one removed since the folder was listed is left out."""
    files: Files = {}
    for name in names:
        try:
            files[name] = _stat(folder / name)
        except FileNotFoundError:
            continue
    return files


def _file_paths(seen: Seen) -> list[Path]:
    return [seen.path] if seen.path.is_file() else [seen.path / n for n in seen.files]


def unreadable(seen: Seen) -> tuple[Path, str] | None:
    """The first of the partition's files whose Parquet footer does not read, and why."""
    for path in _file_paths(seen):
        try:
            pq.read_metadata(path)
        except (pa.ArrowException, OSError) as err:
            return path, str(err)
    return None


def event_range(seen: Seen, timestamp: str) -> tuple[int, int | None, int | None]:
    """(rows, oldest event, newest event) of a partition whose files read."""
    rows, first, last = 0, None, None
    for path in _file_paths(seen):
        meta = pq.read_metadata(path)
        names = meta.schema.to_arrow_schema().names
        if timestamp not in names:
            raise BadInputError(f"{path}: no timestamp column {timestamp!r} (train --follow)")
        column = names.index(timestamp)
        rows += meta.num_rows
        if meta.num_rows == 0:
            continue
        low, high = _column_range(path, meta, column, timestamp)
        first = low if first is None else min(first, low)
        last = high if last is None else max(last, high)
    return rows, first, last


def _column_range(path: Path, meta: pq.FileMetaData, column: int, name: str) -> tuple[int, int]:
    """The min and max of one column: the row groups' statistics, else the column read."""
    stats = [meta.row_group(g).column(column).statistics for g in range(meta.num_row_groups)]
    if stats and all(s is not None and s.has_min_max for s in stats):
        return min(int(s.min) for s in stats), max(int(s.max) for s in stats)
    values = pq.read_table(path, columns=[name]).column(name)
    span = pc.min_max(values)
    if span["min"].as_py() is None:
        raise BadInputError(f"{path}: column {name!r} holds no timestamps (train --follow)")
    return int(span["min"].as_py()), int(span["max"].as_py())


def changed(before: Files, now: Files) -> str | None:
    """How a trained partition's files changed since, or None. Files removed since (a
    retention policy) are no change: their rows were trained."""
    for name, stamp in sorted(now.items()):
        if name not in before:
            return f"{name} appeared"
        if stamp != before[name]:
            return f"{name} was rewritten (size, mtime {before[name]} -> {stamp})"
    return None


class Watcher:
    """Complete partitions as they appear under a followed folder.

    It remembers each pending partition's files as last seen, so that the stable rule
    compares two looks; it names each partition it waits for once per state of its files.
    """

    def __init__(self, root: Path, timestamp: str, require_marker: bool) -> None:
        self.root, self.timestamp, self.require_marker = root, timestamp, require_marker
        self._last: dict[str, Files] = {}
        self._told: dict[str, Files] = {}
        self.waiting: dict[str, str] = {}  # partition -> why it is not taken yet

    def complete(self, now: dict[str, Seen], taken: set[str]) -> list[Partition]:
        """The complete partitions of a look (`look`) not in `taken`, oldest events first.

        A marked partition whose file does not read is a bad partition: BadInputError
        naming the file (it would fail the same way on every look)."""
        ready, self.waiting = [], {}
        for name, seen in now.items():
            if name in taken:
                continue
            why = self._why_not(seen)
            if why is None:
                rows, first, last = event_range(seen, self.timestamp)
                ready.append(Partition(name, seen.path, seen.files, rows, first, last))
                self._last.pop(name, None)
            else:
                self.waiting[name] = why
                self._last[name] = seen.files
        return sorted(ready, key=lambda p: p.order)

    def _why_not(self, seen: Seen) -> str | None:
        if seen.marked:
            bad = unreadable(seen)
            if bad is not None:
                raise BadInputError(
                    f"{bad[0]}: not a readable Parquet file ({bad[1]}), though its partition "
                    f"holds {MARKER}; fix or remove the partition {seen.name!r}"
                )
            return None
        if self.require_marker:
            return f"no {MARKER} yet (train.follow.require_marker)"
        if not seen.files:
            return "no Parquet files yet"
        if self._last.get(seen.name) != seen.files:
            return "files changed since the last look"
        bad = unreadable(seen)
        if bad is not None:
            return f"{bad[0].name} has no readable Parquet footer yet ({bad[1]})"
        return None

    def news(self) -> list[str]:
        """A line for each partition whose reason for waiting is new since it was named."""
        lines = []
        for name, why in self.waiting.items():
            files = self._last.get(name, {})
            if self._told.get(name) != files and "changed since the last look" not in why:
                lines.append(f"waiting for partition {name}: {why}")
                self._told[name] = files
        return lines
