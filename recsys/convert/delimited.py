"""Convert CSV / TSV logs to the Parquet log contract, driven by a feature spec (see
`recsys.convert.csv_spec`); the output, staged day-partitioned Parquet, is
`recsys.convert.day_log`'s, as for every text converter here.

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
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from recsys.contract import BadInputError
from recsys.convert.cells import Converter, convert_columns, convert_dense, convert_label
from recsys.convert.criteo import TextFile, is_gzip, string_batches, timestamps
from recsys.convert.csv_spec import CsvSpec, encode_id_lists, encode_ids
from recsys.convert.day_log import DayPartitionedLog, gathered

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
    skipped = {n for n, c in spec.columns.items() if c.type == "skip"}
    return string_batches(
        source,
        names,
        "delimited text",
        lambda number: f"{source.path}, line {number}",
        quote_char='"' if spec.quote else False,
        include_columns=[n for n in names if n not in skipped],
    )


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
