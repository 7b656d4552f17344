"""`ray job submit ... -- recsys train` against a real `ray start --head` cluster on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from recsys.config import load_config
from recsys.synth import generate
from tests.helpers import free_port
from tests.pipelines.runs import validation_auc

pytestmark = pytest.mark.cluster

BIN = Path(sys.executable).parent


def _ray(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """A head node on loopback with its own dashboard (the Jobs API) and temp dir."""
    dashboard = free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    # Loopback test cluster: no token auth, whatever token a developer's ~/.ray holds.
    env["RAY_AUTH_MODE"] = "disabled"
    # `--block` keeps the head in this process group, so stopping it stops this cluster
    # only (`ray stop` would kill every Ray on the machine, other users' included).
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={free_port()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--num-cpus=4",
            "--disable-usage-stats",
            f"--temp-dir={tmp_path_factory.mktemp('ray')}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_jobs_api(address, head)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def _wait_for_jobs_api(address: str, head: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert head.poll() is None, f"ray start --head exited with {head.returncode}"
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"the Jobs API at {address} did not come up in {timeout} s")


def _submit_when_agent_is_up(*args: str, env: dict[str, str], timeout: float):
    """`ray job submit`, retried while the new head's job agent is still starting."""
    for _ in range(30):
        submitted = _ray(*args, env=env, timeout=timeout)
        if "No available agent" not in submitted.stderr + submitted.stdout:
            return submitted
        time.sleep(2)
    return submitted


def test_submitted_training_job_trains_and_checkpoints(cluster, repo: Path, tmp_path) -> None:
    address, env = cluster
    log, runs = tmp_path / "log", tmp_path / "runs"
    overrides = [
        f"data.train={log}",
        f"train.run_dir={runs}",
        "data.synthetic.days=2",
        "tables.0.embedding_dim=8",
        "model.dense_arch=[16,8]",
        "model.over_arch=[16]",
        "train.batch_size=512",
        "train.log_every=5",
    ]
    generate(load_config(repo / "conf" / "demo.yaml", overrides), rows=8_000, out=log)
    runtime_env = {"excludes": [".venv", ".git", "out", "runs", "data", "*.egg-info"]}
    submitted = _submit_when_agent_is_up(
        "job",
        "submit",
        f"--address={address}",
        f"--working-dir={repo}",
        f"--runtime-env-json={json.dumps(runtime_env)}",
        "--",
        "recsys",
        "train",
        "conf/demo.yaml",
        *overrides,
        env=env,
        timeout=600,
    )
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output[-4000:]
    assert "succeeded" in output, output[-4000:]
    result = json.loads((runs / "demo" / "result.json").read_text())
    assert result["metrics"]["step"] > 0
    cfg = load_config(runs / "demo" / "config.yaml")
    reference = validation_auc(cfg, runs / "demo", tmp_path)
    assert result["metrics"]["valid_auc"] == pytest.approx(reference, abs=1e-6)
    assert Path(result["checkpoint"]).is_dir()
    records = (runs / "demo" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(records[-1])["final"]
