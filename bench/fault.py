"""What a killed training worker costs: one run SIGKILLed at 3 seeded points against one
that never stopped, both on a real embedded Ray through `recsys train`'s own code path.

    python bench/fault.py [--rows N] [--seed S] [--quick]

conf/demo.yaml cut down (1 worker, dropout on, a shuffle buffer smaller than an epoch, two
epochs, a checkpoint every 3 steps, a loss record every step). The killer waits until
rank 0 has logged each kill step, then SIGKILLs the Ray Train worker; Ray Train restarts
the group from the newest complete checkpoint (`train.max_failures`).

Printed: held-out AUC of both runs and their difference, wall time of both and what each
restart cost, the steps done twice (between a checkpoint and the kill), whether the final
weights are bitwise equal, and the rows read differently: the batch size times the number
of steps whose logged loss differs from the uninterrupted run's at that step (a step that
read one row twice, or skipped one, trains on a different batch and logs another loss).
Goal: AUC difference 0 within 1e-4, rows lost or repeated 0. Last line:
`RESULT fault ratio=<|AUC difference|> goal=1e-4 met=yes|no ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import ray
import torch

from pipelines.build import load_trained
from pipelines.train.driver import train
from recsys.config import ExperimentConfig, load_config
from recsys.synth import generate

REPO = Path(__file__).resolve().parents[1]
KILLS = 3
CHECKPOINT_EVERY = 3
BATCH = 1024


def _config(tmp: Path, name: str) -> ExperimentConfig:
    return load_config(
        REPO / "conf" / "demo.yaml",
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
            f"train.batch_size={BATCH}",
            "train.epochs=2",
            "train.log_every=1",
            f"train.checkpoint_every={CHECKPOINT_EVERY}",
            f"train.max_failures={KILLS}",
        ],
    )


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _workers() -> list[psutil.Process]:
    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if any("RayTrainWorker" in part for part in p.info["cmdline"] or ())
    ]


def _killer(run: Path, steps: list[int], log: list[dict]) -> None:
    """SIGKILL the training worker once the run has logged each of `steps` (in order)."""
    deadline = time.monotonic() + 1800
    for step in steps:
        while time.monotonic() < deadline:
            done = max((r.get("step", 0) for r in _records(run) if "loss" in r), default=0)
            if done >= step:
                break
            time.sleep(0.02)
        victims = _workers()
        for proc in victims:
            os.kill(proc.pid, signal.SIGKILL)
        log.append({"step": done, "at": time.monotonic(), "pids": [p.pid for p in victims]})
        while time.monotonic() < deadline and {p.pid for p in _workers()} & {
            p.pid for p in victims
        }:
            time.sleep(0.05)


def _losses(run: Path) -> dict[int, float]:
    """The loss logged at each step; a re-run step keeps its last (post-restart) value."""
    return {r["step"]: r["loss"] for r in _records(run) if "loss" in r and "step" in r}


def _same_weights(a: str, b: str) -> bool:
    wa, wb = (load_trained(run, newest=True)[1].state_dict() for run in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=60_000, help="synthetic rows (3 days)")
    parser.add_argument("--seed", type=int, default=0, help="draws the kill steps")
    parser.add_argument("--quick", action="store_true", help="16k rows: a smoke run")
    args = parser.parse_args()
    rows = 16_000 if args.quick else args.rows

    with tempfile.TemporaryDirectory(prefix="bench_fault_") as tmp_name:
        tmp = Path(tmp_name)
        generate(_config(tmp, "straight"), rows=rows, out=tmp / "log")
        began = time.monotonic()
        straight = train(_config(tmp, "straight"))
        straight_s = time.monotonic() - began
        steps = straight["metrics"]["step"]
        rng = np.random.default_rng(args.seed)
        # after the first checkpoint, before the last step; distinct and in order
        kill_at = sorted(rng.choice(np.arange(CHECKPOINT_EVERY + 1, steps - 1), KILLS, False))
        kill_at = [int(k) for k in kill_at]

        killed_cfg = _config(tmp, "killed")
        run = Path(killed_cfg.train.run_dir) / "killed"
        kills: list[dict] = []
        killer = threading.Thread(target=_killer, args=(run, kill_at, kills), daemon=True)
        killer.start()
        began = time.monotonic()
        killed = train(killed_cfg)
        killed_s = time.monotonic() - began
        killer.join(timeout=5)
        ray.shutdown()

        resumed = [r["resumed_step"] for r in _records(run) if "resumed_step" in r]
        redone = [k["step"] - r for k, r in zip(kills, resumed, strict=False)]
        reference, got = _losses(Path(straight["run_dir"])), _losses(run)
        differing = sum(1 for s, loss in reference.items() if got.get(s) != loss)
        same = _same_weights(killed["run_dir"], straight["run_dir"])
        auc_straight = straight["metrics"]["valid_auc"]
        auc_killed = killed["metrics"]["valid_auc"]

    diff = abs(auc_killed - auc_straight)
    lost_s = killed_s - straight_s
    per_restart = lost_s / max(len(kills), 1)
    print(f"steps: {steps} ({rows} rows, batch {BATCH}, 1 worker, 2 epochs)")
    print(f"kills planned at steps {kill_at}; done at {[k['step'] for k in kills]}")
    print(f"resumed from steps {resumed}; steps done twice per restart {redone}")
    print(
        f"held-out AUC: uninterrupted {auc_straight:.6f}, killed {auc_killed:.6f}, diff {diff:.2e}"
    )
    print(
        f"wall: uninterrupted {straight_s:.1f} s, killed {killed_s:.1f} s, "
        f"{per_restart:.1f} s per restart"
    )
    print(f"final weights bitwise equal: {same}; steps with another loss: {differing}")
    rows_off = differing * BATCH
    met = diff <= 1e-4 and rows_off == 0 and len(kills) == KILLS == len(resumed)
    print(
        f"RESULT fault ratio={diff:.2e} goal=1e-4 met={'yes' if met else 'no'} "
        f"restarts={len(resumed)} rows_lost_or_repeated={rows_off} weights_equal={same} "
        f"seconds_per_restart={per_restart:.1f} auc={auc_killed:.6f}"
    )


if __name__ == "__main__":
    main()
