"""Validation during training: the early-stopping monitor, which checkpoints are kept and
which one readers take, the config keys that need a validation split, and a real run that
stops early and hands `evaluate` its best checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines.build import load_trained, run_checkpoint
from pipelines.evaluate import evaluate
from pipelines.train.checkpoint import (
    PROGRESS_FILE,
    checkpoint_name,
    prune_checkpoints,
    save_checkpoint,
)
from pipelines.train.curve import CURVE_FILE
from pipelines.train.validation import Monitor
from recsys.config import load_config
from tests.pipelines.runs import HELD_OUT_DAY, SMALL_CTR, module_run, run_config


def _monitor(repo: Path, *overrides: str, saved: dict | None = None) -> Monitor:
    return Monitor.of(load_config(repo / "conf" / "demo.yaml", list(overrides)), saved)


def test_the_monitor_stops_after_patience_validations_without_a_better_value(
    repo: Path,
) -> None:
    monitor = _monitor(repo, "train.patience=2")
    aucs = [0.60, 0.65, 0.64, 0.66, 0.66, 0.65]  # 0.66 twice: equal is not better
    best = [monitor.update(step, {"auc": a}, f"c{step}") for step, a in enumerate(aucs)]
    assert best == [True, True, False, True, False, False]
    assert (monitor.best_step, monitor.best_value, monitor.best_checkpoint) == (3, 0.66, "c3")
    assert monitor.should_stop and monitor.since_best == 2


def test_logloss_is_monitored_downwards_and_the_state_survives_a_resume(repo: Path) -> None:
    monitor = _monitor(repo, "train.monitor=logloss", "train.patience=3")
    for step, loss in enumerate([0.50, 0.45, 0.47]):
        monitor.update(step, {"logloss": loss, "auc": 0.7}, f"c{step}")
    assert monitor.best_step == 1 and not monitor.should_stop
    resumed = _monitor(repo, "train.monitor=logloss", "train.patience=1", saved=monitor.state())
    assert (resumed.best_step, resumed.since_best, resumed.history) == (1, 1, monitor.history)
    assert resumed.patience == 1 and resumed.should_stop  # a resume may set a new patience


def test_an_undefined_metric_never_improves(repo: Path) -> None:
    monitor = _monitor(repo, "train.monitor=gauc", "train.patience=1")
    assert not monitor.update(5, {"auc": 0.7, "gauc": None}, "c5")
    assert monitor.best_checkpoint is None and monitor.should_stop


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.valid_days=0", "train.patience=2"], r"train.patience: no validation split"),
        (["data.valid_days=0", "train.validate_every=9"], r"train.validate_every: no valid"),
        (["train.monitor=gauc", "eval.gauc=false"], r"train.monitor: 'gauc' needs"),
        (["train.monitor=ctr"], r"train.monitor"),
    ],
)
def test_validation_keys_without_a_split_are_refused(
    repo: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(repo / "conf" / "demo.yaml", overrides)


def _checkpoint(run: Path, step: int, best: str | None = None) -> Path:
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    directory = run / checkpoint_name(step, "aaaaaa")
    directory.mkdir(parents=True)
    progress = {"step": step, "monitor": {"best_checkpoint": best}}
    save_checkpoint(directory, model, optimizer, progress)
    return directory


def test_pruning_keeps_the_newest_and_the_best(tmp_path: Path) -> None:
    best = _checkpoint(tmp_path, 2)
    others = [_checkpoint(tmp_path, s, best.name) for s in (4, 6, 8)]
    debris = tmp_path / checkpoint_name(5, "bbbbbb")  # a killed group's, never completed
    debris.mkdir()
    writing = tmp_path / checkpoint_name(9, "aaaaaa")  # the one other ranks still write
    writing.mkdir()
    deleted = prune_checkpoints(tmp_path, keep=2, protect=best.name)
    assert sorted(deleted) == sorted([others[0], debris])
    left = sorted(p.name for p in tmp_path.glob("checkpoint_*"))
    assert left == sorted(p.name for p in (best, others[1], others[2], writing))


def test_readers_take_the_best_checkpoint_unless_told_newest(tmp_path: Path) -> None:
    best = _checkpoint(tmp_path, 3)
    newest = _checkpoint(tmp_path, 6, best.name)
    assert run_checkpoint(tmp_path) == best
    assert run_checkpoint(tmp_path, newest=True) == newest
    assert run_checkpoint(newest) == newest  # a checkpoint folder is taken as named


def _config(tmp: Path):
    return run_config(
        "demo.yaml",
        tmp,
        "name=early",
        *SMALL_CTR,
        "train.workers=1",
        "train.epochs=3",
        "train.dense_lr=0.02",  # overfits the small log within a few validations
        "train.validate_every=4",
        "train.patience=2",
        "train.lr_decay=0.5",
        "train.keep_checkpoints=1",
    )


trained = module_run(_config, rows=16_000)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_stops_early_and_readers_get_its_best_checkpoint(trained) -> None:
    cfg, tmp, result = trained
    run = Path(result["run_dir"])
    metrics = result["metrics"]
    validations = [r for r in _records(run) if "valid_auc" in r and "final" not in r]
    aucs = [r["valid_auc"] for r in validations]
    best = max(range(len(aucs)), key=aucs.__getitem__)
    assert metrics["stopped_early"] and len(aucs) - 1 - best == cfg.train.patience
    assert metrics["step"] < 3 * 11  # three epochs of ~11 steps were not all trained
    # Reduce on plateau: each validation without a gain halves every learning rate.
    misses = [sum(not r["best"] for r in validations[: i + 1]) for i in range(len(aucs))]
    assert [r["lr_scale"] for r in validations] == [0.5**m for m in misses]
    assert (metrics["best_step"], metrics["best_valid_auc"]) == (
        validations[best]["step"],
        aucs[best],
    )
    # The best and the newest checkpoint are what is left (keep_checkpoints=1).
    chosen = run_checkpoint(run)
    assert json.loads((chosen / PROGRESS_FILE).read_text())["step"] == metrics["best_step"]
    assert result["checkpoint"] == str(chosen)
    assert len(list(run.glob("checkpoint_step*"))) == 2
    # `evaluate` scores the best checkpoint: the held-out day is the validation split.
    report = evaluate(run, tmp / "log" / HELD_OUT_DAY)
    assert report["step"] == metrics["best_step"]
    assert report["auc"] == pytest.approx(metrics["best_valid_auc"], abs=1e-6)
    assert report["logloss"] == pytest.approx(validations[best]["valid_logloss"], abs=1e-6)
    assert load_trained(run, newest=True)[2]["step"] == metrics["step"]
    assert (run / CURVE_FILE).stat().st_size > 10_000
