"""The synthetic Criteo-like log of bench/peers.py and bench/scaling.py, and the engine's
experiment on it: the log generated once per size into the bench cache (`recsys gen-data
conf/criteo_synth.yaml`), its day split, the `recsys train` config, and the training rate
read from a run's `metrics.jsonl`. The setting itself is documented in bench/peers.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import polars as pl
from real_logs import RECSYS, bench_cache

REPO = Path(__file__).resolve().parents[1]
DENSE = [f"I{i}" for i in range(1, 14)]
SPARSE = [f"C{i}" for i in range(1, 27)]
MULTI = ["C24", "C25", "C26"]
DIM = 16
BATCH = 4096
DENSE_LR = 1e-3
SPARSE_LR = 0.05  # the engine's default row-wise Adagrad rate
MODELS: dict[str, dict[str, Any]] = {
    "DLRM": {
        "engine": {"name": "dlrm", "dense_arch": [64, DIM], "over_arch": [256, 128]},
        "loop": {"dense_arch": [64, DIM], "over_arch": [256, 128]},
        "fuxictr": {
            "bottom_mlp_units": [64],
            "top_mlp_units": [256, 128],
            "interaction_op": "dot",
        },
    },
    "DCNv2": {
        "engine": {
            "name": "dcnv2",
            "over_arch": [256, 128],
            "cross_layers": 3,
            "cross_structure": "parallel",
        },
        "loop": {"over_arch": [256, 128], "cross_layers": 3, "cross_structure": "parallel"},
        "fuxictr": {
            "model_structure": "parallel",
            "num_cross_layers": 3,
            "parallel_dnn_hidden_units": [256, 128],
            "use_low_rank_mixture": False,
        },
    },
}


def synthetic_log(rows: int, vocab_max: int) -> tuple[Path, dict[str, Any]]:
    """The generator's log of `rows` rows (cached by size) and its summary."""
    out = bench_cache() / f"peers_log_{rows}_{vocab_max}"
    summary = out / "_generator.json"
    if not summary.is_file():
        cmd = [
            str(RECSYS),
            "gen-data",
            str(REPO / "conf" / "criteo_synth.yaml"),
            f"data.synthetic.vocab_max={vocab_max}",
            "--rows",
            str(rows),
            "--out",
            str(out),
        ]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    return out, json.loads(summary.read_text())


def day_split(log: Path, out: Path) -> dict[str, tuple[Path, int]]:
    """train (days 1-5), valid (day 6), test (day 7) files with dense columns as log(1 + x)."""
    out.mkdir(parents=True, exist_ok=True)
    days = sorted(p.name for p in log.glob("day=*"))
    parts = {"train": days[:-2], "valid": days[-2:-1], "test": days[-1:]}
    split = {}
    for name, chosen in parts.items():
        files = [str(f) for d in chosen for f in sorted((log / d).glob("*.parquet"))]
        frame = pl.scan_parquet(files, hive_partitioning=False).with_columns(
            pl.col(DENSE).clip(lower_bound=0).log1p().cast(pl.Float32)
        )
        path = out / f"{name}.parquet"
        frame.sink_parquet(path)
        split[name] = (path, pl.scan_parquet(path).select(pl.len()).collect().item())
    return split


def engine_config(
    model: str,
    workers: int,
    split: dict[str, tuple[Path, int]],
    vocab: dict[str, int],
    epochs: int,
    run_dir: Path,
) -> dict[str, Any]:
    return {
        "name": f"{model.lower()}_w{workers}",
        "data": {k: str(v[0]) for k, v in split.items()},
        "features": {
            "label": "label",
            "user_id": "user_id",
            "timestamp": "timestamp",
            "dense": DENSE,
            "sparse": [{"name": c, "multi_valued": True} if c in MULTI else c for c in SPARSE],
        },
        "tables": [
            {
                "features": [c],
                "variant": "hash",
                "num_embeddings": vocab[c],
                "embedding_dim": DIM,
                "sharding": "table_wise",
                **({"pooling": "mean"} if c in MULTI else {}),
            }
            for c in SPARSE
        ],
        "model": {**MODELS[model]["engine"], "batch_norm": False, "dropout": 0.0},
        "train": {
            "workers": workers,
            "batch_size": BATCH,
            "epochs": epochs,
            "dense_optimizer": "adam",
            "dense_lr": DENSE_LR,
            "sparse_optimizer": "rowwise_adagrad",
            "sparse_lr": SPARSE_LR,
            # rank 0's logging intervals are what the training rate is read from
            "log_every": 10 if split["train"][1] // (BATCH * workers) >= 50 else 1,
            "run_dir": str(run_dir),
        },
    }


def engine_training_rate(run: Path, batch: int, workers: int) -> float:
    """Examples/s over rank 0's logging intervals, leaving out the first (it holds the
    stream's start: Ray Data's read tasks spinning up), the last (it may end on a short
    batch) and any that holds a validation."""
    intervals: list[tuple[int, float]] = []
    previous, validated = 0, False
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "valid_auc" in record:
            validated = True
        elif "examples_per_s" in record and not record.get("final"):
            n = (record["step"] - previous) * batch * workers
            if not validated and n > 0:
                intervals.append((n, n / record["examples_per_s"]))
            previous, validated = record["step"], False
    steady = intervals[1:-1]
    if not steady:
        raise RuntimeError(f"{run}: fewer than 3 logging intervals in metrics.jsonl")
    return sum(n for n, _ in steady) / sum(s for _, s in steady)
