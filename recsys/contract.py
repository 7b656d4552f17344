"""The Parquet log contract: which columns a log must have, of which types, with which values.

Checks run on whole Arrow columns with pyarrow.compute, and the common case (a clean
column) costs one O(1) null count plus one min/max or all-finite reduction. Only when a
check fails is a per-row mask built, to name the first bad row or to drop and count the
bad rows (`data.on_bad_rows: skip`). Nothing is dropped without being counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.config import FeaturesConfig


class BadInputError(ValueError):
    """A log that breaks the contract; the message names file, column and row."""


@dataclass
class BadRowCounts:
    """Rows skipped under `on_bad_rows: skip`, counted by (column, reason)."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: BadRowCounts) -> None:
        self.counts.update(other.counts)

    def as_dict(self) -> dict[str, int]:
        return {f"{col}: {reason}": n for (col, reason), n in sorted(self.counts.items())}


def _is_id_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_int64(t.value_type)


TypeCheck = tuple[str, Callable[[pa.DataType], bool]]


def _expected_types(features: FeaturesConfig) -> dict[str, TypeCheck]:
    """Column -> (description for messages, type predicate)."""
    integer: TypeCheck = (
        "an integer or boolean type",
        lambda t: pa.types.is_integer(t) or pa.types.is_boolean(t),
    )
    int64: TypeCheck = ("int64", pa.types.is_int64)
    floating: TypeCheck = ("float32 or float64", pa.types.is_floating)
    id_list: TypeCheck = ("list<int64>", _is_id_list)
    spec = {features.label: integer, features.timestamp: int64}
    if features.user_id:
        spec[features.user_id] = int64
    for f in features.dense:
        spec[f.name] = floating
    for f in features.sparse:
        spec[f.name] = id_list if f.multi_valued else int64
    for s in features.sequences:
        spec[s.name] = id_list
    if features.sequence_timestamps:
        spec[features.sequence_timestamps] = id_list
    return spec


def traffic_optional(features: FeaturesConfig) -> frozenset[str]:
    """The columns live traffic may lack: the label, the user (GAUC only) and the
    timestamp, unless behaviour timestamps need it to measure time gaps; never a column
    the model reads (a user ID that is also a sparse feature stays required)."""
    optional = {features.label, features.user_id}
    if not features.sequence_timestamps:
        optional.add(features.timestamp)
    inputs = {f.name for f in (*features.dense, *features.sparse, *features.sequences)}
    return frozenset(c for c in optional if c and c not in inputs)


def check_schema(
    schema: pa.Schema,
    features: FeaturesConfig,
    source: str,
    optional: frozenset[str] = frozenset(),
) -> None:
    """Fail on missing columns or wrong types before any row is read; `optional` columns
    may be absent (`traffic_optional`), and are checked when present."""
    spec = {
        c: check
        for c, check in _expected_types(features).items()
        if c in schema.names or c not in optional
    }
    missing = [c for c in spec if c not in schema.names]
    if missing:
        raise BadInputError(
            f"{source}: missing column(s) {missing} declared in features "
            f"(the file has {schema.names})"
        )
    for column, (wanted, ok) in spec.items():
        actual = schema.field(column).type
        if not ok(actual):
            raise BadInputError(f"{source}: column {column!r} has type {actual}, expected {wanted}")


def _row_checks(table: pa.Table, features: FeaturesConfig) -> list[tuple[str, str, pa.Array]]:
    """(column, reason, boolean mask of bad rows) for every check that finds a bad row."""
    found: list[tuple[str, str, pa.Array]] = []

    def nulls(column: str) -> None:
        col = table.column(column)
        if col.null_count:
            found.append((column, "null value", pc.is_null(col)))

    def any_true(mask: pa.ChunkedArray) -> bool:
        return bool(pc.any(mask).as_py())

    if features.label in table.column_names:  # absent only where `optional` allowed it
        label = table.column(features.label)
        nulls(features.label)
        binary = (None, 0, 1, False, True)
        lo_hi = pc.min_max(label)
        if lo_hi["min"].as_py() not in binary or lo_hi["max"].as_py() not in binary:
            bad = pc.invert(pc.is_in(pc.cast(label, pa.int64()), value_set=pa.array([0, 1])))
            found.append((features.label, "label outside {0, 1}", pc.fill_null(bad, False)))
    for column in (features.timestamp, features.user_id):
        if column and column in table.column_names:
            nulls(column)
    for f in features.dense:
        if f.fill_null is None:
            nulls(f.name)
        col = table.column(f.name)
        finite = pc.fill_null(pc.is_finite(col), True)
        if not pc.all(finite).as_py():
            found.append((f.name, "NaN or infinite value", pc.invert(finite)))
    for f in features.sparse:
        col = table.column(f.name)
        if not f.allow_null:
            nulls(f.name)
        if f.multi_valued:
            _check_id_list(f.name, col, f.allow_negative, found)
        elif not f.allow_negative:
            low = pc.min(col).as_py()
            if low is not None and low < 0:
                found.append((f.name, "negative ID", pc.fill_null(pc.less(col, 0), False)))
    seq_columns = [s.name for s in features.sequences]
    if features.sequence_timestamps:
        seq_columns.append(features.sequence_timestamps)
    allow_null = {s.name: s.allow_null for s in features.sequences}
    for name in seq_columns:
        if not allow_null.get(name, False):
            nulls(name)
        _check_id_list(name, table.column(name), False, found)
    if len(seq_columns) > 1:
        first = pc.fill_null(pc.list_value_length(table.column(seq_columns[0])), 0)
        for name in seq_columns[1:]:
            other = pc.fill_null(pc.list_value_length(table.column(name)), 0)
            differs = pc.not_equal(first, other)
            if any_true(differs):
                found.append((name, f"length differs from {seq_columns[0]!r}", differs))
    return found


def _check_id_list(
    name: str, col: pa.ChunkedArray, allow_negative: bool, found: list[tuple[str, str, pa.Array]]
) -> None:
    """Null elements inside lists and (unless allowed) negative IDs, mapped back to rows."""
    flat = pc.list_flatten(col)
    bad_values = None
    reason = ""
    if flat.null_count:
        bad_values, reason = pc.is_null(flat), "null ID inside a list"
    elif not allow_negative:
        low = pc.min(flat).as_py()
        if low is not None and low < 0:
            bad_values, reason = pc.less(flat, 0), "negative ID"
    if bad_values is None:
        return
    parents = pc.list_parent_indices(col)
    mask = np.zeros(len(col), dtype=bool)
    mask[pc.filter(parents, bad_values).to_numpy()] = True
    found.append((name, reason, pa.array(mask)))


def validate_table(
    table: pa.Table,
    features: FeaturesConfig,
    source: str,
    row_offset: int = 0,
    on_bad_rows: str = "error",
    optional: frozenset[str] = frozenset(),
) -> tuple[pa.Table, BadRowCounts]:
    """Check a table against the contract; return it (minus skipped rows) and what was skipped.

    `row_offset` is the index of the table's first row in its file, so errors name the
    row as a user finds it with `pyarrow.parquet.read_table(file).slice(row, 1)`;
    `optional` columns may be absent (see `check_schema`).
    """
    check_schema(table.schema, features, source, optional)
    problems = _row_checks(table, features)
    counts = BadRowCounts()
    if not problems:
        return table, counts
    if on_bad_rows == "error":
        column, reason, mask = min(problems, key=lambda p: pc.index(p[2], True).as_py())
        row = pc.index(mask, True).as_py()
        n_bad = pc.sum(mask).as_py()
        value = table.column(column)[row].as_py()
        raise BadInputError(
            f"{source}: column {column!r}, row {row_offset + row}: {reason} (value {value!r}); "
            f"{n_bad} row(s) of this batch have this problem. Fix the log, or set "
            f"data.on_bad_rows: skip to drop and count such rows"
        )
    any_bad = problems[0][2]
    for column, reason, mask in problems:
        counts.counts[(column, reason)] += pc.sum(mask).as_py()
        any_bad = pc.or_(any_bad, mask)
    return table.filter(pc.invert(any_bad)), counts
