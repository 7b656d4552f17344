"""The libsvm / libfm converters: tokens become the documented columns with the values of
the text, timestamps and days follow the row position as for Criteo, blocks split lines
nowhere, and a malformed line is named by its number with nothing left behind."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipelines.cli import main
from recsys.config import FeaturesConfig
from recsys.contract import BadInputError
from recsys.convert import libsvm_reader
from recsys.convert.criteo import DAY0, timestamps
from recsys.convert.libsvm import convert_libfm, convert_libsvm, parse_indices
from recsys.logs import read_validated
from tests.helpers import read_log, write_text

LIBSVM = """\
1 1:0.5 3:2 100:1 205:1
-1 3:1.5 101:1 200:1
0 1:7 102:1 201:1
+1 100:1 207:1
"""

LIBFM = """\
1 0:5:1 1:17:1 2:3:0.25
0 0:6:1 1:17:1 1:18:1
-1 2:3:1.5
1.0 1:19:1 0:5:1
"""


def test_libsvm_positional_round_trip(tmp_path: Path) -> None:
    summary = convert_libsvm(
        write_text(tmp_path / "a.svm", LIBSVM), tmp_path / "out", numeric=[1, 3]
    )
    table = read_log(tmp_path / "out")
    assert table.schema.names == ["label", "timestamp", "x1", "x3", "f1", "f2"]
    assert [str(t) for t in table.schema.types] == ["int8", "int64", "float", "float"] + [
        "int64"
    ] * 2
    assert table.drop_columns(["timestamp"]).to_pydict() == {
        "label": [1, 0, 0, 1],
        "x1": [0.5, None, 7.0, None],
        "x3": [2.0, 1.5, None, None],
        "f1": [100, 101, 102, 100],
        "f2": [205, 200, 201, 207],
    }
    # As the Criteo converter derives it: one day, its seconds spread over the rows.
    assert table.column("timestamp").to_pylist() == timestamps(0, 4, 4).to_pylist()
    assert table.column("timestamp")[0].as_py() == DAY0
    assert summary["rows"] == 4 and summary["days"] == 1
    assert json.loads((tmp_path / "out" / "_convert.json").read_text()) == summary


def test_libsvm_bag_layout_and_days(tmp_path: Path) -> None:
    text = "1 7:1\n0 8:1 9:1 10:1\n1\n0 3:0.5 11:1\n"
    out = tmp_path / "out"
    summary = convert_libsvm(
        write_text(tmp_path / "a.svm", text), out, rows_per_day=3, numeric=[3], layout="bag"
    )
    assert sorted(p.name for p in out.glob("day=*")) == ["day=2026-01-01", "day=2026-01-02"]
    assert summary["day_rows"] == {"2026-01-01": 3, "2026-01-02": 1}
    table = read_log(out)
    assert table.column("ids").to_pylist() == [[7], [8, 9, 10], [], [11]]
    assert table.column("x3").to_pylist() == [None, None, None, 0.5]
    assert table.column("timestamp").to_pylist() == timestamps(0, 4, 3).to_pylist()


def test_libfm_fields_numeric_single_and_multi_valued(tmp_path: Path) -> None:
    summary = convert_libfm(
        write_text(tmp_path / "a.ffm", LIBFM), tmp_path / "out", numeric=[2], multi_valued=[9]
    )
    table = read_log(tmp_path / "out")
    assert summary["multi_valued"] == [1, 9]  # field 1 repeats on line 2; 9 was asked for
    assert table.schema.field("f1").type == pa.list_(pa.int64())
    assert table.drop_columns(["timestamp"]).to_pydict() == {
        "label": [1, 0, 0, 1],
        "f2": [0.25, None, 1.5, None],
        "f0": [5, 6, None, 5],
        "f1": [[17], [17, 18], [], [19]],
        "f9": [[], [], [], []],
    }


def test_converted_log_meets_the_contract(tmp_path: Path) -> None:
    convert_libsvm(write_text(tmp_path / "a.svm", LIBSVM), tmp_path / "out", numeric=[1, 3])
    features = FeaturesConfig.model_validate(
        {
            "user_id": None,
            "dense": [{"name": "x1", "fill_null": 0.0}, {"name": "x3", "fill_null": 0.0}],
            "sparse": ["f1", "f2"],
        }
    )
    assert sum(t.num_rows for t in read_validated(tmp_path / "out", features)) == 4


def test_blocks_split_no_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    labels, xs, ids = rng.integers(0, 2, 300), rng.random(300), rng.integers(100, 999, 300)
    lines = [f"{labels[k]} 1:{xs[k]:.3f} 42:1 {ids[k]}:1" for k in range(300)]
    path = write_text(tmp_path / "a.svm", "\n".join(lines))  # no newline after the last line
    convert_libsvm(path, tmp_path / "whole", numeric=[1])
    monkeypatch.setattr(libsvm_reader, "LINE_BLOCK_BYTES", 37)  # blocks end inside lines
    convert_libsvm(path, tmp_path / "blocks", numeric=[1])
    whole, blocks = read_log(tmp_path / "whole"), read_log(tmp_path / "blocks")
    assert whole.equals(blocks) and whole.num_rows == 300
    assert whole.column("f2").to_pylist() == [int(x.split()[3][:-2]) for x in lines]
    lines[276] = lines[276].replace(":1", ":2", 1)
    bad = write_text(tmp_path / "bad.svm", "\n".join(lines))
    with pytest.raises(BadInputError, match=r"bad\.svm, line 277: value 2 of the one-hot ID 42"):
        convert_libsvm(bad, tmp_path / "bad", numeric=[1])
    assert not (tmp_path / "bad").exists()


def test_gzip_input_gives_the_same_log(tmp_path: Path) -> None:
    plain = write_text(tmp_path / "a.svm", LIBSVM)
    packed = tmp_path / "a.svm.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    convert_libsvm(plain, tmp_path / "plain", numeric=[1, 3])
    convert_libsvm(packed, tmp_path / "packed", numeric=[1, 3])
    assert read_log(tmp_path / "plain").equals(read_log(tmp_path / "packed"))


@pytest.mark.parametrize(
    ("text", "options", "message"),
    [
        ("1 5:1\n\n0 5:1\n", {}, "line 2: empty line"),
        ("1 5:1\n2 5:1\n", {}, "line 2: label '2' is not 0 or 1"),
        ("1 5:1\n0 5:1\nyes 5:1\n", {}, "line 3: label 'yes'"),
        ("1 5:1\n0 5:1:1\n", {}, "line 2: token '5:1:1' is not index:value"),
        ("1 5:1\n0 x:1\n", {}, "line 2: index in 'x:1' is not a non-negative integer"),
        ("1 5:1\n0 -5:1\n", {}, "line 2: index in '-5:1' is not a non-negative integer"),
        ("1 5:1\n0 5:abc\n", {}, "line 2: value in '5:abc' is not a number"),
        ("1 5:1\n0 5:0.5\n", {}, "line 2: value 0.5 of the one-hot ID 5 is not 1"),
        ("1 5:1 6:1\n0 5:1\n", {}, "line 2: 1 IDs where line 1 has 2"),
        ("1 2:1 5:1\n0 2:3 2:4 5:1\n", {"numeric": [2]}, "line 2: index 2 appears twice"),
        ("1 2:1 5:1\n0 2:1e300 5:1\n", {"numeric": [2]}, "line 2: index 2: not finite"),
    ],
)
def test_malformed_libsvm_line_is_named(
    tmp_path: Path, text: str, options: dict, message: str
) -> None:
    with pytest.raises(BadInputError, match=message):
        convert_libsvm(write_text(tmp_path / "bad.svm", text), tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 0:5:1\n0 0:5\n", "line 2: token '0:5' is not field:feature:value"),
        ("1 0:5:1\n0 0:y:1\n", "line 2: feature in '0:y:1' is not a non-negative integer"),
        ("1 0:5:1\n0 1:5:1 0:5:0.5\n", "line 2: value 0.5 of the one-hot ID 5 is not 1"),
    ],
)
def test_malformed_libfm_line_is_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        convert_libfm(write_text(tmp_path / "bad.ffm", text), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_earliest_bad_line_wins(tmp_path: Path) -> None:
    # Line 4's bad index would be found by an earlier check than line 3's bad value.
    text = "1 5:1\n0 5:1\n1 5:7\n0 q:1\n"
    with pytest.raises(BadInputError, match="line 3: value 7"):
        convert_libsvm(write_text(tmp_path / "bad.svm", text), tmp_path / "out")


def test_parse_indices() -> None:
    assert parse_indices("1-3, 7,10-11") == [1, 2, 3, 7, 10, 11]
    assert parse_indices("") == []
    with pytest.raises(ValueError, match="expected indices"):
        parse_indices("1-x")


def test_cli_convert_libsvm_and_libfm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    svm = str(write_text(tmp_path / "a.svm", LIBSVM))
    main(
        [
            "convert",
            "libsvm",
            svm,
            "--out",
            str(tmp_path / "s"),
            "--numeric",
            "1,3",
            "--rows-per-day",
            "2",
            "--json",
        ]
    )
    assert json.loads(capsys.readouterr().out)["days"] == 2
    libfm = str(write_text(tmp_path / "a.ffm", LIBFM))
    main(["convert", "libfm", libfm, "--out", str(tmp_path / "f"), "--numeric", "2", "--json"])
    assert json.loads(capsys.readouterr().out)["rows"] == 4
    assert read_log(tmp_path / "f").column("f2").to_pylist() == [0.25, None, 1.5, None]
    with pytest.raises(SystemExit):
        main(["convert", "libsvm", str(write_text(tmp_path / "b.svm", "7 1:1\n")), "--out", "x"])
    assert "line 1: label '7'" in capsys.readouterr().err
