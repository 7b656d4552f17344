"""The CSV / TSV converter: a spec's columns come back with the text's values (IDs as
integers or as `string_id` hashes), rows land in the UTC day of their timestamp, and a bad
cell, a wrong field count or a spec mistake is named by file, line and column or key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipelines.cli import main
from recsys.config import ConfigError, FeaturesConfig
from recsys.contract import BadInputError
from recsys.convert.criteo import timestamps
from recsys.convert.csv_spec import (
    encode_ids,
    load_spec,
    spec_from_dict,
    spec_from_options,
    string_id,
    string_ids,
)
from recsys.convert.delimited import convert_csv
from recsys.logs import read_validated
from tests.helpers import read_log, write_text

DAY = 1_767_225_600  # 2026-01-01 00:00:00 UTC

CSV = f"""\
click,ts,user,price,history,city,note
1,{DAY + 86_400 + 5},42,1.5,1|2|3,paris,x
0,{DAY + 10},u7,,,"new york",y
1,{DAY + 20},0042,2,9,,z
0,{DAY + 86_400},-3,0.25,7|abc,paris,"quoted, with a comma"
"""

SPEC = """\
label: click
timestamp: ts
columns:
  user: categorical
  price: numeric
  history: {type: sequence, separator: "|"}
  city: {type: categorical, ids: hash}
  note: skip
"""


def test_spec_round_trip_by_utc_day(tmp_path: Path) -> None:
    spec = load_spec(write_text(tmp_path / "spec.yaml", SPEC))
    summary = convert_csv(write_text(tmp_path / "log.csv", CSV), tmp_path / "out", spec)
    assert sorted(p.name for p in (tmp_path / "out").glob("day=*")) == [
        "day=2026-01-01",
        "day=2026-01-02",
    ]
    assert summary["day_rows"] == {"2026-01-01": 2, "2026-01-02": 2}
    table = read_log(tmp_path / "out")
    assert table.schema == pa.schema(
        [
            ("label", pa.int8()),
            ("timestamp", pa.int64()),
            ("user", pa.int64()),
            ("price", pa.float32()),
            ("history", pa.list_(pa.int64())),
            ("city", pa.int64()),
        ]
    )
    # Day 1 first, each day in input order.
    assert table.to_pydict() == {
        "label": [0, 1, 1, 0],
        "timestamp": [DAY + 10, DAY + 20, DAY + 86_405, DAY + 86_400],
        "user": [string_id("u7"), 42, 42, -3],
        "price": [None, 2.0, 1.5, 0.25],
        "history": [[], [9], [1, 2, 3], [7, string_id("abc")]],
        "city": [string_id("new york"), None, string_id("paris"), string_id("paris")],
    }
    assert summary["nulls"]["city"] == 1 and summary["nulls"]["price"] == 1


def test_headerless_tsv_with_derived_timestamps(tmp_path: Path) -> None:
    text = "1\ta\t0.5\n0\tb\t1.5\n1\ta\t2.5\n"
    spec = spec_from_dict(
        {
            "label": "y",
            "header": False,
            "names": ["y", "item", "x"],
            "columns": {"item": "categorical", "x": "numeric"},
        }
    )
    summary = convert_csv(
        write_text(tmp_path / "log.tsv", text), tmp_path / "out", spec, rows_per_day=2
    )
    assert summary["layout"] == "tab-separated"
    table = read_log(tmp_path / "out")
    assert table.column("timestamp").to_pylist() == timestamps(0, 3, 2).to_pylist()
    assert table.column("item").to_pylist() == [string_id("a"), string_id("b"), string_id("a")]
    assert table.column("x").to_pylist() == [0.5, 1.5, 2.5]
    assert summary["day_rows"] == {"2026-01-01": 2, "2026-01-02": 1}


def test_string_ids_match_the_python_reference() -> None:
    rng = np.random.default_rng(0)
    words = ["", "a", "paris", "new york", "naïve", "東京", "x" * 300]
    words += ["".join(chr(c) for c in rng.integers(32, 0x2FF, n)) for n in rng.integers(0, 40, 200)]
    ids = string_ids(pa.array(words))
    assert ids.tolist() == [string_id(w) for w in words]
    assert (ids >= 0).all()
    assert len(set(ids.tolist())) == len(set(words))


def test_id_modes() -> None:
    text = pa.array(["42", "042", "-7", "9223372036854775807", "9223372036854775808", None, "x"])
    auto = encode_ids(text).to_pylist()
    assert auto[:4] == [42, 42, -7, 2**63 - 1]
    assert auto[4] == string_id("9223372036854775808")  # past int64: a string, hashed
    assert auto[5] is None and auto[6] == string_id("x")
    hashed = encode_ids(text, "hash").to_pylist()
    assert hashed[0] != hashed[1] and hashed[0] == string_id("42")
    with pytest.raises(ValueError, match="not an integer"):
        encode_ids(text, "int")
    assert encode_ids(pa.array(["1", None, "2"]), "int").to_pylist() == [1, None, 2]


def test_converted_log_meets_the_contract(tmp_path: Path) -> None:
    spec = load_spec(write_text(tmp_path / "spec.yaml", SPEC))
    convert_csv(write_text(tmp_path / "log.csv", CSV), tmp_path / "out", spec)
    features = FeaturesConfig.model_validate(
        {
            "user_id": None,
            "dense": [{"name": "price", "fill_null": 0.0}],
            "sparse": [
                {"name": "user", "allow_negative": True},
                {"name": "history", "multi_valued": True},
                {"name": "city", "allow_null": True},
            ],
        }
    )
    assert sum(t.num_rows for t in read_validated(tmp_path / "out", features)) == 4


@pytest.mark.parametrize(
    ("line", "replacement", "message"),
    [
        (3, f"2,{DAY},u7,,,x,y", r"log\.csv, line 3 \(data row 2\), column 'label': label must "),
        (4, "1,soon,42,2,9,,z", r"line 4 \(data row 3\), column 'timestamp': not a time in Unix"),
        (2, f"1,{DAY},42,cheap,1,paris,x", r"line 2 .*, column 'price': not a finite number"),
        (5, f"0,{DAY},1,1,7||8,paris,x", r"line 5 .*, column 'history': not IDs separated by '\|'"),
        (4, f"1,{DAY},42,2,9,z", r"log\.csv, line 4: expected 7 fields, got 6"),
        (3, f",{DAY},42,2,9,,z", r"line 3 .*, column 'label': label must be 0 or 1, got missing"),
    ],
)
def test_bad_cell_names_file_line_and_column(
    tmp_path: Path, line: int, replacement: str, message: str
) -> None:
    rows = CSV.splitlines()
    rows[line - 1] = replacement
    bad = write_text(tmp_path / "log.csv", "\n".join(rows) + "\n")
    with pytest.raises(BadInputError, match=message):
        convert_csv(bad, tmp_path / "out", load_spec(write_text(tmp_path / "s.yaml", SPEC)))
    assert not (tmp_path / "out").exists()


def test_integer_ids_refuse_text(tmp_path: Path) -> None:
    spec = spec_from_dict(
        {"label": "y", "columns": {"item": {"type": "categorical", "ids": "int"}}}
    )
    with pytest.raises(
        BadInputError, match=r"line 3 .*, column 'item': not one of the integer IDs, got 'five'"
    ):
        convert_csv(write_text(tmp_path / "a.csv", "y,item\n1,5\n0,five\n"), tmp_path / "out", spec)


def test_every_file_column_must_be_declared(tmp_path: Path) -> None:
    spec = spec_from_dict({"label": "y", "columns": {"item": "categorical"}})
    with pytest.raises(BadInputError, match=r"column\(s\) \['extra'\] are not in the spec"):
        convert_csv(write_text(tmp_path / "a.csv", "y,item,extra\n1,5,6\n"), tmp_path / "out", spec)
    with pytest.raises(BadInputError, match=r"no column\(s\) \['item'\]"):
        convert_csv(write_text(tmp_path / "b.csv", "y,other\n1,5\n"), tmp_path / "out", spec)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            {"label": "y", "columns": {"h": "sequence"}},
            "columns.h: a sequence column needs a separator",
        ),
        ({"label": "y", "columns": {"x": {"type": "numeric", "ids": "hash"}}}, "ids is only for"),
        ({"label": "y", "columns": {"x": "text"}}, "columns.x"),
        ({"label": "y", "header": False, "columns": {}}, "give names"),
        ({"label": "y", "columns": {"y": "numeric"}}, "'y' is the label or timestamp"),
        ({"label": "y", "colums": {}}, "colums"),
    ],
)
def test_spec_errors_name_the_key(doc: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        spec_from_dict(doc, "spec.yaml")


def test_json_spec_and_options_give_the_same_spec(tmp_path: Path) -> None:
    doc = {
        "label": "click",
        "timestamp": "ts",
        "columns": {"user": "categorical", "price": "numeric"},
    }
    from_json = load_spec(write_text(tmp_path / "s.json", json.dumps(doc)))
    from_options = spec_from_options("click", "ts", categorical=["user"], numeric=["price"])
    assert from_json == from_options
    with pytest.raises(ConfigError, match="NAME=SEPARATOR"):
        spec_from_options("click", sequence=["history"])


def test_cli_convert_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = str(write_text(tmp_path / "log.csv", CSV))
    main(
        [
            "convert",
            "csv",
            log,
            "--out",
            str(tmp_path / "a"),
            "--spec",
            str(write_text(tmp_path / "s.yaml", SPEC)),
            "--json",
        ]
    )
    assert json.loads(capsys.readouterr().out)["rows"] == 4
    options = ["--label", "click", "--timestamp", "ts", "--categorical", "user,city"]
    options += ["--numeric", "price", "--sequence", "history=|", "--skip", "note"]
    main(["convert", "csv", log, "--out", str(tmp_path / "b"), *options])
    capsys.readouterr()
    by_spec, by_options = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert by_options.select(by_spec.column_names).equals(by_spec)
    with pytest.raises(SystemExit):
        main(["convert", "csv", log, "--out", str(tmp_path / "c")])
    assert "--spec FILE or at least --label" in capsys.readouterr().err
