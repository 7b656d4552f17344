"""MovieLens-100K as a CTR log and a sequence log, fetched at run time, never committed.

The ratings come from the PyPI wheel `recbole==1.2.1`, which ships ML-100K as RecBole
"atomic files" (`recbole/dataset_example/ml-100k/ml-100k.{inter,user,item}`: tab-separated,
a header of `name:type` fields): `pip download recbole==1.2.1 --no-deps` into the cache
($RECSYS_CACHE, else ~/.cache/recsys), checked against the wheel's SHA-256, and the members
read straight from the zip. A wheel is an immutable, hash-pinned release on a registry
every Python machine reaches, which the GroupLens site is not.

Both logs have one row per rating, in time order (ties in file order), Hive-partitioned by
the UTC day of the rating (`day=YYYY-MM-DD`, 1997-09-20 .. 1998-04-22):

- `label` int8: 1 if the rating is >= 4 (a "click"), else 0; `timestamp` int64 Unix s;
- `user_id`, `item_id` int64 (ML's own integer IDs);
- user side features, int64: `age_bucket` (MovieLens-1M's groups, named by their lowest
  age: 1 = under 18, 18, 25, 35, 45, 50, 56 = 56 and over), `gender` and `occupation`
  (hashed strings), `zip_prefix` (the first 3 characters, an integer where they are
  digits, else hashed: ML-100K has Canadian codes);
- item side features: `release_year` int64 (null for the 2 items whose year ML writes as
  "unkonwn" / "V"), `genres` list<int64> (hashed genre names, in ML's order).

The sequence log adds `category_id` int64 (the item's first genre: sequence models need one
category per item, and ML lists the main one first) and, aligned, `hist_item_id`,
`hist_category_id`, `hist_timestamp` list<int64>: the user's ratings with a strictly
earlier timestamp (ratings of the same second see each other in neither direction), oldest
first, the most recent `max_history` of them. String IDs are `csv_spec.string_id`. ML-100K
is 100k rows, so the tables are built in memory with numpy; the histories are gathered and
written in chunks, so memory stays bounded by the chunk, not the history lengths.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from recsys.contract import BadInputError
from recsys.convert.cells import convert_columns
from recsys.convert.csv_spec import encode_id_lists, encode_ids, id_list_array, string_id
from recsys.convert.day_log import DayPartitionedLog
from recsys.convert.delimited import convert_timestamp

RECBOLE = "recbole==1.2.1"
WHEEL = "recbole-1.2.1-py3-none-any.whl"
WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
MEMBERS = "recbole/dataset_example/ml-100k/ml-100k."
AGE_EDGES = [18, 25, 35, 45, 50, 56]
AGE_BUCKETS = np.array([1, *AGE_EDGES], dtype=np.int64)
ZIP_PREFIX = 3
CLICK_RATING = 4.0
MAX_HISTORY = 200
HISTORY_CHUNK_ROWS = 16_384

CTR_SCHEMA = pa.schema(
    [
        ("label", pa.int8()),
        ("timestamp", pa.int64()),
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("age_bucket", pa.int64()),
        ("gender", pa.int64()),
        ("occupation", pa.int64()),
        ("zip_prefix", pa.int64()),
        ("release_year", pa.int64()),
        ("genres", pa.list_(pa.int64())),
    ]
)
_HISTORY = ["hist_item_id", "hist_category_id", "hist_timestamp"]
SEQUENCE_SCHEMA = pa.schema(
    [
        *CTR_SCHEMA,
        ("category_id", pa.int64()),
        *((name, pa.list_(pa.int64())) for name in _HISTORY),
    ]
)


def cache_dir() -> Path:
    return Path(os.environ.get("RECSYS_CACHE") or Path.home() / ".cache" / "recsys")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(cache: Path | None = None) -> Path:
    """The cached recbole wheel, downloaded with pip on first use and hash-checked."""
    cache = Path(cache) if cache is not None else cache_dir()
    wheel = cache / WHEEL
    if not wheel.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            command = [sys.executable, "-m", "pip", "download", RECBOLE, "--no-deps"]
            command += ["--only-binary", ":all:", "--quiet", "-d", tmp]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode or not (Path(tmp) / WHEEL).is_file():
                raise RuntimeError(f"`{' '.join(command)}` failed:\n{done.stderr[-2000:]}")
            (Path(tmp) / WHEEL).replace(wheel)
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        raise ValueError(
            f"{wheel}: SHA-256 {digest} is not that of {RECBOLE} ({WHEEL_SHA256}); "
            "delete the file to download it again"
        )
    return wheel


class _Member:
    """One atomic file of the wheel: its string columns, and where its lines are."""

    def __init__(self, wheel: zipfile.ZipFile, source: str, name: str, wanted: list[str]) -> None:
        self.where = f"{source}!{MEMBERS}{name}"
        try:
            data = wheel.read(MEMBERS + name)
        except KeyError:
            raise BadInputError(f"{self.where}: not in the wheel") from None
        header = data.split(b"\n", 1)[0].decode("utf-8").rstrip("\r").split("\t")
        names = [h.split(":", 1)[0] for h in header]
        missing = [w for w in wanted if w not in names]
        if missing:
            raise BadInputError(f"{self.where}, line 1: no field(s) {missing} in {header}")
        bad_rows: list[pa_csv.InvalidRow] = []

        def on_invalid(row: pa_csv.InvalidRow) -> str:
            bad_rows.append(row)
            return "error"

        try:
            self.table = pa_csv.read_csv(
                pa.BufferReader(data),
                pa_csv.ReadOptions(column_names=names, skip_rows=1, use_threads=False),
                pa_csv.ParseOptions(
                    delimiter="\t", quote_char=False, invalid_row_handler=on_invalid
                ),
                pa_csv.ConvertOptions(
                    column_types=dict.fromkeys(names, pa.string()),
                    include_columns=wanted,
                    null_values=[""],
                    strings_can_be_null=True,
                ),
            )
        except pa.ArrowInvalid as err:
            line = f", line {bad_rows[0].number}" if bad_rows and bad_rows[0].number else ""
            raise BadInputError(f"{self.where}{line}: {err}") from None

    def line(self, row: int) -> str:
        return f"{self.where}, line {row + 2}"

    def convert(self, converters: dict[str, tuple[Any, str]]) -> dict[str, pa.Array]:
        cells = {name: self.table.column(name) for name in converters}
        return convert_columns(cells, converters, self.line)


def _rating(text: pa.Array) -> pa.Array:
    value = pc.cast(text, pa.float64())
    if value.null_count or not pc.all(pc.is_finite(value), min_count=0).as_py():
        raise ValueError("not a rating")
    return value


def _age_bucket(text: pa.Array) -> pa.Array:
    age = pc.cast(text, pa.int64())
    if age.null_count or pc.min(age).as_py() < 0:
        raise ValueError("not an age")
    return pa.array(AGE_BUCKETS[np.searchsorted(AGE_EDGES, age.to_numpy(), side="right")])


def _zip_prefix(text: pa.Array) -> pa.Array:
    return encode_ids(pc.utf8_slice_codeunits(text, 0, ZIP_PREFIX))


def _year(text: pa.Array) -> pa.Array:
    """A 4-digit year, else null: ML-100K's placeholders are not years."""
    four_digits = pc.fill_null(pc.match_substring_regex(text, r"^[0-9]{4}$"), False)
    return pc.cast(pc.if_else(four_digits, text, pa.scalar(None, pa.string())), pa.int64())


def _index_of(
    keys: pa.Array, table_ids: pa.Array, member: _Member, what: str, other: str
) -> np.ndarray:
    """Row of each key in `table_ids` (unique), or BadInputError at the first key absent."""
    if len(pc.unique(table_ids)) != len(table_ids):
        raise BadInputError(f"{other}: {what} is not unique")
    index = pc.index_in(keys, value_set=table_ids)
    if index.null_count:
        row = int(np.flatnonzero(np.asarray(pc.is_null(index)))[0])
        raise BadInputError(f"{member.line(row)}: {what} {keys[row].as_py()} is not in {other}")
    return index.to_numpy()


def read_movielens(wheel_path: Path) -> tuple[dict[str, pa.Array], dict[str, pa.Array]]:
    """The CTR columns of every rating in file order, and the items' first genres."""
    source = str(wheel_path)
    with zipfile.ZipFile(wheel_path) as wheel:
        inter = _Member(wheel, source, "inter", ["user_id", "item_id", "rating", "timestamp"])
        users = _Member(
            wheel, source, "user", ["user_id", "age", "gender", "occupation", "zip_code"]
        )
        items = _Member(wheel, source, "item", ["item_id", "release_year", "class"])
    ids = (encode_ids, "not an ID")
    hashed = (partial(encode_ids, mode="hash"), "not a token")
    r = inter.convert(
        {
            "user_id": ids,
            "item_id": ids,
            "rating": (_rating, "not a number"),
            "timestamp": (convert_timestamp, "not Unix seconds"),
        }
    )
    u = users.convert(
        {
            "user_id": ids,
            "age": (_age_bucket, "not an age in years"),
            "gender": hashed,
            "occupation": hashed,
            "zip_code": (_zip_prefix, "not a zip code"),
        }
    )
    i = items.convert(
        {
            "item_id": ids,
            "release_year": (_year, "not a year"),
            "class": (partial(encode_id_lists, separator=" ", mode="hash"), "not genres"),
        }
    )
    user_row = _index_of(r["user_id"], u["user_id"], inter, "user_id", users.where)
    item_row = _index_of(r["item_id"], i["item_id"], inter, "item_id", items.where)
    genres = i["class"]
    lengths = np.asarray(pc.list_value_length(genres), dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    padded = np.append(pc.list_flatten(genres).to_numpy(), string_id("unknown"))
    first = np.where(lengths > 0, padded[offsets[:-1]], padded[-1])
    columns = {
        "label": pc.cast(pc.greater_equal(r["rating"], CLICK_RATING), pa.int8()),
        "timestamp": r["timestamp"],
        "user_id": r["user_id"],
        "item_id": r["item_id"],
        "age_bucket": u["age"].take(user_row),
        "gender": u["gender"].take(user_row),
        "occupation": u["occupation"].take(user_row),
        "zip_prefix": u["zip_code"].take(user_row),
        "release_year": i["release_year"].take(item_row),
        "genres": genres.take(item_row),
    }
    return columns, {"category_id": pa.array(first[item_row])}


def histories(
    users: np.ndarray, times: np.ndarray, max_history: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the rows of the same user with a strictly earlier time, oldest first (ties
    in row order), the last `max_history`: (by_user order, start, end) such that row r's
    history is `by_user[start[r]:end[r]]`."""
    n = len(users)
    by_user = np.lexsort((np.arange(n), times, users))
    u, t = users[by_user], times[by_user]
    new_user = np.r_[True, u[1:] != u[:-1]]
    new_time = new_user | np.r_[True, t[1:] != t[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))
    time_start = np.maximum.accumulate(np.where(new_time, np.arange(n), 0))
    start, end = np.empty(n, np.int64), np.empty(n, np.int64)
    start[by_user] = np.maximum(user_start, time_start - max_history)
    end[by_user] = time_start
    return by_user, start, end


def _ragged(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, flat positions) of the ranges [starts[i], ends[i])."""
    lengths = ends - starts
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    return offsets, flat


def build_movielens(
    wheel_path: str | Path, out: str | Path, max_history: int = MAX_HISTORY
) -> dict[str, Any]:
    """Write `out/ctr` and `out/sequence` from a recbole wheel; returns the summary, also in
    `out/_convert.json` (and each log's own in its folder)."""
    started = time.perf_counter()
    wheel_path, out = Path(wheel_path), Path(out)
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: output directory is not empty; remove it or choose another")
    created = not out.exists()
    columns, extra = read_movielens(wheel_path)
    order = np.argsort(columns["timestamp"].to_numpy(), kind="stable")
    ctr = pa.table(columns, schema=CTR_SCHEMA).take(pa.array(order))
    users, times = ctr.column("user_id").to_numpy(), ctr.column("timestamp").to_numpy()
    items = ctr.column("item_id").to_numpy()
    category = extra["category_id"].to_numpy()[order]
    by_user, start, end = histories(users, times, max_history)
    try:
        with (
            DayPartitionedLog(out / "ctr", CTR_SCHEMA) as ctr_log,
            DayPartitionedLog(out / "sequence", SEQUENCE_SCHEMA) as seq_log,
        ):
            ctr_log.write(ctr)
            for lo in range(0, ctr.num_rows, HISTORY_CHUNK_ROWS):
                hi = min(lo + HISTORY_CHUNK_ROWS, ctr.num_rows)
                offsets, flat = _ragged(start[lo:hi], end[lo:hi])
                rows = by_user[flat]
                lists = [id_list_array(offsets, v[rows]) for v in (items, category, times)]
                part = ctr.slice(lo, hi - lo).append_column(
                    "category_id", pa.array(category[lo:hi])
                )
                for name, values in zip(_HISTORY, lists, strict=True):
                    part = part.append_column(name, values)
                seq_log.write(part)
            lengths = end - start
            info = {"input": str(wheel_path), "seconds": round(time.perf_counter() - started, 3)}
            ctr_summary = ctr_log.commit(info)
            seq_summary = seq_log.commit({**info, "max_history": max_history})
    except BaseException:
        # `out` was empty: whatever is in it now is this run's, committed or not.
        for child in out.iterdir() if out.is_dir() else ():
            shutil.rmtree(child)
        if created and out.is_dir():
            out.rmdir()
        raise
    labels = ctr.column("label").to_numpy()
    summary = {
        "input": str(wheel_path),
        "out": str(out),
        "ratings": ctr.num_rows,
        "users": len(np.unique(users)),
        "items": len(np.unique(items)),
        "click_rate": round(float(labels.mean()), 4),
        "days": ctr_summary["days"],
        "first_day": min(ctr_summary["day_rows"]),
        "last_day": max(ctr_summary["day_rows"]),
        "max_history": max_history,
        "mean_history": round(float(lengths.mean()), 1),
        "rows_without_history": int((lengths == 0).sum()),
        "ctr": {k: ctr_summary[k] for k in ("out", "rows", "days", "files")},
        "sequence": {k: seq_summary[k] for k in ("out", "rows", "days", "files")},
        "seconds": round(time.perf_counter() - started, 3),
    }
    (out / "_convert.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def convert_movielens(
    out: str | Path,
    wheel: str | Path | None = None,
    cache: str | Path | None = None,
    max_history: int = MAX_HISTORY,
) -> dict[str, Any]:
    """Fetch (or take) the recbole wheel and build both logs. A `wheel` given here is read
    as it is, without the hash check of the download."""
    path = Path(wheel) if wheel is not None else fetch_wheel(Path(cache) if cache else None)
    summary = build_movielens(path, out, max_history)
    return {**summary, "wheel_sha256": _sha256(path)}
