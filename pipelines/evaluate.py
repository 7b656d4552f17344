"""`recsys evaluate`: score a held-out log with a trained run, in this process or in
parallel Ray actors.

With one worker (the default) the log is validated and scored in one pass here, with no
Ray to start; with more, each Ray Data actor loads the model once (unsharded, CPU) and
scores the Arrow batches streamed to it. Both hand (probability, label, user) columns to
the same metrics, computed in bulk, then write `report.json` and `report.png` (ROC and
calibration).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipelines.build import load_trained
from recsys.batch import BatchConverter
from recsys.config import ConfigError
from recsys.contract import BadRowCounts, validate_table
from recsys.logs import parquet_files, read_validated
from recsys.metrics import evaluate_predictions, plot_report


class _Scorer:
    """A Ray Data actor: Arrow batch of the log -> Arrow batch of predictions."""

    def __init__(self, run: str, threads: int | None = 1) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.cfg, self.model, _ = load_trained(run)
        self.convert = BatchConverter(self.cfg.features)

    def __call__(self, table: pa.Table) -> pa.Table:
        f = self.cfg.features
        clean, _ = validate_table(
            table, f, "Ray Data stream", on_bad_rows=self.cfg.data.on_bad_rows
        )
        batch = self.convert(clean)
        probs = np.empty(0, np.float32)  # a batch of bad rows only leaves none to score
        if clean.num_rows:
            with torch.no_grad():
                probs = torch.sigmoid(self.model(batch)).numpy()
        columns = {"prob": probs, "label": batch.labels.numpy()}
        if batch.group is not None:
            columns["group"] = batch.group.numpy()
        return pa.table(columns)


def evaluate(
    run: str | Path,
    data: str | Path | None = None,
    workers: int = 1,
    report_dir: str | Path | None = None,
    newest: bool = False,
) -> dict[str, Any]:
    """Metrics of the run's best checkpoint (its newest with `newest`) on `data` (default:
    the run's data.test); also written as JSON and PNG into `report_dir`, by default a new
    folder per evaluation (`report_dir` in the result)."""
    cfg, _, progress = load_trained(run, newest)
    data = data or cfg.data.test
    if data is None:
        raise ConfigError(f"{run}: no data to score; pass --data or set data.test in the config")
    skipped = BadRowCounts()
    if workers == 1:
        scorer = _Scorer(progress["checkpoint"], threads=None)
        stream = read_validated(
            data, cfg.features, cfg.train.batch_size, cfg.data.on_bad_rows, skipped
        )
        scored = pa.concat_tables([scorer(table) for table in stream])
    else:
        for _ in read_validated(data, cfg.features, 262_144, cfg.data.on_bad_rows, skipped):
            pass  # every bad row named (file, column, row) or counted before scoring starts
        scored = _score_on_ray(data, cfg, progress["checkpoint"], workers)
    labels = scored.column("label").to_numpy()
    probs = scored.column("prob").to_numpy()
    groups = scored.column("group").to_numpy() if "group" in scored.column_names else None
    metrics = evaluate_predictions(labels, probs, groups if cfg.eval.gauc else None)
    out = Path(report_dir) if report_dir else _new_folder(cfg, progress)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "report_dir": str(out),
        "data": str(data),
        "checkpoint": progress["checkpoint"],
        "step": progress["step"],
        "skipped_rows": skipped.as_dict(),
        **metrics,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    plot_report(metrics, labels, probs, out / "report.png")
    return report


def _new_folder(cfg: Any, progress: dict[str, Any]) -> Path:
    """`<eval.report_dir or run/eval>/step<k>-<UTC time>`: every evaluation keeps its own
    report, so a later one never overwrites an earlier one."""
    base = Path(cfg.eval.report_dir or Path(progress["run_dir"]) / "eval")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    folder = base / f"step{progress['step']}-{stamp}"
    n = 1
    while folder.exists():
        n += 1
        folder = base / f"step{progress['step']}-{stamp}-{n}"
    return folder


def _score_on_ray(data: str | Path, cfg: Any, checkpoint: str, workers: int) -> pa.Table:
    """(prob, label[, group]) of every row, scored by `workers` Ray Data actors.

    Ray and Ray Train's driver are imported here: one worker scores without them, and
    their imports cost seconds of every `recsys evaluate`."""
    import ray

    from pipelines.train.driver import start_ray

    start_ray(None, workers)
    files = [str(p) for p in parquet_files(data)]
    predictions = ray.data.read_parquet(
        files, columns=cfg.features.column_names(), partitioning=None
    ).map_batches(
        _Scorer,
        fn_constructor_args=(checkpoint,),  # the very checkpoint chosen by the caller
        batch_size=cfg.train.batch_size,
        batch_format="pyarrow",
        concurrency=workers,
    )
    return pa.concat_tables(predictions.iter_batches(batch_format="pyarrow", batch_size=None))
