"""Exact runs on a real embedded Ray: a run stopped and resumed, or one whose worker is
killed mid-training, ends with the weights of a run that never stopped, bit for bit.

One worker, dropout on (the RNG state must come back), a shuffle buffer smaller than an
epoch (the data order must come back), two epochs (the epoch boundary must be crossed),
validation every 5 steps (the early-stopping monitor must come back).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch

from pipelines.build import load_trained
from pipelines.train.driver import train
from recsys.config import ExperimentConfig, load_config
from recsys.synth import generate

ROWS = 16_000  # 2 of 3 days train: ~11 steps of 1024 per epoch


def _config(repo: Path, tmp: Path, name: str, *extra: str) -> ExperimentConfig:
    return load_config(
        repo / "conf" / "demo.yaml",
        [
            f"name={name}",
            f"data.train={tmp / 'log'}",
            f"train.run_dir={tmp / 'runs'}",
            "data.synthetic.days=3",
            "data.shuffle_buffer=3000",
            "tables.0.embedding_dim=8",
            "model.dense_arch=[16, 8]",
            "model.over_arch=[32]",
            "model.dropout=0.2",
            "train.workers=1",
            "train.batch_size=1024",
            "train.epochs=2",
            "train.log_every=1",
            "train.checkpoint_every=3",
            "train.validate_every=5",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, repo: Path) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("exact")
    generate(_config(repo, tmp, "straight"), rows=ROWS, out=tmp / "log")
    result = train(_config(repo, tmp, "straight"))
    yield tmp, result
    ray.shutdown()


def _weights(run: str) -> dict[str, torch.Tensor]:
    return load_trained(run, newest=True)[1].state_dict()


def _assert_same_run(result: dict, reference: dict) -> None:
    """The same final weights, bit for bit, and the same validations and best checkpoint."""
    got, expected = _weights(result["run_dir"]), _weights(reference["run_dir"])
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    for key in ("step", "best_step", "best_valid_auc", "valid_auc", "valid_logloss"):
        assert result["metrics"][key] == reference["metrics"][key], key


# mid first epoch; just after a validation; mid second epoch, past the boundary
@pytest.mark.parametrize("stop", [4, 10, 14])
def test_resume_equals_never_stopping(straight, repo: Path, stop: int) -> None:
    tmp, reference = straight
    steps = reference["metrics"]["step"]
    assert stop < steps
    first = train(_config(repo, tmp, f"stop{stop}", f"train.max_steps={stop}"))
    assert first["metrics"]["step"] == stop
    resumed = train(_config(repo, tmp, f"stop{stop}"), resume=True)
    assert resumed["metrics"]["step"] == steps
    _assert_same_run(resumed, reference)
    records = (Path(resumed["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    assert any(json.loads(r).get("resumed_step") == stop for r in records)


def _kill_a_worker_after(metrics: Path, step: int, killed: list[int]) -> None:
    """SIGKILL the Ray Train worker once rank 0 has logged `step` (a checkpoint is behind)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if metrics.exists():
            done = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines()]
            if max(done, default=0) >= step:
                break
        time.sleep(0.05)
    for proc in psutil.process_iter(["cmdline"]):
        if any("RayTrainWorker" in part for part in proc.info["cmdline"] or ()):
            os.kill(proc.pid, signal.SIGKILL)
            killed.append(proc.pid)


def test_a_killed_worker_costs_nothing(straight, repo: Path) -> None:
    tmp, reference = straight
    cfg = _config(repo, tmp, "killed")
    killed: list[int] = []
    metrics = Path(cfg.train.run_dir) / "killed" / "metrics.jsonl"
    killer = threading.Thread(target=_kill_a_worker_after, args=(metrics, 7, killed))
    killer.start()
    result = train(cfg)
    killer.join()
    assert killed, "no training worker was found to kill"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    resumed = [r for r in records if "resumed_step" in r]
    # from a checkpoint (every 3 steps) at or after step 6, which the kill came after
    assert resumed and resumed[0]["resumed_step"] % 3 == 0 and resumed[0]["resumed_step"] >= 6
    assert result["metrics"]["step"] == reference["metrics"]["step"]
    _assert_same_run(result, reference)
