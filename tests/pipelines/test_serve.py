"""`recsys serve` on a real Ray Serve over loopback HTTP: served probabilities are what
`ServingModel.predict_table` scores on the same rows (JSON, Arrow and Parquet bodies, a
batch of one included); bad input is a 400 naming the column; a followed folder's newer
export (a delta) is swapped in while a client keeps sending, without one request failing;
a corrupt newer export is skipped with the error reported, the old model serving on.

One Serve app for the module, following a folder that the tests add exports to in order.
"""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from ray import serve

from pipelines.cli import main
from pipelines.export.writer import export
from pipelines.serve.app import ServeSettings
from pipelines.serve.run import deploy
from recsys.serving.manifest import sha256_file
from recsys.serving.model import ServingModel
from tests.helpers import free_port
from tests.tables.collisionless.test_collisionless import _log, trained_run

ARROW = "application/vnd.apache.arrow.stream"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DLRM with two collisionless tables trained on days 0-5, checkpointed after day 2
    and day 5: an export of the second is a delta over one of the first."""
    return trained_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def server(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Serve following a folder that holds the step-3 export; the full step-6 export sits
    outside it, as the reference for what a delta must serve."""
    root = tmp_path_factory.mktemp("serve")
    follow = root / "follow"
    follow.mkdir()
    export(run / "checkpoint_step00000003", follow / "v3")
    export(run, root / "full6")
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    settings = ServeSettings(follow=str(follow), poll_s=0.2, max_batch_size=8, batch_wait_ms=2)
    deploy(settings, replicas=1, port=port)
    yield {"port": port, "follow": follow, "root": root, "run": run}
    serve.shutdown()
    ray.shutdown()


def _request(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None
) -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        conn.close()


def _post_json(port: int, rows: list[dict]) -> tuple[int, dict]:
    body = json.dumps({"rows": rows}).encode()
    status, data, _ = _request(port, "POST", "/predict", body, {"Content-Type": "application/json"})
    return status, json.loads(data)


def _arrow(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _version(port: int) -> dict:
    status, data, _ = _request(port, "GET", "/version")
    assert status == 200
    return json.loads(data)


def _traffic() -> pa.Table:
    """Rows of days the model never trained on, without label or user (as traffic comes)."""
    return pa.concat_tables([_log(6), _log(7)]).drop_columns(["label", "user_id"])


def test_served_probabilities_are_what_the_export_scores(server: dict) -> None:
    port = server["port"]
    reference = ServingModel(server["follow"] / "v3")
    table = _traffic()
    expected = reference.predict_table(table)
    assert expected.std() > 1e-4  # rows told apart: equality means something
    version = _version(port)
    assert version["step"] == 3 and version["export"] == str(server["follow"] / "v3")
    assert version["manifest_sha256"] == sha256_file(server["follow"] / "v3" / "manifest.json")
    assert version["last_error"] is None and version["loaded_at"]

    # One request at a time: each is a batch alone, so the math is predict_table's, exactly.
    status, got = _post_json(port, table.to_pylist())
    assert status == 200 and got["version"]["step"] == 3
    np.testing.assert_array_equal(np.array(got["probs"], np.float32), expected)
    status, one = _post_json(port, table.slice(5, 1).to_pylist())
    assert status == 200
    np.testing.assert_array_equal(
        np.array(one["probs"], np.float32), reference.predict_table(table.slice(5, 1))
    )
    status, data, headers = _request(
        port, "POST", "/predict", _arrow(table), {"Content-Type": ARROW, "Accept": ARROW}
    )
    assert status == 200 and headers["x-recsys-step"] == "3"
    probs = pa.ipc.open_stream(data).read_all().column("prob").to_numpy()
    np.testing.assert_array_equal(probs, expected)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    status, data, _ = _request(
        port,
        "POST",
        "/predict",
        sink.getvalue().to_pybytes(),
        {"Content-Type": "application/vnd.apache.parquet"},
    )
    assert status == 200
    np.testing.assert_array_equal(np.array(json.loads(data)["probs"], np.float32), expected)

    # Many at once: the server batches them together, which may round differently.
    results: list[tuple[int, np.ndarray, np.ndarray]] = []

    def client(i: int) -> None:
        rows = table.slice(i, 1 + i % 3)
        status, body = _post_json(port, rows.to_pylist())
        results.append((status, np.array(body["probs"], np.float32), reference.predict_table(rows)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 24 and all(status == 200 for status, _, _ in results)
    for _, got_probs, want in results:
        np.testing.assert_allclose(got_probs, want, atol=1e-6)


def test_bad_input_is_a_400_naming_the_column(server: dict) -> None:
    port = server["port"]
    rows = _traffic().slice(0, 3).to_pylist()
    status, body = _post_json(port, [{k: v for k, v in r.items() if k != "c"} for r in rows])
    assert status == 400 and "missing column(s) ['c']" in body["error"]
    bad = [dict(r) for r in rows]
    bad[2]["b"] = [1, -4]
    status, body = _post_json(port, bad)
    assert status == 400 and "column 'b', row 2" in body["error"], body
    bad[2]["b"] = "seven"
    status, body = _post_json(port, bad)
    assert status == 400 and "column 'b'" in body["error"], body
    status, data, _ = _request(port, "POST", "/predict", b"{not json", {})
    assert status == 400 and "not JSON" in json.loads(data)["error"]
    status, data, _ = _request(port, "POST", "/predict", b"x", {"Content-Type": "text/csv"})
    assert status == 415
    status, data, _ = _request(port, "POST", "/predict", b"garbage", {"Content-Type": ARROW})
    assert status == 400 and "not a readable" in json.loads(data)["error"]
    table = _traffic().slice(0, 4)
    wrong = table.set_column(table.schema.get_field_index("c"), "c", table["c"].cast(pa.int32()))
    status, data, _ = _request(port, "POST", "/predict", _arrow(wrong), {"Content-Type": ARROW})
    assert status == 400 and "'c'" in json.loads(data)["error"]
    # A bad request batched with good ones fails alone.
    statuses: list[int] = []

    def client(i: int) -> None:
        statuses.append(_post_json(port, rows if i % 2 else bad)[0])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200] * 8 + [400] * 8


def test_a_new_delta_is_swapped_in_while_requests_keep_coming(server: dict) -> None:
    port, follow = server["port"], server["follow"]
    table = _traffic()
    rows = table.to_pylist()
    seen: list[tuple[int, int | None]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            status, body = _post_json(port, rows)
            seen.append((status, body.get("version", {}).get("step")))

    clients = [threading.Thread(target=client) for _ in range(4)]
    for t in clients:
        t.start()
    time.sleep(1.0)
    export(server["run"], follow / "v6", since=follow / "v3")
    deadline = time.monotonic() + 60
    while _version(port)["step"] != 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    stop.set()
    for t in clients:
        t.join()
    assert _version(port)["step"] == 6
    assert [s for s, _ in seen if s != 200] == []
    steps = [step for _, step in seen]
    assert 3 in steps and 6 in steps and steps.index(6) > steps.index(3)
    assert _version(port)["base"] == str(follow / "v3")
    status, body = _post_json(port, rows)
    assert status == 200
    full = ServingModel(server["root"] / "full6").predict_table(table)
    np.testing.assert_array_equal(np.array(body["probs"], np.float32), full)
    assert not np.array_equal(full, ServingModel(follow / "v3").predict_table(table))


def test_a_corrupt_newer_export_is_skipped_and_reported(server: dict) -> None:
    port, follow = server["port"], server["follow"]
    corrupt = follow / "v7"
    shutil.copytree(server["root"] / "full6", corrupt)
    manifest = json.loads((corrupt / "manifest.json").read_text())
    manifest["training"]["step"] = 7
    (corrupt / "manifest.json").write_text(json.dumps(manifest))
    part = corrupt / manifest["tables"][0]["files"][0]
    part.write_bytes(part.read_bytes()[:-9] + b"corrupted")
    deadline = time.monotonic() + 30
    while _version(port)["last_error"] is None and time.monotonic() < deadline:
        time.sleep(0.1)
    version = _version(port)
    assert version["step"] == 6 and version["export"] == str(follow / "v6")
    assert version["last_error"]["export"] == str(corrupt)
    assert "SHA-256" in version["last_error"]["error"]
    status, body = _post_json(port, _traffic().to_pylist())
    assert status == 200 and body["version"]["step"] == 6


def test_serve_refuses_a_folder_without_a_loadable_export_before_starting_ray(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "half").mkdir()  # no manifest: not an export yet
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{")
    with pytest.raises(SystemExit):
        main(["serve", "--follow", str(tmp_path)])
    err = capsys.readouterr().err
    assert "no export here loads" in err and str(tmp_path / "broken" / "manifest.json") in err
    with pytest.raises(SystemExit):
        main(["serve", "--export", str(tmp_path / "half")])
    assert str(tmp_path / "half") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    usage = capsys.readouterr().out
    assert "--follow DIR" in usage and "--address" in usage and "Ctrl-C" in usage
