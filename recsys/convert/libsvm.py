"""Convert libsvm and libfm (libffm) text logs to the project's Parquet log contract.

Formats, one record per line, tokens separated by whitespace: libsvm
`label index:value ...`; libfm `label field:feature:value ...` (the libffm layout, which is
what CTR benchmarks ship as "libfm"). Labels: 0 or 1, and the libsvm convention -1 / +1,
read as 0 / 1 (also written as floats, "1.0"); anything else is bad input.

What a token becomes. Public CTR sets in these formats (LIBSVM's Criteo and Avazu, the
Frappe and MovieLens sets of the FM papers) one-hot encode categorical features: the index
(libsvm) or the feature (libfm) is the category, the value is 1. So:

- libfm: each field is a column `f<field>`, by default categorical: its feature is the
  int64 ID and every value must be 1; int64 if no line repeats the field, else list<int64>
  (`multi_valued` forces a list). Fields in `numeric` are float32 columns of the value
  (the feature index is ignored), at most one per line. A field absent from a line is null
  there (an empty list if multi-valued). A first pass over the file learns its fields.
- libsvm: indices in `numeric` are float32 columns `x<index>` (null where a line lacks the
  index; libsvm's "absent means 0" is `fill_null: 0.0` in the experiment). Every other
  token is a one-hot ID: the index is the int64 ID, the value must be 1. With layout
  `positional` (default) the k-th ID of a line is column `f<k>` (1-based), and every line
  must hold as many IDs as line 1 (one per field, as the public sets are written); `bag`
  keeps any number of IDs in one list<int64> column `ids`.

Indices, fields and features are non-negative integers. Output, as for the Criteo
converter: `label` int8, `timestamp` int64 derived from the row position exactly as
`recsys.convert.criteo` derives it (default: one day), numeric columns, then ID columns in
ascending index / field order, Hive-partitioned by day. The text is read in blocks of
whole lines and tokenized by `recsys.convert.libsvm_reader`; numpy gathers the columns,
with no Python per line or token. A malformed line raises `BadInputError` naming the
file, the 1-based line and what is wrong; the staged output is removed. The two formats
share the reader, the checks and the writing loop, and differ only in their layout classes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from recsys.contract import BadInputError
from recsys.convert.criteo import TextFile, is_gzip, timestamps
from recsys.convert.csv_spec import id_list_array
from recsys.convert.day_log import DayPartitionedLog, gathered
from recsys.convert.libsvm_reader import (
    BadLine,
    Tokens,
    lines_before,
    parse_tokens,
    parsed,
    read_blocks,
)

Layout = Literal["positional", "bag"]


def _check_one_hot(t: Tokens, categorical: np.ndarray, numeric_hint: str) -> None:
    bad = categorical & (t.values != 1.0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise BadLine(
            int(t.rows[i]),
            f"value {t.values[i]:g} of the one-hot ID {t.features[i]} is not 1 "
            f"(declare numeric {numeric_hint} with --numeric)",
        )


def _numeric_column(t: Tokens, select: np.ndarray, what: str) -> pa.Array:
    """float32 of the selected tokens' values at their lines, null elsewhere; one per line."""
    rows = t.rows[select]
    counts = np.bincount(rows, minlength=t.lines)
    if (counts > 1).any():
        raise BadLine(int(np.flatnonzero(counts > 1)[0]), f"{what} appears twice")
    with np.errstate(over="ignore"):  # a float32 overflow is reported as not finite
        values = t.values[select].astype(np.float32)
    if not np.isfinite(values).all():
        raise BadLine(int(rows[~np.isfinite(values)][0]), f"{what}: not finite in float32")
    out = np.zeros(t.lines, np.float32)
    out[rows] = values
    return pa.array(out, mask=None if (counts == 1).all() else counts == 0)


def _id_column(t: Tokens, select: np.ndarray, multi: bool, what: str) -> pa.Array:
    """int64 (or list<int64>) of the selected tokens' features at their lines."""
    rows, ids = t.rows[select], t.features[select]
    counts = np.bincount(rows, minlength=t.lines)
    if multi:
        return id_list_array(np.concatenate([[0], np.cumsum(counts)]), ids)
    if (counts > 1).any():
        raise BadLine(int(np.flatnonzero(counts > 1)[0]), f"{what} appears twice")
    out = np.zeros(t.lines, np.int64)
    out[rows] = ids
    return pa.array(out, mask=None if (counts == 1).all() else counts == 0)


def _schema(numeric: list[str], ids: dict[str, bool]) -> pa.Schema:
    """label, timestamp, the numeric columns, then the ID columns (name -> multi-valued)."""
    fields = [("label", pa.int8()), ("timestamp", pa.int64())]
    fields += [(name, pa.float32()) for name in numeric]
    fields += [(name, pa.list_(pa.int64()) if multi else pa.int64()) for name, multi in ids.items()]
    return pa.schema(fields)


@dataclass
class LibsvmLayout:
    """How libsvm tokens become columns (see the module docstring)."""

    numeric: list[int]
    layout: Layout
    ids_per_line: int  # positional: the number of IDs on line 1

    def schema(self) -> pa.Schema:
        positional = {f"f{k + 1}": False for k in range(self.ids_per_line)}
        ids = {"ids": True} if self.layout == "bag" else positional
        return _schema([f"x{i}" for i in self.numeric], ids)

    def columns(self, t: Tokens) -> list[pa.Array]:
        is_numeric = np.isin(t.keys, self.numeric)
        _check_one_hot(t, ~is_numeric, "indices")
        out = [_numeric_column(t, t.keys == i, f"index {i}") for i in self.numeric]
        counts = np.bincount(t.rows[~is_numeric], minlength=t.lines)
        ids = t.features[~is_numeric]
        if self.layout == "bag":
            return [*out, id_list_array(np.concatenate([[0], np.cumsum(counts)]), ids)]
        k = self.ids_per_line
        wrong = counts != k
        if wrong.any():
            row = int(np.flatnonzero(wrong)[0])
            raise BadLine(
                row,
                f"{counts[row]} IDs where line 1 has {k}: the positional layout takes one ID "
                "per field on every line (layout 'bag' takes any number)",
            )
        grid = ids.reshape(t.lines, k)
        return [*out, *(pa.array(grid[:, j]) for j in range(k))]


@dataclass
class LibfmLayout:
    """How libfm tokens become columns: the fields of the file and their kinds."""

    numeric: list[int]
    categorical: list[int]
    multi_valued: set[int]

    def schema(self) -> pa.Schema:
        ids = {f"f{f}": f in self.multi_valued for f in self.categorical}
        return _schema([f"f{f}" for f in self.numeric], ids)

    def columns(self, t: Tokens) -> list[pa.Array]:
        is_numeric = np.isin(t.keys, self.numeric)
        _check_one_hot(t, ~is_numeric, "fields")
        unknown = ~is_numeric & ~np.isin(t.keys, self.categorical)
        if unknown.any():
            raise BadLine(int(t.rows[unknown][0]), "a field the first pass did not see")
        out = [_numeric_column(t, t.keys == f, f"field {f}") for f in self.numeric]
        for f in self.categorical:
            out.append(_id_column(t, t.keys == f, f in self.multi_valued, f"field {f}"))
        return out


def _ids_on_line_one(source: TextFile, numeric: list[int]) -> int:
    for first_line, lines in read_blocks(source):
        one = lines_before(lines, 1)
        t = parsed(one, first_line, source.path, lambda p: parse_tokens(p, 2))
        return int((~np.isin(t.keys, numeric)).sum())
    raise BadInputError(f"{source.path}: no lines")


def _scan_libfm(source: TextFile, numeric: list[int], multi_valued: set[int]) -> LibfmLayout:
    """First pass: every field of the file, and the categorical ones some line repeats
    (plus those asked to be lists, seen or not, so that files can share a schema)."""
    fields, repeated = set(multi_valued), set(multi_valued)
    lines_seen = 0

    def scan(lines: bytes) -> None:
        t = parse_tokens(lines, 3)
        _check_one_hot(t, ~np.isin(t.keys, numeric), "fields")
        fields.update(np.unique(t.keys).tolist())
        order = np.lexsort((t.rows, t.keys))
        keys, rows = t.keys[order], t.rows[order]
        again = (keys[1:] == keys[:-1]) & (rows[1:] == rows[:-1])
        repeated.update(np.unique(keys[1:][again]).tolist())

    for first_line, lines in read_blocks(source):
        parsed(lines, first_line, source.path, scan)
        lines_seen += 1
    if not lines_seen:
        raise BadInputError(f"{source.path}: no lines")
    categorical = sorted(fields - set(numeric))
    return LibfmLayout(numeric, categorical, repeated & set(categorical))


def _convert(
    source: TextFile,
    out: Path,
    parts: int,
    plan: LibsvmLayout | LibfmLayout,
    rows_per_day: int | None,
    info: dict[str, Any],
) -> dict[str, Any]:
    """The second (libsvm: only) pass: blocks of lines -> row groups of the log."""
    started = time.perf_counter()
    if rows_per_day is not None and rows_per_day < 1:
        raise ValueError(f"rows_per_day must be >= 1, got {rows_per_day}")
    per_day = rows_per_day if rows_per_day is not None else max(1, source.count_rows())
    schema = plan.schema()

    def convert(part: bytes) -> list[pa.Array]:
        t = parse_tokens(part, parts)
        return [pa.array(t.labels), *plan.columns(t)]

    def batches() -> Iterator[pa.RecordBatch]:
        row = 0
        for first_line, lines in read_blocks(source):
            label, *columns = parsed(lines, first_line, source.path, convert)
            clock = timestamps(row, len(label), per_day)
            yield pa.RecordBatch.from_arrays([label, clock, *columns], schema=schema)
            row += len(label)

    with DayPartitionedLog(out, schema) as log:
        for table in gathered(batches()):
            log.write(table)
        columns = {f.name: str(f.type) for f in schema}
        seconds = round(time.perf_counter() - started, 3)
        summary = {"input": str(source.path), **info, "rows_per_day": rows_per_day}
        return log.commit({**summary, "columns": columns, "seconds": seconds})


def convert_libsvm(
    input: str | Path,
    out: str | Path,
    rows_per_day: int | None = None,
    numeric: Iterable[int] = (),
    layout: Layout = "positional",
) -> dict[str, Any]:
    """Convert a libsvm file (optionally gzip); returns the summary in `out/_convert.json`."""
    if layout not in ("positional", "bag"):
        raise ValueError(f"layout must be 'positional' or 'bag', got {layout!r}")
    source = TextFile(Path(input), " ", False, is_gzip(Path(input)))
    indices = sorted(set(numeric))
    k = _ids_on_line_one(source, indices) if layout == "positional" else 0
    plan = LibsvmLayout(indices, layout, k)
    info = {"format": "libsvm", "layout": layout, "numeric": indices}
    return _convert(source, Path(out), 2, plan, rows_per_day, info)


def convert_libfm(
    input: str | Path,
    out: str | Path,
    rows_per_day: int | None = None,
    numeric: Iterable[int] = (),
    multi_valued: Iterable[int] = (),
) -> dict[str, Any]:
    """Convert a libfm / libffm file (optionally gzip); returns the summary."""
    if rows_per_day is not None and rows_per_day < 1:  # before the first pass, not after
        raise ValueError(f"rows_per_day must be >= 1, got {rows_per_day}")
    numeric, multi_valued = sorted(set(numeric)), set(multi_valued)
    if multi_valued & set(numeric):
        raise ValueError(f"fields {sorted(multi_valued & set(numeric))} are numeric: not lists")
    source = TextFile(Path(input), " ", False, is_gzip(Path(input)))
    plan = _scan_libfm(source, numeric, multi_valued)
    info = {"format": "libfm", "numeric": plan.numeric, "multi_valued": sorted(plan.multi_valued)}
    return _convert(source, Path(out), 3, plan, rows_per_day, info)


def parse_indices(text: str) -> list[int]:
    """`1-13,20` -> [1, ..., 13, 20]: the CLI's index and field lists."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"{text!r}: expected indices like 1-13,20")
        out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    return out
