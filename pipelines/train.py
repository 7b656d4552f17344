"""`recsys train`: Ray Data streams the log to Ray Train workers that train a sharded model.

The driver validates the config and the log, splits by time, builds vocabularies, then
starts a `TorchTrainer` (gloo on CPU, NCCL on GPU). Each worker builds the model with its
tables on the meta device, shards them with torchrec's `DistributedModelParallel`, and
trains on its equal share of the stream. Progress goes to the log (rank 0), to
`ray.train.report` and to `<run>/metrics.jsonl`; checkpoints go through Ray Train with
`torch.distributed.checkpoint` state, and running the same command again resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
import yaml
from ray.train import CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from tqdm import tqdm

from pipelines.build import (
    KEEP_FILE,
    build_model,
    load_keep_masks,
    load_vocabularies,
    save_vocabularies,
    table_sharding,
)
from pipelines.checkpoint import load_checkpoint, save_checkpoint
from pipelines.resume import DataPosition, position, resume_position
from pipelines.split import validation_cutoff
from recsys.batch import BatchConverter
from recsys.config import ConfigError, ExperimentConfig
from recsys.contract import BadRowCounts, validate_table
from recsys.logs import parquet_files, read_validated
from recsys.metrics import auc, evaluate_predictions
from tables.collisionless import (
    bind_ownership,
    collisionless_transforms,
    format_report,
    table_report,
)
from tables.sharding import combined_optimizer, shard_model
from tables.vocab import build_vocabularies

METRICS_FILE = "metrics.jsonl"


# ----------------------------------------------------------------------------- driver


def run_dir_of(cfg: ExperimentConfig) -> Path:
    return (Path(cfg.train.run_dir) / cfg.name).resolve()


def preflight(cfg: ExperimentConfig) -> BadRowCounts:
    """Validate every file of the training log before any worker starts.

    Under `on_bad_rows: error` the first bad row stops here with its file, column and row;
    under `skip` the counts are returned (the workers drop the same rows).
    """
    if cfg.data.train is None:
        raise ValueError("data.train: no training log given")
    skipped = BadRowCounts()
    for _ in read_validated(
        cfg.data.train,
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
    machine, 2 workers would otherwise deadlock the stream that feeds them).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, workers + 2), include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


def _datasets(cfg: ExperimentConfig, cutoff: int | None) -> dict[str, ray.data.Dataset]:
    files = [str(p) for p in parquet_files(cfg.data.train)]  # type: ignore[arg-type]
    ts = cfg.features.timestamp
    log = ray.data.read_parquet(files, columns=cfg.features.column_names(), partitioning=None)
    if cutoff is None:
        return {"train": log}
    return {
        "train": log.filter(expr=f"{ts} < {cutoff}"),
        "valid": log.filter(expr=f"{ts} >= {cutoff}"),
    }


def train(cfg: ExperimentConfig, address: str | None = None) -> dict[str, Any]:
    """Train an experiment; returns the final metrics and where the run lives."""
    use_gpu = cfg.train.device == "cuda" or (
        cfg.train.device == "auto" and torch.cuda.is_available()
    )
    if not use_gpu and cfg.train.sparse_optimizer == "adam":
        raise ConfigError(
            "train.sparse_optimizer: 'adam' has no fused fbgemm kernel on CPU; "
            "use rowwise_adagrad or sgd"
        )
    run_dir = run_dir_of(cfg)
    if cfg.optembed.stage == "retrain" and not (run_dir / KEEP_FILE).exists():
        raise ConfigError(
            f"optembed.stage: retrain needs the supernet's row masks in {run_dir / KEEP_FILE}; "
            "start retraining with `recsys retrain CONF`"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    skipped = preflight(cfg)
    cutoff = validation_cutoff(cfg, cfg.data.train)  # type: ignore[arg-type]
    if not (run_dir / "vocabularies.npz").exists():
        save_vocabularies(run_dir, build_vocabularies(cfg, cfg.data.train, cutoff))  # type: ignore[arg-type]

    start_ray(address, cfg.train.workers)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "run_dir": str(run_dir),
            "skipped_rows": skipped.total,
            "has_valid": cutoff is not None,
        },
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        datasets=_datasets(cfg, cutoff),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=str(run_dir.parent),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    with _progress_bar(run_dir / METRICS_FILE, enabled=sys.stderr.isatty()):
        result = trainer.fit()
    summary = {
        "run_dir": str(run_dir),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "metrics": result.metrics,
        "skipped_rows": skipped.as_dict(),
    }
    (run_dir / "result.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


# ----------------------------------------------------------------------------- workers


class _Progress:
    """Rank-0 bookkeeping: running loss/AUC over recent batches, throughput, metrics.jsonl."""

    def __init__(self, run_dir: Path, world: int, window: int = 20) -> None:
        self.path = run_dir / METRICS_FILE
        self.world = world
        self.window = window
        self.scores: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.losses: list[float] = []
        self.examples = 0
        self.started = time.perf_counter()

    def add(self, logits: torch.Tensor, labels: torch.Tensor, loss: float) -> None:
        self.scores = [*self.scores[-self.window + 1 :], logits.detach().float().cpu().numpy()]
        self.labels = [*self.labels[-self.window + 1 :], labels.cpu().numpy()]
        self.losses = [*self.losses[-self.window + 1 :], loss]
        self.examples += len(labels) * self.world

    def snapshot(self, step: int, epoch: int) -> dict[str, float]:
        labels = np.concatenate(self.labels)
        running_auc = auc(labels, np.concatenate(self.scores)) if 0 < labels.mean() < 1 else 0.5
        elapsed = time.perf_counter() - self.started
        return {
            "step": step,
            "epoch": epoch,
            "loss": float(np.mean(self.losses)),
            "running_auc": float(running_auc),
            "examples_per_s": self.examples / elapsed,
        }

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as out:
            out.write(json.dumps(record) + "\n")


def _dense_optimizer(cfg: ExperimentConfig) -> Any:
    kinds = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}
    kind = kinds[cfg.train.dense_optimizer]
    return lambda params: kind(params, lr=cfg.train.dense_lr, weight_decay=cfg.train.weight_decay)


def _own_optimizers(cfg: ExperimentConfig) -> dict[str, Any]:
    """Parameters trained apart from the dense optimizer: optembed's thresholds, by the
    paper's plain SGD at their own learning rate."""
    if not cfg.uses_optembed:
        return {}
    lr = cfg.optembed.threshold_lr
    return {
        "thresholds": (
            lambda name: name.endswith("pooling.thresholds.threshold"),
            lambda params: torch.optim.SGD(params, lr=lr),
        )
    }


def _device(cfg: ExperimentConfig) -> torch.device:
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", ray.train.get_context().get_local_rank())
    return torch.device("cpu")


def _arrow_batches(shard: Any, cfg: ExperimentConfig) -> Any:
    """The worker's share of the stream as (rows read, validated Arrow table) pairs."""
    for table in shard.iter_batches(
        batch_size=cfg.train.batch_size, batch_format="pyarrow", prefetch_batches=2
    ):
        clean, _ = validate_table(
            table, cfg.features, "Ray Data stream", on_bad_rows=cfg.data.on_bad_rows
        )
        yield table.num_rows, clean


def _gather_predictions(
    model: torch.nn.Module, shard: Any, cfg: ExperimentConfig, device: torch.device
) -> dict[str, np.ndarray]:
    """Predict the worker's validation share; every rank receives everyone's predictions."""
    convert = BatchConverter(cfg.features)
    probs, labels, groups = [], [], []
    model.eval()
    with torch.no_grad():
        for _, table in _arrow_batches(shard, cfg):
            batch = convert(table).to(device)
            probs.append(torch.sigmoid(model(batch)).float().cpu().numpy())
            labels.append(batch.labels.cpu().numpy())
            if batch.group is not None:
                groups.append(batch.group.cpu().numpy())
    model.train()
    local = {
        "probs": np.concatenate(probs) if probs else np.zeros(0, np.float32),
        "labels": np.concatenate(labels) if labels else np.zeros(0, np.float32),
        "groups": np.concatenate(groups) if groups else None,
    }
    everyone: list[dict[str, Any]] = [{}] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    merged = {k: np.concatenate([p[k] for p in everyone]) for k in ("probs", "labels")}
    merged["groups"] = (
        np.concatenate([p["groups"] for p in everyone]) if local["groups"] is not None else None
    )
    return merged


@contextlib.contextmanager
def _progress_bar(metrics: Path, enabled: bool) -> Iterator[None]:
    """On a terminal, a bar on the driver that follows rank 0's `metrics.jsonl`.

    The workers' own output reaches the driver line by line, which no bar survives; the
    metrics file is what rank 0 writes at every log interval anyway.
    """
    if not enabled:
        yield
        return
    stop = threading.Event()
    start = metrics.stat().st_size if metrics.exists() else 0

    def follow() -> None:
        with tqdm(desc=f"train {metrics.parent.name}", unit="step") as bar:
            offset = start
            while not stop.wait(1.0):
                if not metrics.exists():
                    continue
                with metrics.open() as f:
                    f.seek(offset)
                    lines = f.readlines()
                    offset = f.tell()
                for line in lines:
                    record = json.loads(line)
                    if "step" in record:
                        bar.update(record["step"] - bar.n)
                        bar.set_postfix({k: f"{record[k]:.4g}" for k in _BAR_FIELDS if k in record})

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


_BAR_FIELDS = ("loss", "running_auc", "examples_per_s")


def _tables_of(model: torch.nn.Module) -> torch.nn.Module:
    """The embedding layer whose collisionless tables report stats: a CTR model's pooled
    one, a sequence model's sequence tables."""
    sparse = getattr(model, "sparse", None)
    return sparse if sparse is not None else model.sequence  # type: ignore[return-value]


@torch.no_grad()
def _average_norm_statistics(model: torch.nn.Module) -> None:
    """Average the BatchNorm running statistics over the workers (a collective call).

    torchrec's DMP wraps the dense part in DDP without buffer broadcasts, so each worker's
    BatchNorm layers track the statistics of its own data. Averaging them before validation
    and before every checkpoint makes all workers score with, and every checkpoint hold,
    the same statistics, so `recsys evaluate` reproduces the validation training reports.
    """
    if dist.get_world_size() == 1:
        return
    stats = [
        buffer
        for module in model.modules()
        if isinstance(module, torch.nn.modules.batchnorm._NormBase) and module.track_running_stats
        for buffer in (module.running_mean, module.running_var)
        if buffer is not None
    ]
    if not stats:
        return
    flat = torch.cat([s.reshape(-1) for s in stats])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for s, averaged in zip(stats, flat.split([s.numel() for s in stats]), strict=True):
        s.copy_(averaged.view_as(s))


def _report(metrics: dict[str, Any], model: Any, optimizer: Any, progress: dict[str, Any]) -> None:
    _average_norm_statistics(model)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp), model, optimizer, progress)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_step{progress['step']:08d}",
        )


def _train_worker(loop_config: dict[str, Any]) -> None:
    cfg = ExperimentConfig.model_validate(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = _device(cfg)
    torch.manual_seed(cfg.train.seed)

    model = build_model(
        cfg,
        load_vocabularies(run_dir),
        table_device=torch.device("meta"),
        keep=load_keep_masks(run_dir),
    )
    # optembed's threshold term (CTR models only: sequence models have no `sparse`)
    regularizer = getattr(getattr(model, "sparse", None), "regularizer", None)
    collisionless = any(collisionless_transforms(model))
    # IDs (and table stats) travel between ranks over a gloo group, even next to NCCL.
    gloo = dist.new_group(backend="gloo") if collisionless else None
    if gloo is not None:
        bind_ownership(model, rank, gloo)
    t = cfg.train
    dmp = shard_model(
        model,
        sharding=table_sharding(model),
        optimizer=t.sparse_optimizer,
        lr=t.sparse_lr,
        pg=dist.GroupMember.WORLD,
        device=device,
    )
    optimizer = combined_optimizer(
        dmp, t.sparse_optimizer, t.sparse_lr, _dense_optimizer(cfg), _own_optimizers(cfg)
    )

    meter = _Progress(run_dir, world)
    progress = position(0, 0, 0, 0, world, t.batch_size)
    start = DataPosition(0)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            progress = load_checkpoint(Path(directory), dmp, optimizer)
        start = resume_position(progress, world, t.batch_size)
        if rank == 0:
            print(f"resumed from {checkpoint.path} at step {progress['step']}", flush=True)
            if start.note:
                print(f"data position: {start.note}", flush=True)
                meter.write({"resumed_step": progress["step"], "data_position": start.note})

    loss_fn = torch.nn.BCEWithLogitsLoss()
    convert = BatchConverter(cfg.features)
    train_shard = ray.train.get_dataset_shard("train")
    valid_shard = ray.train.get_dataset_shard("valid") if loop_config["has_valid"] else None
    last_metrics: dict[str, Any] = {}
    # A due checkpoint is written just before the next step, so that the end of training
    # (which always checkpoints) never writes the same step twice.
    checkpoint_due = False
    resume_epoch = progress["epoch"]
    for epoch in range(resume_epoch, cfg.train.epochs):
        skip = start.batches if epoch == resume_epoch else 0
        pulled = 0  # rows this worker read in the epoch, skipped ones included
        for i, (rows, table) in enumerate(_arrow_batches(train_shard, cfg)):
            pulled += rows
            if i < skip:
                continue  # consumed before the checkpoint this run resumed from
            if checkpoint_due:
                _report(meter.snapshot(progress["step"], epoch), dmp, optimizer, progress)
                checkpoint_due = False
            batch = convert(table).to(device, non_blocking=True)
            logits = dmp(batch)
            loss = loss_fn(logits, batch.labels)
            penalty = regularizer() if regularizer is not None else None
            objective = loss if penalty is None else loss + penalty
            optimizer.zero_grad()
            objective.backward()
            optimizer.step()
            progress = position(progress["step"] + 1, epoch, i + 1, pulled, world, t.batch_size)
            meter.add(logits, batch.labels, float(loss))
            step = progress["step"]
            if step % cfg.train.log_every == 0:
                last_metrics = meter.snapshot(step, epoch)
                tables = table_report(_tables_of(dmp.module), gloo) if collisionless else {}
                if rank == 0:
                    print(" ".join(f"{k}={v:.4g}" for k, v in last_metrics.items()), flush=True)
                    if tables:
                        print(format_report(tables), flush=True)
                    meter.write({**last_metrics, **({"tables": tables} if tables else {})})
            checkpoint_due = bool(t.checkpoint_every) and step % t.checkpoint_every == 0
            if cfg.train.max_steps and step >= cfg.train.max_steps:
                break  # mid-epoch: the position stays, so a longer run continues the epoch
        else:
            progress = position(progress["step"], epoch + 1, 0, 0, world, t.batch_size)
            continue
        break

    final = {**meter.snapshot(progress["step"], progress["epoch"])} if meter.labels else {}
    if valid_shard is not None:
        _average_norm_statistics(dmp)
        valid = _gather_predictions(dmp, valid_shard, cfg, device)
        if len(valid["labels"]):
            scores = evaluate_predictions(valid["labels"], valid["probs"], valid["groups"])
            final.update({f"valid_{k}": v for k, v in scores.items()})
    final["skipped_rows"] = loop_config["skipped_rows"]
    if collisionless:  # counters since the last log line; sizes as at the end
        final["tables"] = table_report(_tables_of(dmp.module), gloo)
    if rank == 0:
        meter.write({"final": True, **final})
        print("final " + json.dumps(final, default=float), flush=True)
    _report(final, dmp, optimizer, progress)
