"""The training loop of one Ray Train worker (rank): build, shard, resume, train, report.

Each worker builds the model with its tables on the meta device, shards them with
torchrec's `DistributedModelParallel`, and trains on its equal share of the stream.

A resumed worker continues exactly where the checkpoint stopped: it restores model,
dense and fused optimizer state, table state and its RNG states, re-reads its epoch's
stream in the same seeded order (Ray Data in order, then a local shuffle buffer seeded by
the run's seed, the epoch and the rank) and skips the batches consumed before the
checkpoint, so on one worker the weights equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist

from pipelines.build import build_model, load_keep_masks, load_vocabularies
from pipelines.console import RunLines, worker_output
from pipelines.train.checkpoint import (
    checkpoint_name,
    checkpoint_step,
    incomplete_reason,
    load_checkpoint,
    newest_complete,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)
from pipelines.train.meter import Meter
from pipelines.train.resume import DataPosition, position, resume_position
from pipelines.train.stream import arrow_batches, unread_rows
from pipelines.train.validation import Monitor, set_lr_scale, validate
from recsys.batch import BatchConverter
from recsys.config import ExperimentConfig
from tables.collisionless.report import format_report, table_report
from tables.collisionless.transform import bind_ownership, collisionless_transforms
from tables.sharding import combined_optimizer, dense_parameters, shard_model
from tables.transforms import unknown_ids


def _dense_optimizer(cfg: ExperimentConfig) -> Any:
    kinds = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}
    kind = kinds[cfg.train.dense_optimizer]
    return lambda params: kind(params, lr=cfg.train.dense_lr, weight_decay=cfg.train.dense_l2)


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


VALID_SHOWN = ("step", "valid_auc", "valid_logloss", "valid_gauc")


def _device(cfg: ExperimentConfig) -> torch.device:
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", ray.train.get_context().get_local_rank())
    return torch.device("cpu")


def shuffle_seed(cfg: ExperimentConfig, epoch: int, rank: int) -> int:
    """The local shuffle's seed: a new order every epoch and rank, the same on every run."""
    return int(np.random.SeedSequence([cfg.train.seed, epoch, rank]).generate_state(1)[0])


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


def _group_token() -> str:
    """A name part shared by this worker group's checkpoints (rank 0 draws it).

    A restarted group may resume from an older checkpoint than the newest folder on disk
    (one left incomplete); its own checkpoints of the same steps get new folders instead
    of writing into that one.
    """
    token = [secrets.token_hex(3) if dist.get_rank() == 0 else ""]
    dist.broadcast_object_list(token, src=0)
    return token[0]


def _report(
    metrics: dict[str, Any],
    model: Any,
    optimizer: Any,
    progress: dict[str, Any],
    token: str,
    monitor: Monitor,
    keep: int,
    run_dir: Path,
) -> None:
    """Checkpoint the training state with `metrics`; then rank 0 deletes the checkpoints
    beyond the newest `keep` and the best one (Ray keeps every one it is given)."""
    _average_norm_statistics(model)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp), model, optimizer, {**progress, "monitor": monitor.state()})
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=checkpoint_name(progress["step"], token),
        )
    if dist.get_rank() == 0:
        prune_checkpoints(run_dir, keep, protect=monitor.best_checkpoint)


def _unknown_ids(model: torch.nn.Module, before: dict[str, int]) -> dict[str, int]:
    """Per feature, the training IDs read as the out-of-vocabulary row since the run began
    (a collective call): the ranks' counts since this start, plus `before`, what the
    checkpoint this start resumed from had counted."""
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, unknown_ids(model))
    total = dict(before)
    for part in parts:
        for feature, n in part.items():
            total[feature] = total.get(feature, 0) + n
    return total


def _line(figures: dict[str, Any]) -> str:
    """`step=40 loss=0.5123 ... examples_per_s=35,440`: rates in whole units."""
    return " ".join(
        f"{k}={v:,.0f}" if k.endswith("_per_s") else f"{k}={v:.4g}" for k, v in figures.items()
    )


def _resume_from(run_dir: Path) -> Path | None:
    """The complete checkpoint of the highest step among Ray's (after a worker failure)
    and the run folder's, else None (a new run). Rank 0 chooses, every rank takes it.

    Ray's may be older than the newest on disk: a checkpoint reported just before a worker
    died is complete on disk before the controller has registered it.
    """
    choice: list[str | None] = [None]
    if dist.get_rank() == 0:
        candidates = []
        given = ray.train.get_checkpoint()
        if given is not None:
            reason = incomplete_reason(Path(given.path))
            if reason is None:
                candidates.append(Path(given.path))
            else:
                RunLines(run_dir, True)(f"skipping incomplete checkpoint {given.path}: {reason}")
        with contextlib.suppress(FileNotFoundError):  # a new run: none written yet
            candidates.append(newest_complete(run_dir))
        if candidates:
            choice[0] = str(max(candidates, key=checkpoint_step))
    dist.broadcast_object_list(choice, src=0)
    return None if choice[0] is None else Path(choice[0])


def train_worker(loop_config: dict[str, Any]) -> None:
    """One rank's run: resume or start, train the epochs (validating at each epoch's end
    and every `train.validate_every` steps, stopping early when `train.patience`
    validations bring no better `train.monitor`), checkpoint, report the final figures."""
    cfg = ExperimentConfig.model_validate(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    worker_output(run_dir, rank, loop_config["verbose"])
    say = RunLines(run_dir, enabled=rank == 0)  # the lines the driver's console shows
    device = _device(cfg)
    torch.manual_seed(cfg.train.seed)

    model = build_model(
        cfg,
        load_vocabularies(run_dir),
        table_device=torch.device("meta"),
        keep=load_keep_masks(run_dir),
    )
    collisionless = any(collisionless_transforms(model))
    # IDs (and table stats) travel between ranks over a gloo group, even next to NCCL.
    gloo = dist.new_group(backend="gloo") if collisionless else None
    if gloo is not None:
        bind_ownership(model, rank, gloo)
    t = cfg.train
    dmp = shard_model(
        model,
        sharding=model.table_sharding(),
        optimizer=t.sparse_optimizer,
        lr=t.sparse_lr,
        pg=dist.GroupMember.WORLD,
        device=device,
    )
    optimizer = combined_optimizer(
        dmp, t.sparse_optimizer, t.sparse_lr, _dense_optimizer(cfg), _own_optimizers(cfg)
    )
    initial_lrs = [group["lr"] for group in optimizer.param_groups]
    clipped = list(dense_parameters(dmp).values()) if t.clip_grad_norm else []
    token = _group_token()

    meter = Meter(run_dir, world)
    progress = position(0, 0, 0, 0, world, t.batch_size)
    start = DataPosition(0)
    source = _resume_from(run_dir)
    if source is not None:
        progress = load_checkpoint(source, dmp, optimizer)
        exact = restore_rng(source) and progress.get("world_size") == world
        start = resume_position(progress, world, t.batch_size)
        if rank == 0:
            how = "exactly" if exact and start.note is None else "approximately (see the log)"
            say(f"resumed {how} from {source} at step {progress['step']}")
            if start.note:
                say(f"data position: {start.note}")
            meter.write({"resumed_step": progress["step"], "checkpoint": str(source)})
            if start.note:
                meter.write({"data_position": start.note})

    monitor = Monitor.of(cfg, progress.get("monitor"))
    set_lr_scale(optimizer, initial_lrs, monitor.lr_scale, t.min_lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    convert = BatchConverter(cfg.features)
    train_shard = ray.train.get_dataset_shard("train")
    valid_shard = ray.train.get_dataset_shard("valid") if loop_config["has_valid"] else None

    unknown_before = dict(progress.get("unknown_ids", {}))  # counted before the resume

    def report(metrics: dict[str, Any]) -> None:
        state = {**progress, "unknown_ids": _unknown_ids(dmp, unknown_before)}
        _report(metrics, dmp, optimizer, state, token, monitor, t.keep_checkpoints, run_dir)

    def validation(step: int) -> None:
        """Score the validation split at `step`, whose checkpoint is then due."""
        _average_norm_statistics(dmp)
        scores = validate(dmp, valid_shard, cfg, device, arrow_batches)
        best = monitor.update(step, scores, checkpoint_name(step, token))
        set_lr_scale(optimizer, initial_lrs, monitor.lr_scale, t.min_lr)
        if rank == 0:
            record = {"step": step, **{f"valid_{k}": v for k, v in scores.items()}}
            meter.write({**record, "best": best, "lr_scale": monitor.lr_scale})
            shown = {k: v for k, v in record.items() if k in VALID_SHOWN}
            mark = " (best)" if best else f" ({monitor.since_best} since the best)"
            if not best and t.lr_decay:
                mark += f", learning rates x{monitor.lr_scale:.3g}"
            say(_line(shown) + mark)

    # A due checkpoint is written just before the next step, so that the end of training
    # (which always checkpoints) never writes the same step twice.
    checkpoint_due = False
    unread: int | None = None  # set at the end of each complete epoch
    resume_epoch = progress["epoch"]
    epochs = range(resume_epoch, t.epochs) if not monitor.should_stop else range(0)
    for epoch in epochs:
        skip = start.batches if epoch == resume_epoch else 0
        pulled = 0  # rows this worker read in the epoch
        stream = arrow_batches(train_shard, cfg, shuffle_seed(cfg, epoch, rank))
        for i, (rows, table) in enumerate(stream):
            pulled += rows
            if i < skip:
                continue  # consumed before the checkpoint this run resumed from
            if checkpoint_due:
                report(meter.snapshot(progress["step"], epoch))
                checkpoint_due = False
            batch = convert(table).to(device, non_blocking=True)
            logits = dmp(batch)
            loss = loss_fn(logits, batch.labels)
            penalty = model.regularizer()  # embedding L2, OptEmbed's threshold term
            objective = loss if penalty is None else loss + penalty
            optimizer.zero_grad()
            objective.backward()
            if clipped:
                torch.nn.utils.clip_grad_norm_(clipped, t.clip_grad_norm)
            optimizer.step()
            progress = position(progress["step"] + 1, epoch, i + 1, pulled, world, t.batch_size)
            meter.add(logits, batch.labels, float(loss))
            step = progress["step"]
            if step % t.log_every == 0:
                interval = meter.snapshot(step, epoch)
                tables = table_report(_tables_of(dmp.module), gloo) if collisionless else {}
                if rank == 0:
                    say(_line(interval))
                    if tables:
                        say(format_report(tables))
                    meter.write({**interval, **({"tables": tables} if tables else {})})
            checkpoint_due = bool(t.checkpoint_every) and step % t.checkpoint_every == 0
            if valid_shard is not None and t.validate_every and step % t.validate_every == 0:
                validation(step)
                checkpoint_due = True
                if monitor.should_stop:
                    break
            if t.max_steps and step >= t.max_steps:
                break  # mid-epoch: the position stays, so a longer run continues the epoch
        else:
            unread = unread_rows(pulled, loop_config["train_rows"], device)
            if unread and rank == 0:
                meter.write({"epoch": epoch, "rows_unread": unread})
                say(
                    f"epoch {epoch}: {unread:,} of {loop_config['train_rows']:,} training "
                    f"rows unread (Ray Data's equal split over {world} workers drops them)"
                )
            progress = position(progress["step"], epoch + 1, 0, 0, world, t.batch_size)
            if valid_shard is not None and monitor.validated_step != progress["step"]:
                validation(progress["step"])
                checkpoint_due = True
            if not monitor.should_stop:
                continue
        break

    step = progress["step"]
    if valid_shard is not None and monitor.validated_step != step:
        validation(step)  # the last step, when no epoch's end or interval validated it
    final = {**meter.snapshot(step, progress["epoch"])} if meter.labels else {}
    if monitor.history:
        last = monitor.history[-1]
        final.update({f"valid_{k}": v for k, v in last.items() if k != "step"})
        final.update(
            {
                "best_step": monitor.best_step,
                f"best_valid_{monitor.metric}": monitor.best_value,
                "stopped_early": monitor.should_stop,
            }
        )
    final["skipped_rows"] = loop_config["skipped_rows"]
    final["train_rows"] = loop_config["train_rows"]
    if unread is not None:
        final["rows_unread_per_epoch"] = unread
    unknown = _unknown_ids(dmp, unknown_before)
    if any(unknown.values()):
        final["unknown_ids"] = unknown
    if collisionless:  # counters since the last log line; sizes as at the end
        final["tables"] = table_report(_tables_of(dmp.module), gloo)
    if rank == 0:
        meter.write({"final": True, **final})
        print("final " + json.dumps(final, default=float), flush=True)  # the worker's log
    report(final)
