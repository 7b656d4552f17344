"""Helpers of the benchmarks on real logs (bench/real_ctr.py, bench/real_sequence.py): the
MovieLens-100K log from `recsys convert movielens`, one fixed time split into three Parquet
files, the engine run as users run it (`recsys train`, then `recsys evaluate`, each a
subprocess whose output goes to a log file), the peak memory of a process tree, the
loop over models and seeds with its one console line a run, and mean / spread over seeds.

Memory: a thread polls every process below this one (the engine's driver, its Ray
head processes and workers; or the FuxiCTR peer and its Ray) and keeps the peak of the
summed RSS (shared pages counted once per process, so an upper bound) and of the summed
PSS (shared pages split between the processes that map them: the honest total).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import polars as pl
import psutil
import yaml
from peers.fuxictr_venv import venv_dir

REPO = Path(__file__).resolve().parents[1]
RECSYS = Path(sys.executable).with_name("recsys")


MOVIELENS_SPARSE = ["user_id", "item_id", "age_bucket", "gender", "occupation", "zip_prefix"]


def movielens_ctr_sections(dim: int, init: dict[str, Any]) -> dict[str, Any]:
    """The `features` and `tables` sections of an experiment on MovieLens CTR (the
    converter's columns): per-feature full tables, genres mean-pooled."""
    return {
        "features": {
            "label": "label",
            "user_id": "user_id",
            "timestamp": "timestamp",
            "sparse": [
                *MOVIELENS_SPARSE,
                {"name": "release_year", "allow_null": True},
                {"name": "genres", "multi_valued": True},
            ],
        },
        "tables": [
            {"features": [*MOVIELENS_SPARSE, "release_year"], "embedding_dim": dim, "init": init},
            {"features": ["genres"], "embedding_dim": dim, "init": init, "pooling": "mean"},
        ],
    }


def bench_cache() -> Path:
    """The benches' cache root, as for the peer venv: $RECSYS_BENCH_CACHE or
    ~/.cache/recsys-bench."""
    return venv_dir().parent


def movielens_log(kind: str) -> Path:
    """`<cache>/movielens/<kind>` (kind: ctr or sequence), converted once and reused."""
    out = bench_cache() / "movielens"
    log = out / kind
    if not (log / "_convert.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [str(RECSYS), "convert", "movielens", "--out", str(out)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return log


@dataclass
class TimeSplit:
    """Three Parquet files cut at UTC day boundaries, and what they hold."""

    files: dict[str, Path]
    days: dict[str, tuple[date, date]]
    rows: dict[str, int]
    day_counts: dict[str, int]

    def describe(self) -> list[str]:
        total = sum(self.rows.values())
        return [
            f"  {name:<5} {self.days[name][0]} .. {self.days[name][1]} "
            f"({self.day_counts[name]:>3} days) {self.rows[name]:>6} rows "
            f"({100 * self.rows[name] / total:.1f}%)"
            for name in ("train", "valid", "test")
        ]


def _newest_days(counts: list[tuple[date, int]], target: float) -> int:
    """How many of `counts` (newest first) hold closest to `target` rows (at least one)."""
    taken, rows = 0, 0
    for _, n in counts:
        if taken and abs(rows + n - target) >= abs(rows - target):
            break
        taken, rows = taken + 1, rows + n
    return taken


def time_split(
    log: Path,
    out: Path,
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    max_rows: int | None = None,
) -> TimeSplit:
    """train / valid / test Parquet files in `out`: test = the newest UTC days holding about
    `test_frac` of the rows, valid = the days before them holding about `valid_frac`, train =
    the rest. `max_rows` first keeps only the newest days holding about that many rows (for
    smoke runs). Rows keep the log's time order."""
    frame = (
        pl.scan_parquet(str(log / "**" / "*.parquet"), hive_partitioning=False)
        .with_columns(pl.from_epoch("timestamp").dt.date().alias("_day"))
        .collect()
        .sort("timestamp", maintain_order=True)
    )
    counts = frame.group_by("_day").len().sort("_day", descending=True).rows()
    if max_rows is not None and max_rows < frame.height:
        keep = _newest_days(counts, max_rows)
        counts = counts[:keep]
        frame = frame.filter(pl.col("_day") >= counts[-1][0])
    total = frame.height
    n_test = _newest_days(counts, test_frac * total)
    n_valid = _newest_days(counts[n_test:], valid_frac * total)
    test_from = counts[n_test - 1][0]
    valid_from = counts[n_test + n_valid - 1][0]
    parts = {
        "train": frame.filter(pl.col("_day") < valid_from),
        "valid": frame.filter((pl.col("_day") >= valid_from) & (pl.col("_day") < test_from)),
        "test": frame.filter(pl.col("_day") >= test_from),
    }
    out.mkdir(parents=True, exist_ok=True)
    split = TimeSplit({}, {}, {}, {})
    for name, part in parts.items():
        path = out / f"{name}.parquet"
        part.drop("_day").write_parquet(path)
        split.files[name] = path
        split.days[name] = (part["_day"].min(), part["_day"].max())  # type: ignore[assignment]
        split.rows[name] = part.height
        split.day_counts[name] = part["_day"].n_unique()
    return split


class TreeMemory:
    """Peak summed RSS and PSS (MiB) of this process's descendants while in the block."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.peak_rss_mib = 0.0
        self.peak_pss_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            rss = pss = 0
            for proc in me.children(recursive=True):
                try:
                    info = proc.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
            self.peak_rss_mib = max(self.peak_rss_mib, rss / 2**20)
            self.peak_pss_mib = max(self.peak_pss_mib, pss / 2**20)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def engine_env() -> dict[str, str]:
    """The environment of an engine subprocess: no inherited RAY_ADDRESS (each command
    starts its embedded local Ray, as on a laptop), no progress bars."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    return env


def run_logged(cmd: list[str], log: Path) -> float:
    """Run `cmd` from the repository root with its output appended to `log`; its wall
    seconds. A failure raises with the log's last lines."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        code = subprocess.run(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=engine_env(), check=False
        ).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"{cmd[1]} failed (exit {code}); log {log}, last lines:\n{tail}")
    return seconds


@dataclass
class EngineRun:
    """One engine run, trained and evaluated by the CLI."""

    name: str
    report: dict[str, Any]  # recsys evaluate's report.json
    result: dict[str, Any]  # <run>/result.json of recsys train
    validations: list[dict[str, Any]] = field(default_factory=list)
    train_s: float = 0.0
    eval_s: float = 0.0
    peak_rss_mib: float = 0.0
    peak_pss_mib: float = 0.0

    @property
    def wall_s(self) -> float:
        return self.train_s + self.eval_s

    @property
    def epochs(self) -> int:
        return int(self.result["metrics"]["epoch"])


def run_engine(config: dict[str, Any], workdir: Path, test: Path) -> EngineRun:
    """Write `config` as `<workdir>/<name>.yaml`, run `recsys train` on it and `recsys
    evaluate` of its best checkpoint on `test`; output in `<workdir>/<name>.log`."""
    name = config["name"]
    conf = workdir / f"{name}.yaml"
    conf.write_text(yaml.safe_dump(config, sort_keys=False))
    log = workdir / f"{name}.log"
    run = Path(config["train"]["run_dir"]) / name
    report_dir = workdir / f"{name}_eval"
    with TreeMemory() as memory:
        train_s = run_logged([str(RECSYS), "train", str(conf)], log)
        eval_s = run_logged(
            [
                str(RECSYS),
                "evaluate",
                "--checkpoint",
                str(run),
                "--data",
                str(test),
                "--out",
                str(report_dir),
            ],
            log,
        )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return EngineRun(
        name=name,
        report=json.loads((report_dir / "report.json").read_text()),
        result=json.loads((run / "result.json").read_text()),
        validations=[r for r in records if "valid_auc" in r and not r.get("final")],
        train_s=train_s,
        eval_s=eval_s,
        peak_rss_mib=memory.peak_rss_mib,
        peak_pss_mib=memory.peak_pss_mib,
    )


def fresh_split(
    kind: str, title: str, workdir: Path | None, quick: bool, quick_rows: int
) -> tuple[Path, TimeSplit]:
    """The bench's workdir (default `<cache>/real_<kind>`, `_quick` with `quick`), emptied,
    and the time split of the MovieLens `kind` log in it (the newest `quick_rows` rows with
    `quick`), described on the console."""
    default = f"real_{kind}_quick" if quick else f"real_{kind}"
    workdir = (workdir or bench_cache() / default).resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    split = time_split(
        movielens_log(kind), workdir / "split", max_rows=quick_rows if quick else None
    )
    print(f"MovieLens-100K {title} log, time split by UTC day (files in {workdir / 'split'}):")
    print("\n".join(split.describe()))
    return workdir, split


def engine_runs(
    cases: Iterable[tuple[str, int]],
    configure: Callable[[str, int], dict[str, Any]],
    workdir: Path,
    test: Path,
) -> Iterator[tuple[str, int, EngineRun]]:
    """(model, seed, its run) for each case in order, one engine run after the other."""
    for model, seed in cases:
        yield model, seed, run_engine(configure(model, seed), workdir, test)


_METRIC_NAMES = {"auc": "AUC", "gauc": "GAUC", "logloss": "logloss"}


def run_line(run: EngineRun, metrics: Iterable[str]) -> str:
    """`test AUC a [GAUC g] logloss l, E epochs (best step s), W s (train t + evaluate e)`."""
    scores = " ".join(f"{_METRIC_NAMES[k]} {run.report[k]:.4f}" for k in metrics)
    return (
        f"test {scores}, {run.epochs} epochs (best step {run.result['metrics'].get('best_step')}),"
        f" {run.wall_s:.0f} s (train {run.train_s:.0f} + evaluate {run.eval_s:.0f})"
    )


def all_runs_line(began: float) -> str:
    return f"\nall runs: {time.perf_counter() - began:.0f} s; load average {load_avg()}"


def spread(values: list[float], digits: int = 4, bounds: bool = True) -> str:
    """`mean ± std [min, max]` over seeds (std 0 for one value; `bounds`: with min, max)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    f = f"{{:.{digits}f}}"
    text = f"{f.format(statistics.fmean(values))} ± {f.format(std)}"
    return f"{text} [{f.format(min(values))}, {f.format(max(values))}]" if bounds else text


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned text table lines."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return [line.format(*header), line.format(*("-" * w for w in widths))] + [
        line.format(*r) for r in rows
    ]


def load_avg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} {five:.1f} {fifteen:.1f}"
