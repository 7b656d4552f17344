"""Convert CSV / TSV logs to the Parquet log contract, driven by a feature spec (see
`recsys.convert.csv_spec`); and the output side every text converter here shares: cells
converted with the bad one named, and staged day-partitioned Parquet.

Output: `label` int8, `timestamp` int64, then the spec's columns in its order (categorical
int64, numeric float32, sequence list<int64>). An empty categorical or numeric cell is null
(the experiment's `allow_null` / `fill_null` decides about it); an empty sequence cell is
an empty list; an empty label or timestamp is bad.

Timestamps: with a timestamp column, rows go to the partition of their UTC day
(`out/day=YYYY-MM-DD/part-NNNNN.parquet`, input order kept within a day; the input need
not be sorted); without one they are derived from the row position exactly as
`recsys.convert.criteo` does (`rows_per_day`, default one day). The file is streamed in
2 MB blocks of pyarrow's CSV reader, each column converted by pyarrow compute; a bad
cell or a wrong field count raises `BadInputError` naming file, line and column, and the
output, staged in `out/.partial`, is removed.
"""

from __future__ import annotations

import csv
import json
import resource
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from recsys.contract import BadInputError
from recsys.convert.cells import convert_dense, convert_label, first_bad_cell
from recsys.convert.criteo import (
    BLOCK_BYTES,
    CHUNK_ROWS,
    PARTIAL_DIR,
    ROWS_PER_FILE,
    SECONDS_PER_DAY,
    TextFile,
    timestamps,
)
from recsys.convert.csv_spec import CsvSpec, encode_id_lists, encode_ids

# --------------------------------------------------------------------------- conversion

Converter = Callable[[pa.Array], pa.Array]


def convert_columns(
    text: Mapping[str, pa.Array],
    converters: Mapping[str, tuple[Converter, str]],
    where: Callable[[int], str],
) -> dict[str, pa.Array]:
    """Convert each text column; on bad cells raise BadInputError at the earliest one (row,
    then column order) as `<where(row)>, column 'c': <problem>, got <value>`."""
    columns: dict[str, pa.Array] = {}
    bad: list[tuple[int, int, str]] = []
    for position, (name, (convert, _)) in enumerate(converters.items()):
        cells = text[name]
        cells = cells.combine_chunks() if isinstance(cells, pa.ChunkedArray) else cells
        try:
            columns[name] = convert(cells)
        except ValueError:  # pyarrow's ArrowInvalid is one
            bad.append((first_bad_cell(cells, convert), position, name))
    if bad:
        row, _, name = min(bad)
        value = text[name][row].as_py()
        shown = "missing" if value is None else repr(value)
        raise BadInputError(f"{where(row)}, column {name!r}: {converters[name][1]}, got {shown}")
    return columns


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


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


# --------------------------------------------------------------------------- output

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MAX_OPEN_FILES = 64


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


_TYPES = {"categorical": pa.int64(), "numeric": pa.float32(), "sequence": pa.list_(pa.int64())}


def output_schema(spec: CsvSpec) -> pa.Schema:
    columns = [(n, _TYPES[c.type]) for n, c in spec.outputs().items()]
    return pa.schema([("label", pa.int8()), ("timestamp", pa.int64()), *columns])


def _file_columns(source: TextFile, spec: CsvSpec) -> list[str]:
    """The file's column names (its header, or the spec's `names`), checked against the spec."""
    if spec.header:
        with source.open() as stream:
            first = stream.read(1 << 20).split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8-sig")
        quoting = csv.QUOTE_MINIMAL if spec.quote else csv.QUOTE_NONE
        names = next(csv.reader([first], delimiter=source.delimiter, quoting=quoting), [])
        where = f"{source.path}, line 1 (header)"
    else:
        names, where = list(spec.names or []), f"{source.path}: the spec's names"
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise BadInputError(f"{where}: column(s) {twice} appear twice")
    wanted = [spec.label, *([spec.timestamp] if spec.timestamp else []), *spec.columns]
    missing = [n for n in wanted if n not in names]
    if missing:
        raise BadInputError(f"{where}: no column(s) {missing} (the file has {names})")
    unknown = [n for n in names if n not in wanted]
    if unknown:
        raise BadInputError(
            f"{where}: column(s) {unknown} are not in the spec; declare them "
            "(type: skip leaves one out)"
        )
    return names


def read_csv(source: TextFile, names: list[str], spec: CsvSpec) -> Iterator[pa.RecordBatch]:
    """The data rows as string record batches; a wrong field count names its line."""
    bad_rows: list[pa_csv.InvalidRow] = []

    def on_invalid(row: pa_csv.InvalidRow) -> str:
        bad_rows.append(row)
        return "error"

    skipped = {n for n, c in spec.columns.items() if c.type == "skip"}
    read_options = pa_csv.ReadOptions(
        column_names=names, skip_rows=int(spec.header), block_size=BLOCK_BYTES, use_threads=False
    )
    parse_options = pa_csv.ParseOptions(
        delimiter=source.delimiter,
        quote_char='"' if spec.quote else False,
        ignore_empty_lines=False,
        invalid_row_handler=on_invalid,
    )
    convert_options = pa_csv.ConvertOptions(
        column_types=dict.fromkeys(names, pa.string()),
        include_columns=[n for n in names if n not in skipped],
        null_values=[""],
        strings_can_be_null=True,
    )
    try:
        with source.open() as stream:
            yield from pa_csv.open_csv(stream, read_options, parse_options, convert_options)
    except pa.ArrowInvalid as err:
        if not bad_rows:
            raise BadInputError(f"{source.path}: unreadable as delimited text: {err}") from err
        bad = bad_rows[0]
        where = str(source.path) if bad.number is None else f"{source.path}, line {bad.number}"
        raise BadInputError(
            f"{where}: expected {bad.expected_columns} fields, got {bad.actual_columns}: "
            f"{bad.text[:200]!r}"
        ) from err


def convert_timestamp(text: pa.Array, fmt: str = "unix") -> pa.Array:
    """Unix seconds (int64, floored) from `unix` / `unix_ms` numbers or a strptime format."""
    if text.null_count:
        raise ValueError("missing timestamp")
    if fmt in ("unix", "unix_ms"):
        value = pc.cast(text, pa.float64())
        if not pc.all(pc.is_finite(value), min_count=0).as_py():
            raise ValueError("not a finite number")
        return pc.cast(
            pc.floor(pc.divide(value, 1000.0) if fmt == "unix_ms" else value), pa.int64()
        )
    return pc.cast(pc.strptime(text, format=fmt, unit="s", error_is_null=False), pa.int64())


def _converters(spec: CsvSpec) -> dict[str, tuple[Converter, str]]:
    """Output column -> (text column -> contract column, what a bad cell is)."""
    out: dict[str, tuple[Converter, str]] = {"label": (convert_label, "label must be 0 or 1")}
    if spec.timestamp:
        fmt = spec.timestamp_format
        unit = {"unix": "Unix seconds", "unix_ms": "Unix milliseconds"}.get(fmt, repr(fmt))
        out["timestamp"] = (partial(convert_timestamp, fmt=fmt), f"not a time in {unit}")
    for name, col in spec.outputs().items():
        ids = "integer IDs" if col.ids == "int" else "IDs"
        if col.type == "numeric":
            out[name] = (partial(convert_dense, log_transform=False), "not a finite number")
        elif col.type == "categorical":
            out[name] = (partial(encode_ids, mode=col.ids), f"not one of the {ids}")
        else:
            convert = partial(encode_id_lists, separator=col.separator, mode=col.ids)
            out[name] = (convert, f"not {ids} separated by {col.separator!r} (an empty ID?)")
    return out


def convert_csv(
    input: str | Path, out: str | Path, spec: CsvSpec, rows_per_day: int | None = None
) -> dict[str, Any]:
    """Convert a CSV / TSV file (optionally gzip) to a day-partitioned Parquet log.

    Returns the summary also written to `out/_convert.json`.
    """
    input, out = Path(input), Path(out)
    if rows_per_day is not None and (rows_per_day < 1 or spec.timestamp):
        raise ValueError("rows_per_day must be >= 1, and only without a timestamp column")
    started = time.perf_counter()
    suffixes = [s.lower() for s in input.suffixes if s.lower() != ".gz"]
    default = "\t" if suffixes and suffixes[-1] in (".tsv", ".tab") else ","
    source = TextFile(input, spec.delimiter or default, spec.header, is_gzip(input))
    names = _file_columns(source, spec)
    schema = output_schema(spec)
    origin = {"label": spec.label, "timestamp": spec.timestamp, **{n: n for n in spec.columns}}
    converters = _converters(spec)
    per_day = rows_per_day or (1 if spec.timestamp else max(1, source.count_rows()))
    with DayPartitionedLog(out, schema) as log:
        first = 0
        for text in gathered(read_csv(source, names, spec)):
            cells = {name: text.column(origin[name]) for name in converters}
            columns = convert_columns(cells, converters, lambda r, f=first: source.where(f + r))
            if not spec.timestamp:
                columns["timestamp"] = timestamps(first, text.num_rows, per_day)
            log.write(pa.table([columns[n] for n in schema.names], schema=schema))
            first += text.num_rows
        return log.commit(
            {
                "input": str(input),
                "layout": source.describe(),
                "spec": spec.model_dump(exclude_defaults=True),
                "rows_per_day": None if spec.timestamp else per_day,
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
