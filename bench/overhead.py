"""Fixed start-up of `recsys train`, `evaluate` and `predict`, and the demo's peak memory
beside FuxiCTR's run of the same model on the same data.

    python bench/overhead.py [--quick] [--rows N] [--workdir DIR]

Fixed start-up is what a command costs beyond its work:
- train: the wall time of `recsys train conf/demo.yaml` on a tiny log (the demo's four
  days, 2,000 rows each: one or two steps per worker and a 2,000-row validation), with
  where that time goes, read from the run's own logs (`logs/driver.log`, rank 0's
  `logs/worker-0.log`): imports, preflight, `ray.init`, the worker group's start, model
  build and planner, the wait for the stream's first batch, steps, the end;
- evaluate, predict: the wall time of the command on the demo's test day minus the same
  call's time in a warm process (this one: imports done, a first call made).
Memory: the peak resident memory summed over the whole process tree (the command and every
descendant: Ray's GCS, raylet, workers, object store), sampled every 0.2 s by psutil,
of `recsys train conf/demo.yaml` at `--rows` rows and of FuxiCTR 2.3.10's DLRM (its own
run_expid sequence in the peer venv, Ray Data loader) on the same days, the same features,
embedding dim, MLPs and batch; the same sampler watches both.

Goals (issue 17): train fixed <= 25 s, evaluate fixed <= 10 s (2 cores), the demo's tree
peak <= 1.5x FuxiCTR's. `--quick`: the tiny log for everything (its train run is also the
memory run, against FuxiCTR on the same tiny log).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # bench/peers, beside this file

from pipelines.console import chatter_to

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf" / "demo.yaml"
TEST_DAY = "day=2026-01-04"  # the demo's held-out day
TINY_ROWS = 8_000
GOALS = {"train_fixed_s": 25.0, "evaluate_fixed_s": 10.0, "memory_ratio": 1.5}


class TreePeak:
    """Peak RSS summed over this process's descendants (not this process itself)."""

    def __init__(self) -> None:
        self.peak = 0
        self.processes = 0
        self.by_name: dict[str, list[int]] = {}  # at the peak: name -> [processes, bytes]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.2):
            total, count, by_name = 0, 0, {}
            for p in me.children(recursive=True):
                try:
                    rss = p.memory_info().rss
                    name = _name(p)
                except psutil.Error:
                    continue
                total += rss
                count += 1
                entry = by_name.setdefault(name, [0, 0])
                entry[0] += 1
                entry[1] += rss
            if total > self.peak:
                self.peak, self.processes, self.by_name = total, count, by_name

    def top(self, n: int = 6) -> str:
        """The largest kinds of process at the peak: `name xcount MiB`."""
        kinds = sorted(self.by_name.items(), key=lambda kv: -kv[1][1])[:n]
        return ", ".join(f"{k} x{c} {b / 2**20:,.0f} MiB" for k, (c, b) in kinds)

    def __enter__(self) -> TreePeak:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _name(p: psutil.Process) -> str:
    """A process's kind: Ray's title (`ray::RayTrainWorker`, `ray::IDLE`), the raylet's
    and GCS's binary, or the script a python runs."""
    cmd = p.cmdline()
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split()[0]
    scripts = [Path(c).name for c in cmd[1:3] if c.endswith(".py") or c.startswith("pipelines")]
    return scripts[0] if scripts else p.name()


def recsys(*args: str, log: Path) -> tuple[float, float]:
    """Run `recsys ARGS` (this interpreter, this checkout); (start epoch time, wall s)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    start_epoch, start = time.time(), time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "pipelines.cli", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"recsys {args[0]} failed ({done.returncode}); {log}:\n{tail}")
    return start_epoch, wall


def _stamp(line: str) -> float | None:
    """Epoch seconds of a Python logging line (`2026-12-07 16:35:37,822 ...`, local time)."""
    try:
        when = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    except ValueError:
        return None
    return when.timestamp()


def _first(path: Path, needle: str | None = None, last: bool = False) -> float | None:
    """The timestamp of the first (or last) logging line holding `needle` (any line when
    None)."""
    if not path.exists():
        return None
    found = None
    for line in path.read_text(errors="replace").splitlines():
        if needle is None or needle in line:
            t = _stamp(line)
            if t is not None:
                found = t
                if not last:
                    break
    return found


def train_phases(run: Path, start: float, wall: float) -> dict[str, float | None]:
    """Seconds per phase of a train command, from the markers its logs carry."""
    driver, worker = run / "logs" / "driver.log", run / "logs" / "worker-0.log"
    marks = [
        ("imports and run folder", start),
        ("preflight, split, vocabularies", _first(driver, "recsys: train ")),
        ("ray.init", _first(driver, "vocabularies built") or _first(driver, "logs checked")),
        ("trainer and worker group start (imports in workers)", _first(driver, "Ray started in")),
        ("model build, planner, sharding", _first(worker)),
        ("stream start: wait for the first batch", _first(worker, "requesting new epoch")),
        ("steps and validation", _first(worker, "Validating input features")),
        ("final checkpoint, Ray shutdown, exit", _first(worker, "final {")),
    ]
    phases: dict[str, float | None] = {}
    ends = [t for _, t in marks[1:]] + [start + wall]
    for (name, begin), end in zip(marks, ends, strict=True):
        phases[name] = None if begin is None or end is None else round(end - begin, 2)
    ray_up = _first(driver, "Started a local Ray instance")
    ray_begin = marks[2][1]
    if ray_up is not None and ray_begin is not None:
        phases["ray.init"] = round(ray_up - ray_begin, 2)  # the rest: Ray Data's context
    return phases


def fuxictr_job(cfg: Any, log: Path, out: Path) -> dict[str, Any]:
    """FuxiCTR's DLRM on the demo's split: days 1-3 train, the last day valid and test."""
    import polars as pl

    days = sorted(log.glob("day=*"))
    out.mkdir(parents=True, exist_ok=True)
    train = out / "train.parquet"
    pl.concat([pl.read_parquet(d) for d in days[:-1]]).write_parquet(train)
    held_out = str(next(days[-1].glob("*.parquet")))
    f = cfg.features
    features = [{"name": d.name, "type": "numeric", "fill_na": 0.0} for d in f.dense]
    features += [
        {"name": s.name, "type": "sequence" if s.multi_valued else "categorical"} for s in f.sparse
    ]
    return {
        "train": str(train),
        "valid": held_out,
        "test": held_out,
        "label": f.label,
        "features": features,
        "model": "DLRM",
        "params": {
            "embedding_dim": cfg.tables[0].embedding_dim,
            "bottom_mlp_units": cfg.model.dense_arch[:-1],
            "top_mlp_units": cfg.model.over_arch,
            "interaction_op": "dot",
            "batch_norm": False,
            "learning_rate": cfg.train.dense_lr,
            "batch_size": cfg.train.batch_size * cfg.train.workers,  # the engine's global batch
            "epochs": cfg.train.epochs,
            "seed": cfg.train.seed,
        },
        "torch_threads": 2,
    }


def warm_evaluate(run: Path, data: Path, out: Path) -> float:
    """Seconds of `evaluate` in this process, after a first call (imports, caches)."""
    from pipelines.evaluate import evaluate

    evaluate(run, data, report_dir=out / "first")
    start = time.perf_counter()
    evaluate(run, data, report_dir=out / "second")
    return time.perf_counter() - start


def warm_predict(export: Path, data: Path) -> float:
    """Seconds of `predict`'s work (load the export, score the file) in a warm process."""
    from recsys.serving.model import ServingModel

    ServingModel(export).predict(data)
    start = time.perf_counter()
    ServingModel(export).predict(data)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny log for everything")
    parser.add_argument("--rows", type=int, default=400_000, help="demo log rows (make demo's)")
    parser.add_argument("--workdir", type=Path, help="keep the runs here (emptied first)")
    args = parser.parse_args()

    from recsys.config import load_config
    from recsys.synth import generate

    work = args.workdir or Path(tempfile.mkdtemp(prefix="overhead_"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"overhead: workdir {work}; load average {os.getloadavg()}", flush=True)
    tiny = work / "tiny"
    generate(load_config(CONF), rows=TINY_ROWS, out=tiny)
    figures: dict[str, Any] = {}

    def demo(name: str, log: Path) -> tuple[list[str], Path]:
        return [
            str(CONF),
            f"data.train={log}",
            f"train.run_dir={work / 'runs'}",
            f"name={name}",
        ], work / "runs" / name

    # train: the tiny run's wall time is its fixed start-up, with its phases
    overrides, tiny_run = demo("tiny", tiny)
    with TreePeak() as tiny_peak:
        start, wall = recsys("train", *overrides, log=work / "train_tiny.out")
    figures["train_fixed_s"] = wall
    phases = train_phases(tiny_run, start, wall)
    print(f"train (tiny log, {TINY_ROWS:,} rows): {wall:.1f} s", flush=True)
    for name, seconds in phases.items():
        print(f"  {name:<55} {'n/a' if seconds is None else f'{seconds:6.1f} s'}")

    # evaluate and predict on the demo's test day: wall minus the warm call's time
    if args.quick:
        data_log, memory_run, memory_peak = tiny, tiny_run, tiny_peak
    else:
        data_log = work / "log"
        generate(load_config(CONF), rows=args.rows, out=data_log)
        overrides, memory_run = demo("demo", data_log)
        with TreePeak() as memory_peak:
            _, demo_wall = recsys("train", *overrides, log=work / "train_demo.out")
        figures["demo_train_s"] = demo_wall
        print(f"train (demo log, {args.rows:,} rows): {demo_wall:.1f} s", flush=True)
    test = next((data_log / TEST_DAY).glob("*.parquet"))
    _, eval_wall = recsys(
        "evaluate", "--checkpoint", str(memory_run), "--data", str(test),
        log=work / "evaluate.out",
    )  # fmt: skip
    chatter_to(work / "warm.log")  # the warm calls' library warnings, as the CLI does
    eval_work = warm_evaluate(memory_run, test, work / "eval_warm")
    figures["evaluate_fixed_s"] = eval_wall - eval_work
    print(f"evaluate: {eval_wall:.1f} s, of which work {eval_work:.1f} s", flush=True)
    export = work / "export"
    recsys("export", "--checkpoint", str(memory_run), "--out", str(export), log=work / "export.out")
    _, predict_wall = recsys(
        "predict", "--export", str(export), "--data", str(test), "--with-metrics",
        log=work / "predict.out",
    )  # fmt: skip
    predict_work = warm_predict(export, test)
    figures["predict_fixed_s"] = predict_wall - predict_work
    print(f"predict: {predict_wall:.1f} s, of which work {predict_work:.1f} s", flush=True)

    # memory: the engine's run above against FuxiCTR's DLRM on the same data
    figures["engine_peak_mib"] = memory_peak.peak / 2**20
    figures["engine_processes"] = memory_peak.processes
    cfg = load_config(CONF, [f"data.train={data_log}"])
    job = fuxictr_job(cfg, data_log, work / "fuxictr")
    with TreePeak() as peer_peak:
        peer = peers.run_fuxictr(job, work / "fuxictr")
    figures["fuxictr_peak_mib"] = peer_peak.peak / 2**20
    figures["fuxictr_processes"] = peer_peak.processes
    figures["memory_ratio"] = figures["engine_peak_mib"] / figures["fuxictr_peak_mib"]
    engine_result = json.loads((memory_run / "result.json").read_text())
    figures["engine_valid_auc"] = engine_result["metrics"].get("valid_auc")
    figures["fuxictr_test_auc"] = peer["test_auc"]
    print(
        f"peak tree memory: engine {figures['engine_peak_mib']:,.0f} MiB in "
        f"{figures['engine_processes']} processes (valid AUC {figures['engine_valid_auc']:.4f}), "
        f"FuxiCTR {figures['fuxictr_peak_mib']:,.0f} MiB in {figures['fuxictr_processes']} "
        f"(test AUC {peer['test_auc']:.4f}), ratio {figures['memory_ratio']:.2f}",
        flush=True,
    )
    print(f"  engine at its peak: {memory_peak.top()}")
    print(f"  FuxiCTR at its peak: {peer_peak.top()}", flush=True)

    met = {key: figures[key] <= goal for key, goal in GOALS.items()}
    unmet = [key for key, ok in met.items() if not ok]
    print(
        f"RESULT overhead ratio={figures['memory_ratio']:.2f} goal={GOALS['memory_ratio']} "
        f"met={'yes' if not unmet else 'no'} "
        f"train_fixed_s={figures['train_fixed_s']:.1f} train_goal_s={GOALS['train_fixed_s']:.0f} "
        f"evaluate_fixed_s={figures['evaluate_fixed_s']:.1f} "
        f"evaluate_goal_s={GOALS['evaluate_fixed_s']:.0f} "
        f"predict_fixed_s={figures['predict_fixed_s']:.1f} "
        f"engine_peak_mib={figures['engine_peak_mib']:.0f} "
        f"fuxictr_peak_mib={figures['fuxictr_peak_mib']:.0f} "
        f"unmet={','.join(unmet) or 'none'} quick={'yes' if args.quick else 'no'} "
        f"load1={os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
