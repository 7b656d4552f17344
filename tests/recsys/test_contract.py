"""The Parquet contract: every kind of bad input is named (file, column, row) or counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.contract import BadInputError, BadRowCounts
from recsys.logs import parquet_files, read_validated
from tests.small_log import small_features, small_table


def _write(table: pa.Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=64)
    return path


def _replace(table: pa.Table, column: str, values: list) -> pa.Table:
    i = table.schema.get_field_index(column)
    return table.set_column(i, column, pa.array(values, table.schema.field(column).type))


def _read_all(path: Path, on_bad_rows: str = "error") -> tuple[int, BadRowCounts]:
    skipped = BadRowCounts()
    rows = sum(
        t.num_rows
        for t in read_validated(
            path, small_features(), batch_size=50, on_bad_rows=on_bad_rows, skipped=skipped
        )
    )
    return rows, skipped


def test_clean_log_passes_whole(tmp_path: Path) -> None:
    _write(small_table(300, seed=0), tmp_path / "day=1" / "part-0.parquet")
    rows, skipped = _read_all(tmp_path)
    assert rows == 300 and skipped.total == 0


@pytest.mark.parametrize(
    ("column", "row", "bad_value", "reason"),
    [
        ("label", 173, 2, "label outside {0, 1}"),
        ("label", 5, None, "null value"),
        ("d0", 230, float("nan"), "NaN or infinite value"),
        ("d0", 231, float("inf"), "NaN or infinite value"),
        ("d0", 12, None, "null value"),
        ("s_single", 99, -7, "negative ID"),
        ("s_single", 98, None, "null value"),
        ("s_multi", 144, [3, -1], "negative ID"),
        ("s_multi", 145, [3, None], "null ID inside a list"),
        (
            "hist",
            201,
            [
                1,
                2,
                3,
                4,
                5,
                6,
                7,
                8,
                9,
                10,
                11,
                12,
                13,
                14,
                15,
                16,
                17,
                18,
                19,
                20,
                21,
                22,
                23,
                24,
                25,
                26,
                27,
                28,
                29,
                30,
                31,
                32,
                33,
                34,
                35,
                36,
                37,
                38,
                39,
                40,
                41,
            ],
            "length differs",
        ),
        ("timestamp", 0, None, "null value"),
    ],
)
def test_bad_cell_is_named_by_file_column_and_row(
    tmp_path: Path, column: str, row: int, bad_value: object, reason: str
) -> None:
    table = small_table(300, seed=0)
    values = table.column(column).to_pylist()
    if column == "hist":  # a history longer than its timestamps
        table = _replace(table, "hist_ts", [v or [] for v in table.column("hist_ts").to_pylist()])
        values = [v or [] for v in values]
    values[row] = bad_value
    path = _write(_replace(table, column, values), tmp_path / "day=1" / "part-0.parquet")
    with pytest.raises(BadInputError) as err:
        _read_all(tmp_path)
    message = str(err.value)
    assert str(path) in message
    assert f"column {column!r}" in message or (column == "hist" and "'hist" in message)
    assert f"row {row}:" in message
    assert reason in message


def test_skip_drops_and_counts_every_bad_row(tmp_path: Path) -> None:
    table = small_table(300, seed=0)
    labels = table.column("label").to_pylist()
    ids = table.column("s_single").to_pylist()
    for r in (3, 60, 61):
        labels[r] = 5
    for r in (61, 200):
        ids[r] = -1
    table = _replace(_replace(table, "label", labels), "s_single", ids)
    _write(table, tmp_path / "part-0.parquet")
    rows, skipped = _read_all(tmp_path, on_bad_rows="skip")
    assert rows == 300 - 4  # row 61 is bad twice but dropped once
    assert skipped.as_dict() == {
        "label: label outside {0, 1}": 3,
        "s_single: negative ID": 2,
    }


def test_negative_ids_pass_where_allowed(tmp_path: Path) -> None:
    # s_nullable allows negatives and nulls; small_table fills it with both.
    table = small_table(300, seed=0)
    assert table.column("s_nullable").null_count > 0
    assert min(v for v in table.column("s_nullable").to_pylist() if v is not None) < 0
    _write(table, tmp_path / "part-0.parquet")
    assert _read_all(tmp_path)[0] == 300


def test_missing_column_and_wrong_type_are_named(tmp_path: Path) -> None:
    table = small_table(20, seed=0)
    path = _write(table.drop(["s_multi"]), tmp_path / "a" / "part-0.parquet")
    with pytest.raises(BadInputError, match=r"part-0.parquet: missing column\(s\) \['s_multi'\]"):
        _read_all(path)
    as_int32 = table.set_column(
        table.schema.get_field_index("s_single"),
        "s_single",
        pa.array(np.arange(20, dtype=np.int32)),
    )
    path = _write(as_int32, tmp_path / "b" / "part-0.parquet")
    with pytest.raises(BadInputError, match="column 's_single' has type int32, expected int64"):
        _read_all(path)


def test_finding_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        parquet_files(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"no \.parquet files"):
        parquet_files(tmp_path)
    for day in ("day=2026-01-02", "day=2026-01-01"):
        _write(small_table(5, seed=0), tmp_path / day / "part-00000.parquet")
    (tmp_path / "_generator.json").write_text("{}")
    assert [p.parent.name for p in parquet_files(tmp_path)] == ["day=2026-01-01", "day=2026-01-02"]
