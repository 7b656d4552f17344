"""The Criteo converter: both text layouts give the same Parquet log, values match the text,
day partitions and timestamps follow the row position, and bad input is named, not dropped."""

from __future__ import annotations

import csv
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from recsys.config import load_config
from recsys.convert.criteo import DAY0, DENSE, SCHEMA, SPARSE, convert_criteo
from recsys.convert.day_log import DayPartitionedLog
from recsys.logs import read_validated
from tests.helpers import read_log

REPO = Path(__file__).resolve().parents[2]


def _shared_data() -> Path:
    """$RECSYS_SHARED_DATA, else shared/data beside the checkout (<parent>/main and
    <parent>/shared, as CI clones them)."""
    env = os.environ.get("RECSYS_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


DATA = _shared_data()
TSV = DATA / "criteo_sample.tsv"
CSV = DATA / "criteo_sample.txt"

pytestmark = pytest.mark.skipif(
    not (TSV.is_file() and CSV.is_file()),
    reason=f"Criteo fixtures not found in {DATA} (set RECSYS_SHARED_DATA to their folder)",
)


def _text_rows() -> list[list[str]]:
    with open(TSV, newline="") as f:
        return list(csv.reader(f, delimiter="\t"))


def _corrupt(tmp_path: Path, line: int, field: int, value: str | None) -> Path:
    """A copy of the TSV fixture with one field of a 1-based line replaced (None: removed)."""
    rows = _text_rows()
    if value is None:
        del rows[line - 1][field]
    else:
        rows[line - 1][field] = value
    path = tmp_path / "corrupt.tsv"
    path.write_text("".join("\t".join(r) + "\n" for r in rows))
    return path


def test_both_layouts_give_identical_tables(tmp_path: Path) -> None:
    from_tsv = convert_criteo(TSV, tmp_path / "tsv")
    from_csv = convert_criteo(CSV, tmp_path / "csv")
    tsv, csv_ = read_log(tmp_path / "tsv"), read_log(tmp_path / "csv")
    assert tsv.schema == SCHEMA
    assert tsv.equals(csv_)
    assert tsv.num_rows == from_tsv["rows"] == from_csv["rows"] == 200
    assert from_tsv["layout"] == "tab-separated"
    assert from_csv["layout"] == "comma-separated, header"


def test_values_match_the_text(tmp_path: Path) -> None:
    convert_criteo(TSV, tmp_path / "out")
    table = read_log(tmp_path / "out").to_pydict()
    rows = _text_rows()
    assert set(table["label"]) == {0, 1}
    assert table["label"] == [int(r[0]) for r in rows]
    for i, name in enumerate(DENSE, start=1):
        assert table[name] == [float(r[i]) if r[i] else None for r in rows], name
    for i, name in enumerate(SPARSE, start=14):
        assert table[name] == [int(r[i], 16) if r[i] else None for r in rows], name
    # A known row: the first one's C1 '05db9164', I1 and C19 missing.
    assert table["C1"][0] == 0x05DB9164
    assert table["I1"][0] is None
    assert table["C19"][0] is None


def test_summary_counts_nulls_and_is_written(tmp_path: Path) -> None:
    summary = convert_criteo(TSV, tmp_path / "out")
    table = read_log(tmp_path / "out")
    assert summary["nulls"] == {name: table.column(name).null_count for name in SCHEMA.names}
    assert summary["nulls"]["I1"] > 0
    assert json.loads((tmp_path / "out" / "_convert.json").read_text()) == summary
    assert (summary["days"], summary["files"]) == (1, 1)


def test_log_transform_applies_to_positive_values_only(tmp_path: Path) -> None:
    convert_criteo(TSV, tmp_path / "plain")
    convert_criteo(TSV, tmp_path / "log", log_transform=True)
    plain, logged = read_log(tmp_path / "plain"), read_log(tmp_path / "log")
    for name in DENSE:
        x = np.array([float(r[DENSE.index(name) + 1] or "nan") for r in _text_rows()])
        want = np.where(x > 0, np.log1p(np.where(x > 0, x, 0)), x).astype(np.float32)
        got = logged.column(name).to_numpy(zero_copy_only=False)
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)
    # Values <= 0 are kept as they are (I2 holds -1, several columns hold 0).
    i2 = plain.column("I2").to_pylist()
    assert -1.0 in i2
    assert logged.column("I2").to_pylist()[i2.index(-1.0)] == -1.0
    assert logged.column("C1").equals(plain.column("C1"))


def test_rows_per_day_partitions_and_timestamps(tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = convert_criteo(CSV, out, rows_per_day=80)
    days = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert days == ["day=2026-01-01", "day=2026-01-02", "day=2026-01-03"]
    counts = [pq.read_table(out / d).num_rows for d in days]
    assert counts == [80, 80, 40]
    assert summary["day_rows"] == {"2026-01-01": 80, "2026-01-02": 80, "2026-01-03": 40}
    table = read_log(out)
    assert "day" not in table.column_names
    ts = np.asarray(table.column("timestamp"))
    assert (np.diff(ts) > 0).all()
    assert ts[0] == DAY0 == 1_767_225_600  # 2026-01-01 00:00:00 UTC
    assert ts[80] == DAY0 + 86_400 and ts[160] == DAY0 + 2 * 86_400
    assert ts[1] - ts[0] == 86_400 // 80
    # The rows keep their order: the same table as one day, timestamps aside.
    convert_criteo(CSV, tmp_path / "one")
    one_day = read_log(tmp_path / "one")
    assert table.drop_columns(["timestamp"]).equals(one_day.drop_columns(["timestamp"]))


def test_one_day_spreads_rows_over_the_day(tmp_path: Path) -> None:
    convert_criteo(TSV, tmp_path / "out")
    ts = np.asarray(read_log(tmp_path / "out").column("timestamp"))
    assert [p.name for p in (tmp_path / "out").glob("day=*")] == ["day=2026-01-01"]
    assert (np.diff(ts) > 0).all()
    assert ts[0] == DAY0 and ts[-1] == DAY0 + 199 * 86_400 // 200


def test_day_log_rolls_files_within_a_day(tmp_path: Path) -> None:
    convert_criteo(TSV, tmp_path / "src")
    table = read_log(tmp_path / "src")
    at = table.schema.get_field_index("timestamp")
    next_day = table.set_column(at, "timestamp", pc.add(table.column(at), 86_400))
    with DayPartitionedLog(tmp_path / "out", SCHEMA, rows_per_file=70) as log:
        log.write(table)
        log.write(next_day.slice(0, 10))
        log.commit({})
    files = sorted((tmp_path / "out").glob("day=*/*.parquet"))
    assert [f.relative_to(tmp_path / "out").as_posix() for f in files] == [
        "day=2026-01-01/part-00000.parquet",
        "day=2026-01-01/part-00001.parquet",
        "day=2026-01-01/part-00002.parquet",
        "day=2026-01-02/part-00000.parquet",
    ]
    assert [pq.read_metadata(f).num_rows for f in files] == [70, 70, 60, 10]
    assert read_log(tmp_path / "out").slice(0, 200).equals(table)


def test_gzip_input_gives_the_same_table(tmp_path: Path) -> None:
    for source, name in ((TSV, "sample.tsv.gz"), (CSV, "sample.txt.gz")):
        compressed = tmp_path / name
        compressed.write_bytes(gzip.compress(source.read_bytes()))
        summary = convert_criteo(compressed, tmp_path / name.replace(".", "_"))
        assert summary["layout"].endswith("gzip")
    convert_criteo(TSV, tmp_path / "plain")
    plain = read_log(tmp_path / "plain")
    assert read_log(tmp_path / "sample_tsv_gz").equals(plain)
    assert read_log(tmp_path / "sample_txt_gz").equals(plain)


@pytest.mark.parametrize(
    ("line", "field", "value", "expected"),
    [
        (5, 16, "zz12", ["line 5", "'C3'", "'zz12'", "hex"]),
        (5, 16, "05db916", ["line 5", "'C3'", "'05db916'"]),
        (5, 16, "+5db9164", ["line 5", "'C3'", "'+5db9164'"]),
        (7, 0, "2", ["line 7", "'label'", "'2'"]),
        (7, 0, "", ["line 7", "'label'", "missing"]),
        (11, 4, "abc", ["line 11", "'I4'", "'abc'"]),
        (11, 4, "nan", ["line 11", "'I4'", "'nan'"]),
        (9, 3, None, ["line 9", "expected 40 fields, got 39"]),
    ],
)
def test_bad_input_is_named_and_nothing_is_written(
    tmp_path: Path, line: int, field: int, value: str | None, expected: list[str]
) -> None:
    bad = _corrupt(tmp_path, line, field, value)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as err:
        convert_criteo(bad, out)
    message = str(err.value)
    assert str(bad) in message
    for part in expected:
        assert part in message
    assert not list(out.rglob("*.parquet"))


def test_error_lines_count_the_header(tmp_path: Path) -> None:
    lines = CSV.read_text().splitlines()
    bad_hex, short = list(lines), list(lines)
    bad_hex[5] = lines[5].replace("05db9164", "zz12", 1)  # data row 5
    short[9] = lines[9].rsplit(",", 1)[0]  # data row 9
    for name, text in (("hex.txt", bad_hex), ("short.txt", short)):
        (tmp_path / name).write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match=r"line 6 \(data row 5\), column 'C1': .*'zz12'"):
        convert_criteo(tmp_path / "hex.txt", tmp_path / "out")
    with pytest.raises(ValueError, match=r"line 10 \(data row 9\): expected 40 fields, got 39"):
        convert_criteo(tmp_path / "short.txt", tmp_path / "out")


def test_earliest_bad_row_is_reported(tmp_path: Path) -> None:
    rows = _text_rows()
    rows[20][14] = "zz"  # line 21, C1
    rows[10][30] = "yy"  # line 11, C17: earlier, in a later column
    bad = tmp_path / "bad.tsv"
    bad.write_text("".join("\t".join(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"line 11, column 'C17'"):
        convert_criteo(bad, tmp_path / "out")


def test_refuses_a_non_empty_output(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="not empty"):
        convert_criteo(TSV, tmp_path / "out")


def test_wrong_header_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text(CSV.read_text().replace("I13,C1", "I13,X1", 1))
    with pytest.raises(ValueError, match=r"bad.txt, line 1: header"):
        convert_criteo(bad, tmp_path / "out")


def test_converted_log_meets_the_criteo_contract(tmp_path: Path) -> None:
    convert_criteo(TSV, tmp_path / "out", rows_per_day=80)
    features = load_config(REPO / "conf" / "criteo.yaml").features
    assert sum(t.num_rows for t in read_validated(tmp_path / "out", features)) == 200


def test_cli_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    main(["convert", "criteo", str(TSV), "--out", str(out), "--rows-per-day", "100", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert (summary["rows"], summary["days"]) == (200, 2)
    assert summary["rows_per_s"] > 0
