"""`recsys train`: Ray Data streams the log to Ray Train workers that train a sharded model.

The driver locks the run folder, validates the config and the logs, splits them (`split.py`),
builds vocabularies, then starts a `TorchTrainer` (gloo on CPU, NCCL on GPU) whose workers
run `pipelines.train.worker`. Progress goes to the log (rank 0), to `ray.train.report` and
to `<run>/metrics.jsonl`; checkpoints go through Ray Train with `torch.distributed.checkpoint`
state. A failed worker restarts the group from the newest complete checkpoint, up to
`train.max_failures` times; running the same command again resumes an unfinished run.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import psutil
import ray
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from pipelines.build import (
    KEEP_FILE,
    VOCAB_FILE,
    planned_table_bytes,
    run_checkpoint,
    save_vocabularies,
)
from pipelines.console import (
    LOGS_DIR,
    TreeMemory,
    chatter_to,
    follow_run,
    raylet_messages_to_log,
    say,
    verbosity,
)
from pipelines.train.curve import CURVE_FILE, plot_learning_curve
from pipelines.train.ingest import TrainingIngest
from pipelines.train.meter import METRICS_FILE
from pipelines.train.run_folder import RunFolder
from pipelines.train.split import count_rows, make_split
from pipelines.train.stream import drop_bad_rows
from pipelines.train.worker import train_worker
from recsys.config import ConfigError, ExperimentConfig
from recsys.contract import BadRowCounts
from recsys.logs import read_validated
from tables.footprint import check_fits
from tables.vocab import build_vocabularies


def run_dir_of(cfg: ExperimentConfig) -> Path:
    return (Path(cfg.train.run_dir) / cfg.name).resolve()


def preflight(cfg: ExperimentConfig) -> BadRowCounts:
    """Validate every file of the training and validation logs before any worker starts.

    Under `on_bad_rows: error` the first bad row stops here with its file, column and row;
    under `skip` the counts are returned (the workers drop the same rows).
    """
    if cfg.data.train is None:
        raise ValueError("data.train: no training log given")
    skipped = BadRowCounts()
    for path in (cfg.data.train, cfg.data.valid):
        if path is None:
            continue
        for _ in read_validated(
            path,
            cfg.features,
            batch_size=262_144,
            on_bad_rows=cfg.data.on_bad_rows,
            skipped=skipped,
        ):
            pass
    return skipped


def start_ray(address: str | None, workers: int) -> None:
    """Join a cluster (`--address` or RAY_ADDRESS), else start an embedded local Ray.

    The local Ray advertises at least one logical CPU per training worker plus two, so
    Ray Data's read tasks are never starved by workers that hold every CPU (on a 2-core
    machine, 2 workers would otherwise deadlock the stream that feeds them). Unless
    --verbose, Ray neither forwards its workers' output nor sets up its own console
    logging (`pipelines.console`). A local Ray reads Parquet footers through one actor,
    not Ray Data's default pool of up to 32 (each a Python process of ~190 MiB; on the
    demo 4 of them held 771 MiB of the run's peak): the actor's own I/O threads read the
    footers concurrently.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    verbose = verbosity() == "verbose"
    quiet = {"log_to_driver": verbose, "configure_logging": verbose}
    raylet_messages_to_log()
    if address:
        ray.init(address=address, **quiet)
    else:
        cpus = max(os.cpu_count() or 1, workers + 2)
        # the local raylet, and every Ray process it starts, inherits this environment
        os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
        ray.init(num_cpus=cpus, include_dashboard=False, **quiet)
    ray.data.DataContext.get_current().enable_progress_bars = False


RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train v2's name


def _check_host_memory(cfg: ExperimentConfig, run_dir: Path) -> None:
    """Refuse, before Ray starts, tables that this host cannot hold (the workers of a
    local run share it), with the sizes; the planner is told the same memory per rank."""
    sizes = planned_table_bytes(cfg, run_dir)
    try:
        check_fits(sizes, psutil.virtual_memory().available, "this host")
    except MemoryError as err:
        raise ConfigError(f"tables: {err}") from None


def train(
    cfg: ExperimentConfig,
    address: str | None = None,
    resume: bool = False,
    folder: RunFolder | None = None,
) -> dict[str, Any]:
    """Train an experiment; returns the final metrics and where the run lives.

    An unfinished run of the same name resumes; a finished one only with `resume`.
    `folder` is the run's folder when the caller holds it (locked and checked) across
    several calls, as `pipelines.train.follow` does, one call per new partition.
    """
    use_gpu = cfg.train.device == "cuda" or (
        cfg.train.device == "auto" and torch.cuda.is_available()
    )
    if not use_gpu and cfg.train.sparse_optimizer == "adam":
        raise ConfigError(
            "train.sparse_optimizer: 'adam' has no fused fbgemm kernel on CPU; "
            "use rowwise_adagrad, adagrad or sgd"
        )
    run_dir = run_dir_of(cfg)
    if cfg.optembed.stage == "retrain" and not (run_dir / KEEP_FILE).exists():
        raise ConfigError(
            f"optembed.stage: retrain needs the supernet's row masks in {run_dir / KEEP_FILE}; "
            "start retraining with `recsys retrain CONF`"
        )
    started = time.perf_counter()
    with RunFolder(run_dir, cfg, resume) if folder is None else nullcontext(folder) as folder:
        chatter_to(run_dir / LOGS_DIR / "driver.log")
        say(f"train {cfg.name}: {cfg.model.name}, {cfg.train.workers} worker(s), run {run_dir}")
        skipped = preflight(cfg)
        split = make_split(cfg)
        rows, valid_rows = count_rows(split)
        say(f"logs checked: {rows:,} training rows, {valid_rows or 0:,} validation rows")
        if not (run_dir / VOCAB_FILE).exists():
            vocabularies = build_vocabularies(cfg, split.training_rows())
            save_vocabularies(run_dir, vocabularies)
            say(f"vocabularies built for {len(vocabularies)} table(s)")
        if not (address or os.environ.get("RAY_ADDRESS")):  # a cluster's hosts are not this one
            _check_host_memory(cfg, run_dir)
        folder.write_config()
        # Ray Train's snapshot lists every checkpoint it was given, also those the workers
        # pruned since; a new controller refuses to start on it. A resumed run picks its
        # checkpoint from the run folder itself (worker.train_worker), so it is dropped.
        (run_dir / RAY_CHECKPOINT_SNAPSHOT).unlink(missing_ok=True)
        start_ray(address, cfg.train.workers)
        say(f"Ray started in {time.perf_counter() - started:.1f} s; training")
        datasets = split.datasets(cfg.features.column_names())
        if skipped.total:
            datasets = {k: drop_bad_rows(d, cfg.features) for k, d in datasets.items()}
            # the training rows left: the bad ones lie in either split, which one is
            # known only by reading them (one pass, only when the preflight found some)
            rows = datasets["train"].count()
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={
                "config": cfg.model_dump(mode="json"),
                "run_dir": str(run_dir),
                "skipped_rows": skipped.total,
                "has_valid": split.valid_files is not None,
                # every row an epoch should read (bad ones are dropped before the split)
                "train_rows": rows,
                "verbose": verbosity() == "verbose",
            },
            scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=use_gpu),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            datasets=datasets,
            dataset_config=TrainingIngest(),
            run_config=RunConfig(
                name=cfg.name,
                storage_path=str(run_dir.parent),
                # Every checkpoint is kept by Ray; the workers delete all but the newest
                # `keep_checkpoints` and the best (Ray's own policy cannot keep both).
                checkpoint_config=CheckpointConfig(),
                failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            ),
        )
        memory = TreeMemory()
        with follow_run(run_dir, METRICS_FILE, memory):
            result = trainer.fit()
        plot_learning_curve(run_dir / METRICS_FILE, run_dir / CURVE_FILE)
        summary = {
            "run_dir": str(run_dir),
            "checkpoint": str(run_checkpoint(run_dir)),  # the best, which readers take
            "metrics": result.metrics,
            "skipped_rows": skipped.as_dict(),
            "seconds": time.perf_counter() - started,
            "peak_tree_rss_bytes": memory.peak,
            "logs": str(run_dir / LOGS_DIR),
        }
        folder.write_result(summary)
    return summary
