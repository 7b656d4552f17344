"""The MovieLens builder on a tiny wheel-shaped zip (nothing is downloaded): clicks are
ratings >= 4, side features and genres are as documented, histories hold only strictly
earlier ratings in time order, rows land in their UTC day, and the conf files read both
logs."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from pipelines.cli import main
from recsys.config import load_config
from recsys.contract import BadInputError
from recsys.convert.csv_spec import string_id
from recsys.convert.movielens import (
    CTR_SCHEMA,
    MEMBERS,
    SEQUENCE_SCHEMA,
    WHEEL,
    build_movielens,
    cache_dir,
    fetch_wheel,
)
from recsys.logs import read_validated
from tests.helpers import read_log

REPO = Path(__file__).resolve().parents[2]
T0 = 874_713_600 + 3_600  # 1997-09-20 01:00:00 UTC

USERS = """\
user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token
1\t24\tM\ttechnician\t85711
2\t53\tF\tother\t94043
3\t15\tM\tstudent\tT8H1N
"""
ITEMS = """\
item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq
10\tToy Story\t1995\tAnimation Children's Comedy
20\tGoldenEye\t1995\tAction Adventure Thriller
30\tunkonwn\tunkonwn\tunknown
40\tNo Genres\t1990\t
"""
# (user, item, rating, time) in file order: ties within users 1 and 2, three UTC days.
RATINGS = [
    (1, 10, 5, T0 + 100),
    (1, 20, 3, T0 + 50),
    (1, 30, 4, T0 + 100),
    (2, 10, 2, T0 + 86_400),
    (1, 40, 1, T0 + 86_407),
    (3, 20, 4, T0 + 10),
    (2, 30, 5, T0 + 86_400),
    (1, 10, 4, T0 + 200_000),
]


def _inter(rows: list[tuple[int, int, int, int]]) -> str:
    header = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    return header + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows)


def _wheel(path: Path, inter: str | None = None, users: str = USERS) -> Path:
    """A zip shaped like the recbole wheel: the three atomic files under MEMBERS."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("recbole/__init__.py", "")
        z.writestr(MEMBERS + "inter", inter if inter is not None else _inter(RATINGS))
        z.writestr(MEMBERS + "user", users)
        z.writestr(MEMBERS + "item", ITEMS)
    return path


@pytest.fixture
def built(tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "ml"
    return out, build_movielens(_wheel(tmp_path / WHEEL), out)


def test_ctr_log_labels_side_features_and_days(built: tuple[Path, dict]) -> None:
    out, summary = built
    assert sorted(p.name for p in (out / "ctr").glob("day=*")) == [
        "day=1997-09-20",
        "day=1997-09-21",
        "day=1997-09-22",
    ]
    table = read_log(out / "ctr")
    assert table.schema == CTR_SCHEMA
    g = {name: string_id(name) for name in ("Animation", "Children's", "Comedy", "Action")}
    g |= {name: string_id(name) for name in ("Adventure", "Thriller", "unknown")}
    toy, goldeneye = (
        [g["Animation"], g["Children's"], g["Comedy"]],
        [g["Action"], g["Adventure"], g["Thriller"]],
    )
    # Time order, ties in file order: file rows 6, 2, 1, 3, 4, 7, 5, 8.
    assert table.to_pydict() == {
        "label": [1, 0, 1, 1, 0, 1, 0, 1],
        "timestamp": [
            T0 + 10,
            T0 + 50,
            T0 + 100,
            T0 + 100,
            T0 + 86_400,
            T0 + 86_400,
            T0 + 86_407,
            T0 + 200_000,
        ],
        "user_id": [3, 1, 1, 1, 2, 2, 1, 1],
        "item_id": [20, 20, 10, 30, 10, 30, 40, 10],
        "age_bucket": [1, 18, 18, 18, 50, 50, 18, 18],
        "gender": [string_id("M")] * 4 + [string_id("F")] * 2 + [string_id("M")] * 2,
        "occupation": [
            string_id(o)
            for o in ["student", *["technician"] * 3, "other", "other", "technician", "technician"]
        ],
        "zip_prefix": [string_id("T8H"), 857, 857, 857, 940, 940, 857, 857],
        "release_year": [1995, 1995, 1995, None, 1995, None, 1990, 1995],
        "genres": [goldeneye, goldeneye, toy, [g["unknown"]], toy, [g["unknown"]], [], toy],
    }
    assert summary["ratings"] == 8 and summary["users"] == 3 and summary["items"] == 4
    assert summary["click_rate"] == 0.625
    assert (summary["first_day"], summary["last_day"], summary["days"]) == (
        "1997-09-20",
        "1997-09-22",
        3,
    )
    assert json.loads((out / "_convert.json").read_text()) == summary


def test_sequence_log_histories_are_strictly_earlier_and_in_order(built: tuple[Path, dict]) -> None:
    out, _ = built
    table = read_log(out / "sequence")
    assert table.schema == SEQUENCE_SCHEMA
    assert table.drop_columns([f.name for f in SEQUENCE_SCHEMA][4:]).equals(
        read_log(out / "ctr").select(["label", "timestamp", "user_id", "item_id"])
    )
    rows = table.to_pydict()
    assert rows["hist_item_id"] == [[], [], [20], [20], [], [], [20, 10, 30], [20, 10, 30, 40]]
    assert rows["hist_timestamp"][6] == [T0 + 50, T0 + 100, T0 + 100]
    for times, now in zip(rows["hist_timestamp"], rows["timestamp"], strict=True):
        assert all(t < now for t in times) and times == sorted(times)
    unknown, animation, action = string_id("unknown"), string_id("Animation"), string_id("Action")
    # An item's category is its first genre; no genres reads as ML's own "unknown".
    assert rows["category_id"] == [
        action,
        action,
        animation,
        unknown,
        animation,
        unknown,
        unknown,
        animation,
    ]
    assert rows["hist_category_id"][7] == [action, animation, unknown, unknown]


def test_max_history_keeps_the_most_recent(tmp_path: Path) -> None:
    out = tmp_path / "ml"
    summary = build_movielens(_wheel(tmp_path / WHEEL), out, max_history=2)
    rows = read_log(out / "sequence").to_pydict()
    assert rows["hist_item_id"][6:] == [[10, 30], [30, 40]]
    assert summary["max_history"] == 2


def test_conf_files_read_the_logs(built: tuple[Path, dict]) -> None:
    out, _ = built
    for name, log in (("movielens_ctr", "ctr"), ("movielens_sequence", "sequence")):
        cfg = load_config(REPO / "conf" / f"{name}.yaml")
        assert cfg.data.train == f"out/movielens/{log}"
        assert sum(t.num_rows for t in read_validated(out / log, cfg.features)) == 8
    assert load_config(REPO / "conf" / "movielens_sequence.yaml").model.name == "din"


def test_unknown_user_is_named_and_nothing_is_left(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / WHEEL, inter=_inter([*RATINGS[:2], (9, 10, 4, T0)]))
    with pytest.raises(BadInputError, match=r"ml-100k\.inter, line 4: user_id 9 is not in"):
        build_movielens(wheel, tmp_path / "ml")
    assert not (tmp_path / "ml").exists()


def test_bad_cell_and_missing_field_are_named(tmp_path: Path) -> None:
    bad_rating = _inter(RATINGS).replace("\t3\t", "\tthree\t")
    with pytest.raises(BadInputError, match=r"inter, line 3, column 'rating': not a number"):
        build_movielens(_wheel(tmp_path / WHEEL, inter=bad_rating), tmp_path / "ml")
    users = USERS.replace("zip_code:token", "postcode:token")
    with pytest.raises(BadInputError, match=r"user, line 1: no field\(s\) \['zip_code'\]"):
        build_movielens(_wheel(tmp_path / "w2.whl", users=users), tmp_path / "ml")
    assert not (tmp_path / "ml").exists()


def test_cache_and_hash_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    (tmp_path / "cache").mkdir()
    _wheel(tmp_path / "cache" / WHEEL)
    with pytest.raises(ValueError, match=r"SHA-256 \w+ is not that of recbole==1\.2\.1"):
        fetch_wheel()  # a cached file that is not the release is refused, not read


def test_cli_convert_movielens(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wheel = _wheel(tmp_path / WHEEL)
    main(["convert", "movielens", "--out", str(tmp_path / "ml"), "--wheel", str(wheel), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["ratings"] == 8 and summary["sequence"]["rows"] == 8
