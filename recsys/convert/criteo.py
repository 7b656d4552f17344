"""Convert the Criteo display-advertising text log to the project's Parquet log contract.

Input: the raw release (tab-separated, no header, `label I1..I13 C1..C26`) or comma-separated
text with the header `label,I1,...,C26` (integers may be written as floats, "260.0"); either
may be gzip-compressed. The layout is detected from the first line, compression from the
gzip magic bytes. Both layouts give identical Parquet.

Output, Hive-partitioned by day as `out/day=YYYY-MM-DD/part-NNNNN.parquet` (the `day` value
is in the path only, not a column), rows in input order:

- `label` int8, 0 or 1;
- `timestamp` int64 Unix seconds. Criteo has no timestamps, but its rows are in time order,
  so the time is derived from the 0-based row position `row`:
  `day = row // rows_per_day`,
  `timestamp = DAY0 + day * 86400 + (row % rows_per_day) * 86400 // rows_per_day`,
  with DAY0 = 2026-01-01 00:00:00 UTC: the rows of a day are spread evenly over its seconds.
  Without `rows_per_day` the whole file is one day (a first pass counts its rows);
- `I1..I13` float32, null where missing;
- `C1..C26` int64: the 8-hex-digit string read in base 16 (reversible: `f"{id:08x}"`),
  null where missing.

The file is streamed (pyarrow's CSV reader in blocks of 2 MB, vectorized pyarrow/numpy
conversion per block, one Parquet file open at a time), so memory stays bounded whatever
the input size. Bad input is never dropped: a wrong field count, a label other than 0/1, a
dense value that is not a finite number or an ID that is not 8 hex digits raises
`BadInputError` naming the file, line and column, and no output is left behind.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from recsys.contract import BadInputError
from recsys.convert.cells import (
    HEX_DIGITS,
    convert_dense,
    convert_label,
    convert_sparse,
    first_bad_cell,
)

LABEL = "label"
DENSE = [f"I{i}" for i in range(1, 14)]
SPARSE = [f"C{i}" for i in range(1, 27)]
COLUMNS = [LABEL, *DENSE, *SPARSE]
SCHEMA = pa.schema(
    [
        (LABEL, pa.int8()),
        ("timestamp", pa.int64()),
        *((name, pa.float32()) for name in DENSE),
        *((name, pa.int64()) for name in SPARSE),
    ]
)

DAY0_DATE = datetime(2026, 1, 1, tzinfo=timezone.utc)
DAY0 = int(DAY0_DATE.timestamp())
SECONDS_PER_DAY = 86_400

# The reader's memory grows with its block size (~40x: ~80 MB at 2 MB blocks of ~8k rows,
# ~330 MB at 8 MB) for little speed; each block is converted on its own (gluing string
# blocks together costs more than converting them), and the converted batches are gathered
# into chunks of CHUNK_ROWS rows, the Parquet row groups.
BLOCK_BYTES = 1 << 21
CHUNK_ROWS = 1 << 17
ROWS_PER_FILE = 1_000_000
PARTIAL_DIR = ".partial"


@dataclass(frozen=True)
class TextFile:
    """A Criteo text file and how it is written: delimiter, header line, gzip."""

    path: Path
    delimiter: str
    header: bool
    gzip: bool

    @classmethod
    def detect(cls, path: Path) -> TextFile:
        """Read the first line: a tab means the raw release, a first field `label` a header."""
        with open(path, "rb") as f:
            gzip = f.read(2) == b"\x1f\x8b"
        with pa.input_stream(str(path), compression="gzip" if gzip else None) as stream:
            first = stream.read(1 << 16).split(b"\n", 1)[0].rstrip(b"\r")
        line = first.decode("utf-8", "replace")
        if not line:
            raise BadInputError(f"{path}, line 1: empty, expected a Criteo row or header")
        delimiter = "\t" if "\t" in line else ","
        fields = line.split(delimiter)
        header = fields[0].strip() == LABEL
        if header and fields != COLUMNS:
            raise BadInputError(f"{path}, line 1: header {fields} differs from {COLUMNS}")
        return cls(path, delimiter, header, gzip)

    def open(self) -> pa.NativeFile:
        return pa.input_stream(str(self.path), compression="gzip" if self.gzip else None)

    def where(self, row: int) -> str:
        """`file, line N` for a 0-based data row; with a header, also the data row number."""
        line = row + 1 + self.header
        return f"{self.path}, line {line}" + (f" (data row {row + 1})" if self.header else "")

    def describe(self) -> str:
        kind = "tab-separated" if self.delimiter == "\t" else "comma-separated"
        return f"{kind}{', header' if self.header else ''}{', gzip' if self.gzip else ''}"

    def count_rows(self) -> int:
        """Data rows (lines less the header), for the one-day timestamps of rows_per_day=None."""
        lines, last = 0, b"\n"
        with self.open() as stream:
            while block := stream.read(1 << 24):
                lines += block.count(b"\n")
                last = block[-1:]
        return lines + (last != b"\n") - self.header


def read_text(text: TextFile) -> Iterator[pa.RecordBatch]:
    """Stream the file as record batches of string columns, one per block of text.

    Everything is read as strings, only the empty field is null, and quoting is off
    (Criteo has none), so the conversion sees exactly what the file says. The reader runs
    without threads: it is no slower here, and only then does pyarrow know the line number
    of a row with a wrong field count.
    """
    bad_rows: list[pa_csv.InvalidRow] = []

    def on_invalid(row: pa_csv.InvalidRow) -> str:
        bad_rows.append(row)
        return "error"

    read_options = pa_csv.ReadOptions(
        column_names=COLUMNS,
        skip_rows=int(text.header),
        block_size=BLOCK_BYTES,
        use_threads=False,
    )
    parse_options = pa_csv.ParseOptions(
        delimiter=text.delimiter,
        quote_char=False,
        ignore_empty_lines=False,
        invalid_row_handler=on_invalid,
    )
    convert_options = pa_csv.ConvertOptions(
        column_types=dict.fromkeys(COLUMNS, pa.string()),
        null_values=[""],
        strings_can_be_null=True,
    )
    try:
        with text.open() as stream:
            yield from pa_csv.open_csv(stream, read_options, parse_options, convert_options)
    except pa.ArrowInvalid as err:
        if not bad_rows:
            raise BadInputError(f"{text.path}: unreadable as Criteo text: {err}") from err
        bad = bad_rows[0]
        where = str(text.path) if bad.number is None else text.where(bad.number - 1 - text.header)
        raise BadInputError(
            f"{where}: expected {bad.expected_columns} fields, got {bad.actual_columns}: "
            f"{bad.text[:200]!r}"
        ) from err


_PROBLEMS = {
    LABEL: "label must be 0 or 1",
    **dict.fromkeys(DENSE, "not a number (or not finite in float32)"),
    **dict.fromkeys(SPARSE, f"not an ID of {HEX_DIGITS} hex digits"),
}


def timestamps(first_row: int, rows: int, rows_per_day: int) -> pa.Array:
    """The derived event time of rows `first_row ..` (see the module docstring)."""
    row = np.arange(first_row, first_row + rows, dtype=np.int64)
    within = (row % rows_per_day) * SECONDS_PER_DAY // rows_per_day
    return pa.array(DAY0 + (row // rows_per_day) * SECONDS_PER_DAY + within)


def convert_batch(
    text: pa.RecordBatch, source: TextFile, first_row: int, rows_per_day: int, log_transform: bool
) -> pa.RecordBatch:
    """Text columns -> contract columns in SCHEMA order, or BadInputError at the first
    bad cell of the batch (earliest row, then column order)."""
    converters: dict[str, Callable[[pa.Array], pa.Array]] = {
        LABEL: convert_label,
        **{name: partial(convert_dense, log_transform=log_transform) for name in DENSE},
        **dict.fromkeys(SPARSE, convert_sparse),
    }
    columns = {"timestamp": timestamps(first_row, text.num_rows, rows_per_day)}
    bad: list[tuple[int, int, str]] = []
    for position, (name, convert) in enumerate(converters.items()):
        cells = text.column(name)
        try:
            columns[name] = convert(cells)
        except ValueError:
            bad.append((first_bad_cell(cells, convert), position, name))
    if bad:
        index, _, name = min(bad)
        value = text.column(name)[index].as_py()
        shown = "missing" if value is None else repr(value)
        raise BadInputError(
            f"{source.where(first_row + index)}, column {name!r}: {_PROBLEMS[name]}, got {shown}"
        )
    return pa.RecordBatch.from_arrays([columns[name] for name in SCHEMA.names], schema=SCHEMA)


def converted_chunks(
    source: TextFile, rows_per_day: int, log_transform: bool
) -> Iterator[pa.Table]:
    """The converted file in order, as tables of >= CHUNK_ROWS rows (the last one shorter)."""
    pending: list[pa.RecordBatch] = []
    first_row = pending_rows = 0
    for text in read_text(source):
        row = first_row + pending_rows
        pending.append(convert_batch(text, source, row, rows_per_day, log_transform))
        pending_rows += text.num_rows
        if pending_rows >= CHUNK_ROWS:
            yield pa.Table.from_batches(pending)
            pending, first_row, pending_rows = [], first_row + pending_rows, 0
    if pending:
        yield pa.Table.from_batches(pending)


def day_name(day: int) -> str:
    return (DAY0_DATE + timedelta(days=day)).strftime("%Y-%m-%d")


def split_days(
    table: pa.Table, first_row: int, rows_per_day: int
) -> Iterator[tuple[int, pa.Table]]:
    """(day, rows of that day) for a chunk whose first row has position `first_row`."""
    end = first_row + table.num_rows
    row = first_row
    while row < end:
        day = row // rows_per_day
        stop = min(end, (day + 1) * rows_per_day)
        yield day, table.slice(row - first_row, stop - row)
        row = stop


@dataclass
class DayWriter:
    """Writes `root/day=YYYY-MM-DD/part-NNNNN.parquet`, rolling to a new file at each new
    day and every `rows_per_file` rows, with one file open at a time."""

    root: Path
    rows_per_file: int = ROWS_PER_FILE
    files: list[Path] = field(default_factory=list, init=False)
    day_rows: dict[str, int] = field(default_factory=dict, init=False)
    _writer: pq.ParquetWriter | None = field(default=None, init=False)
    _day: int = field(default=-1, init=False)
    _part: int = field(default=0, init=False)
    _file_rows: int = field(default=0, init=False)

    def write(self, table: pa.Table, day: int) -> None:
        """Append rows of one day, splitting them where a file fills up."""
        while table.num_rows:
            if self._writer is None or day != self._day or self._file_rows >= self.rows_per_file:
                self._roll(day)
            take = min(table.num_rows, self.rows_per_file - self._file_rows)
            self._writer.write_table(table.slice(0, take), row_group_size=take)
            self._file_rows += take
            self.day_rows[day_name(day)] = self.day_rows.get(day_name(day), 0) + take
            table = table.slice(take)

    def _roll(self, day: int) -> None:
        self.close()
        self._part = self._part + 1 if day == self._day else 0
        self._day, self._file_rows = day, 0
        path = self.root / f"day={day_name(day)}" / f"part-{self._part:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(path, SCHEMA, compression="zstd")
        self.files.append(path)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _prepare_output(out: Path) -> Path:
    """Refuse a non-empty output (stale days would mix in); return the staging directory."""
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: output directory is not empty; remove it or choose another")
    staging = out / PARTIAL_DIR
    staging.mkdir(parents=True)
    return staging


def convert_criteo(
    input: Path, out: Path, rows_per_day: int | None = None, log_transform: bool = False
) -> dict:
    """Convert a Criteo text log (see the module docstring for layouts, columns, timestamps).

    `rows_per_day` sets the day partitions and derived timestamps; None makes one day.
    `log_transform` writes I1..I13 as log(1 + x) for x > 0 and keeps values <= 0 as they are
    (Criteo's dense counts are heavy-tailed; I2 also holds small negatives).
    Files are staged in `out/.partial` and moved into place only after the last row
    converted, so an error leaves no half-written log. Returns the summary also written to
    `out/_convert.json`: rows, days, files, seconds, rows/s, nulls per column, peak RSS.
    """
    input, out = Path(input), Path(out)
    if rows_per_day is not None and rows_per_day < 1:
        raise ValueError(f"rows_per_day must be >= 1, got {rows_per_day}")
    started = time.perf_counter()
    source = TextFile.detect(input)
    per_day = rows_per_day if rows_per_day is not None else max(1, source.count_rows())
    staging = _prepare_output(out)
    writer = DayWriter(staging)
    nulls = dict.fromkeys(SCHEMA.names, 0)
    rows = 0
    try:
        for table in converted_chunks(source, per_day, log_transform):
            for name in SCHEMA.names:
                nulls[name] += table.column(name).null_count
            for day, part in split_days(table, rows, per_day):
                writer.write(part, day)
            rows += table.num_rows
        writer.close()
    except BaseException:
        writer.close()
        shutil.rmtree(staging)
        raise
    for day_dir in sorted(staging.iterdir()):
        day_dir.rename(out / day_dir.name)
    staging.rmdir()
    seconds = time.perf_counter() - started
    summary = {
        "input": str(input),
        "layout": source.describe(),
        "out": str(out),
        "rows": rows,
        "rows_per_day": rows_per_day,
        "log_transform": log_transform,
        "days": len(writer.day_rows),
        "files": len(writer.files),
        "day_rows": writer.day_rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "nulls": nulls,
    }
    (out / "_convert.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
