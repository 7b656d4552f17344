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
conversion per block, written by `recsys.convert.day_log` as every converter here writes),
so memory stays bounded whatever the input size. Bad input is never dropped: a wrong field
count, a label other than 0/1, a dense value that is not a finite number or an ID that is
not 8 hex digits raises `BadInputError` naming the file, line and column, and no output is
left behind. `TextFile` and `string_batches` are the input side the CSV and libsvm
converters share.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from recsys.contract import BadInputError
from recsys.convert.cells import (
    HEX_DIGITS,
    Converter,
    convert_columns,
    convert_dense,
    convert_label,
    convert_sparse,
)
from recsys.convert.day_log import SECONDS_PER_DAY, DayPartitionedLog, gathered

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

DAY0 = int(datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp())

# The reader's memory grows with its block size (~40x: ~80 MB at 2 MB blocks of ~8k rows,
# ~330 MB at 8 MB) for little speed; each block is converted on its own (gluing string
# blocks together costs more than converting them), and the converted batches are gathered
# into row groups (`recsys.convert.day_log.gathered`).
BLOCK_BYTES = 1 << 21


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
        gzip = is_gzip(path)
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


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def string_batches(
    source: TextFile,
    names: list[str],
    kind: str,
    line: Callable[[int], str],
    quote_char: str | bool = False,
    include_columns: list[str] | None = None,
) -> Iterator[pa.RecordBatch]:
    """The data rows of `source` as record batches of string columns, one per block of text.

    Everything is read as strings and only the empty field is null, so the conversion sees
    exactly what the file says. The reader runs without threads: it is no slower here, and
    only then does pyarrow know the line number of a row with a wrong field count, which
    raises BadInputError at `line(number)`; a file it cannot read is "unreadable as <kind>".
    """
    bad_rows: list[pa_csv.InvalidRow] = []

    def on_invalid(row: pa_csv.InvalidRow) -> str:
        bad_rows.append(row)
        return "error"

    read_options = pa_csv.ReadOptions(
        column_names=names,
        skip_rows=int(source.header),
        block_size=BLOCK_BYTES,
        use_threads=False,
    )
    parse_options = pa_csv.ParseOptions(
        delimiter=source.delimiter,
        quote_char=quote_char,
        ignore_empty_lines=False,
        invalid_row_handler=on_invalid,
    )
    convert_options = pa_csv.ConvertOptions(
        column_types=dict.fromkeys(names, pa.string()),
        include_columns=include_columns or [],
        null_values=[""],
        strings_can_be_null=True,
    )
    try:
        with source.open() as stream:
            yield from pa_csv.open_csv(stream, read_options, parse_options, convert_options)
    except pa.ArrowInvalid as err:
        if not bad_rows:
            raise BadInputError(f"{source.path}: unreadable as {kind}: {err}") from err
        bad = bad_rows[0]
        where = str(source.path) if bad.number is None else line(bad.number)
        raise BadInputError(
            f"{where}: expected {bad.expected_columns} fields, got {bad.actual_columns}: "
            f"{bad.text[:200]!r}"
        ) from err


def read_text(text: TextFile) -> Iterator[pa.RecordBatch]:
    """Stream the Criteo file as string record batches, quoting off (Criteo has none)."""
    return string_batches(
        text, COLUMNS, "Criteo text", lambda number: text.where(number - 1 - text.header)
    )


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
    dense = partial(convert_dense, log_transform=log_transform)
    converters: dict[str, tuple[Converter, str]] = {
        LABEL: (convert_label, "label must be 0 or 1"),
        **dict.fromkeys(DENSE, (dense, "not a number (or not finite in float32)")),
        **dict.fromkeys(SPARSE, (convert_sparse, f"not an ID of {HEX_DIGITS} hex digits")),
    }
    cells = {name: text.column(name) for name in converters}
    columns = convert_columns(cells, converters, lambda row: source.where(first_row + row))
    columns["timestamp"] = timestamps(first_row, text.num_rows, rows_per_day)
    return pa.RecordBatch.from_arrays([columns[name] for name in SCHEMA.names], schema=SCHEMA)


def converted_chunks(
    source: TextFile, rows_per_day: int, log_transform: bool
) -> Iterator[pa.Table]:
    """The converted file in order, as the row groups of `gathered`."""

    def batches() -> Iterator[pa.RecordBatch]:
        row = 0
        for text in read_text(source):
            yield convert_batch(text, source, row, rows_per_day, log_transform)
            row += text.num_rows

    return gathered(batches())


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
    with DayPartitionedLog(out, SCHEMA) as log:
        for table in converted_chunks(source, per_day, log_transform):
            log.write(table)
        return log.commit(
            {
                "input": str(input),
                "layout": source.describe(),
                "rows_per_day": rows_per_day,
                "log_transform": log_transform,
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
