"""`recsys train --follow` on a real embedded Ray: a log folder that gains a day at a
time, a follower that is stopped and started again between days, and the exports it
leaves for `recsys serve --follow`.

Three sessions follow one folder: the first trains day 1 and writes a full export
(--max-partitions 1); the second finds day 2 beside a day 3 still being written, trains
day 2 only and writes a delta (--until); the third takes day 3 once its file stops
changing (no marker: the stable rule) and is sent SIGTERM while it trains, so day 4,
complete by then, waits. The references: a plain `train` of days 1-3 in one run (one
worker, no shuffle, days of whole batches: the follower's batches are its batches, so the
weights must be equal bit for bit), and a full export of the follower's last checkpoint
(what the delta chain must serve).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from pipelines.build import load_trained
from pipelines.cli import main
from pipelines.export.writer import export
from pipelines.train.driver import train
from pipelines.train.follow import STATE_FILE, follow
from recsys.config import ConfigError, ExperimentConfig, config_from_dict
from recsys.serving.model import ServingModel, load_tables

DAY = 86_400
DAY0 = 1_767_225_600  # 2026-01-01 00:00 UTC
BATCH = 128
ROWS = 4 * BATCH  # a day: whole batches
STEPS_PER_DAY = ROWS // BATCH


def _config(tmp: Path, name: str, log: Path, *extra: tuple[str, object]) -> ExperimentConfig:
    collisionless = {"variant": "collisionless", "capacity": 256, "embedding_dim": 8}
    doc: dict = {
        "name": name,
        "data": {"train": str(log), "valid_days": 0, "shuffle_buffer": 0},
        "features": {
            "dense": ["d0", "d1"],
            "sparse": ["a", {"name": "b", "multi_valued": True}, "c", "user_id"],
        },
        "tables": [
            # a's IDs drift by day: yesterday's expire (ttl), so a delta deletes them
            {**collisionless, "features": ["a"], "ttl": DAY // 2, "evict_every": DAY // 8},
            {**collisionless, "features": ["b"], "min_count": 2},
            {
                "features": ["c", "user_id"],
                "variant": "hash",
                "num_embeddings": 64,
                "embedding_dim": 8,
            },
        ],
        "model": {"name": "dlrm", "dense_arch": [16, 8], "over_arch": [16]},
        "train": {
            "workers": 1,
            "batch_size": BATCH,
            "log_every": 2,
            "run_dir": str(tmp / "runs"),
            "follow": {"poll_s": 0.3, "export_every_s": 0, "export_dir": str(tmp / "serve")},
        },
    }
    for key, value in extra:
        section, field = key.split(".")
        doc[section][field] = value
    return config_from_dict(doc)


def _day(day: int) -> pa.Table:
    """Day `day` (1-based): time-sorted events across the day, a's IDs new each day."""
    rng = np.random.default_rng(day)
    ts = DAY0 + (day - 1) * DAY + np.sort(rng.integers(0, DAY, ROWS))
    b = [rng.integers(0, 60, rng.integers(0, 4)).tolist() for _ in range(ROWS)]
    return pa.table(
        {
            "label": pa.array(rng.integers(0, 2, ROWS), pa.int8()),
            "timestamp": pa.array(ts, pa.int64()),
            "user_id": pa.array(rng.integers(0, 50, ROWS), pa.int64()),
            "d0": pa.array(rng.normal(size=ROWS), pa.float32()),
            "d1": pa.array(rng.normal(size=ROWS), pa.float32()),
            "a": pa.array(rng.integers(day * 100, day * 100 + 80, ROWS), pa.int64()),
            "b": pa.array(b, pa.list_(pa.int64())),
            "c": pa.array(rng.integers(0, 1000, ROWS), pa.int64()),
        }
    )


def _write_day(log: Path, day: int, marker: bool = True, cut: bool = False) -> Path:
    """Day `day` as a Hive partition; `cut` writes only the first half of its file (a
    writer still at work), `marker` adds `_SUCCESS`."""
    folder = log / f"day=2026-01-{day:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    sink = pa.BufferOutputStream()
    pq.write_table(_day(day), sink)
    data = sink.getvalue().to_pybytes()
    (folder / "part-0.parquet").write_bytes(data[: len(data) // 2] if cut else data)
    if marker:
        (folder / "_SUCCESS").touch()
    return folder


def _state(tmp: Path) -> dict:
    return json.loads((tmp / "runs" / "online" / STATE_FILE).read_text())


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("follow")
    log = tmp / "log"
    log.mkdir()
    cfg = _config(tmp, "online", log)
    try:
        _write_day(log, 1)
        first = follow(cfg, log, max_partitions=1)

        _write_day(log, 2)
        _write_day(log, 3, marker=False, cut=True)
        second = follow(cfg, log, until=DAY0 + DAY)  # stops after the day reaching day 2
        after_second = _state(tmp)

        _write_day(log, 3, marker=False)  # now whole; no marker: taken once it stays so

        def stop_while_day3_trains() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                training = _state(tmp)["training"]
                if training is not None and training["name"] == "day=2026-01-03":
                    _write_day(log, 4)  # complete, but the follower is asked to stop
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
                time.sleep(0.05)

        killer = threading.Thread(target=stop_while_day3_trains)
        killer.start()
        third = follow(cfg, log)
        killer.join()

        reference_log = tmp / "reference_log"
        for day in (1, 2, 3):
            shutil.copytree(
                log / f"day=2026-01-{day:02d}", reference_log / f"day=2026-01-{day:02d}"
            )
        reference = train(_config(tmp, "plain", reference_log))
        yield {
            "tmp": tmp,
            "cfg": cfg,
            "sessions": (first, second, third),
            "after_second": after_second,
            "reference": reference,
        }
    finally:
        ray.shutdown()


def test_each_session_trains_only_partitions_it_has_not_trained(sessions: dict) -> None:
    first, second, third = sessions["sessions"]
    assert first["partitions_trained"] == ["day=2026-01-01"]
    assert first["stopped_by"] == "--max-partitions 1"
    # the restarted follower does not read day 1 again, and leaves half-written day 3
    assert second["partitions_trained"] == ["day=2026-01-02"]
    assert second["stopped_by"].startswith("--until")
    assert "day=2026-01-03" in second["waiting"]
    assert [p["name"] for p in sessions["after_second"]["trained"]] == [
        "day=2026-01-01",
        "day=2026-01-02",
    ]
    # SIGTERM while day 3 trains: day 3 finishes and is exported, day 4 is not started
    assert third["partitions_trained"] == ["day=2026-01-03"] and third["stopped_by"] == "signal"
    state = _state(sessions["tmp"])
    assert state["training"] is None
    steps = [p["steps"] for p in state["trained"]]
    assert steps == [[d * STEPS_PER_DAY, (d + 1) * STEPS_PER_DAY] for d in range(3)]
    assert [p["rows"] for p in state["trained"]] == [ROWS] * 3
    day1 = state["trained"][0]
    assert day1["first_event"] == _day(1)["timestamp"][0].as_py()
    assert day1["last_event"] == _day(1)["timestamp"][-1].as_py()


def test_followed_weights_equal_one_plain_run_over_the_same_days(sessions: dict) -> None:
    run = Path(sessions["sessions"][2]["run_dir"])
    _, followed, progress = load_trained(run, newest=True)
    _, plain, plain_progress = load_trained(sessions["reference"]["run_dir"], newest=True)
    assert progress["step"] == plain_progress["step"] == 3 * STEPS_PER_DAY
    got, want = followed.state_dict(), plain.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    for name in ("a", "b"):  # the same live IDs, in the same rows
        mine, theirs = followed.sparse.transforms[name], plain.sparse.transforms[name]
        assert torch.equal(mine.live_rows()[0], theirs.live_rows()[0])


def test_the_delta_chain_serves_what_a_full_export_of_the_same_step_serves(
    sessions: dict,
) -> None:
    tmp = sessions["tmp"]
    exports = sessions["sessions"][2]["exports"]
    assert [Path(e).name for e in exports] == [f"step{s * STEPS_PER_DAY:08d}" for s in (1, 2, 3)]
    manifests = [json.loads((Path(e) / "manifest.json").read_text()) for e in exports]
    assert "base" not in manifests[0]
    assert manifests[1]["base"] == manifests[2]["base"] == exports[0]  # deltas over the full
    deleted = {t["name"]: t.get("deleted", 0) for t in manifests[2]["tables"]}
    assert deleted["a"] > 0  # day 1's and day 2's IDs of a expired
    full = tmp / "full"
    export(Path(sessions["sessions"][2]["run_dir"]), full, newest=True)
    served, reference = load_tables(exports[-1]), load_tables(full)
    assert served.keys() == reference.keys()
    for name in reference:
        assert torch.equal(served[name].ids, reference[name].ids), name
        assert torch.equal(served[name].weights, reference[name].weights), name
    traffic = pa.concat_tables([_day(3), _day(4)]).drop_columns(["label"])
    probs = ServingModel(exports[-1]).predict_table(traffic)
    assert probs.std() > 1e-4
    np.testing.assert_array_equal(probs, ServingModel(full).predict_table(traffic))


def test_a_trained_partition_that_changes_stops_the_follower(sessions: dict) -> None:
    tmp, cfg = sessions["tmp"], sessions["cfg"]
    day2 = tmp / "log" / "day=2026-01-02"
    extra = day2 / "part-1.parquet"
    pq.write_table(_day(5), extra)
    try:
        with pytest.raises(ValueError, match=r"part-1.parquet appeared.*never reads rows twice"):
            follow(cfg, tmp / "log", max_partitions=1)
    finally:
        extra.unlink()


def test_a_marked_partition_that_does_not_read_fails_naming_the_file(sessions: dict) -> None:
    tmp, cfg = sessions["tmp"], sessions["cfg"]
    folder = tmp / "log" / "day=2026-01-04"
    (folder / "part-0.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(ValueError, match=r"day=2026-01-04/part-0.parquet: not a readable Parquet"):
        follow(cfg, tmp / "log", max_partitions=1)
    assert _state(tmp)["training"] is None  # nothing of it was taken


def test_follow_refuses_what_a_growing_log_cannot_hold(
    tmp_path: Path, repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "log"
    log.mkdir()
    held_out = _config(tmp_path, "x", log, ("data.valid_days", 1))
    with pytest.raises(ConfigError, match=r"data\.valid_days"):
        follow(held_out, log)
    with pytest.raises(ConfigError, match=r"train\.patience"):
        patient = _config(
            tmp_path,
            "x",
            log,
            ("data.valid_days", 1),
            ("data.valid", str(log)),
            ("train.patience", 2),
        )
        follow(patient, log)
    with pytest.raises(SystemExit):
        main(
            [
                "train",
                str(repo / "conf" / "demo_collisionless.yaml"),
                "--follow",
                str(log),
                "--until",
                "soon",
            ]
        )
    assert "--until 'soon'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    usage = capsys.readouterr().out
    assert "--follow DIR" in usage and "--max-partitions" in usage
