"""`recsys train --follow DIR`: the online half of the loop (Monolith's real-time training).

The follower holds the run folder (`RunFolder`: one writer) for as long as it runs and
repeats: look at DIR, take the partitions that are complete (`pipelines.train.partitions`)
in order of their events, and train each through `driver.train`, resuming from the newest
complete checkpoint: one call per partition, for `train.epochs` more epochs on that
partition alone. Every `train.follow.export_every_s` it exports the newest checkpoint into
the folder `recsys serve --follow` reads, mostly as deltas (`pipelines.export.delta`).

Rows are never trained twice: `<run>/follow.json` records each partition trained (its
files, sizes, mtimes, rows and steps), the one in training and the exports written,
replaced atomically after every change. A restarted follower skips what is recorded; a
partition that was in training when the follower died trains on from the newest
checkpoint, whose data position (`pipelines.train.resume`) skips the batches it holds. A
trained partition whose files change afterwards stops the follower, naming the file.

SIGTERM stops it once the partition in training is trained and checkpointed (and the
newest checkpoint exported), as does SIGINT (Ctrl-C) between partitions; a second signal
stops it at once. While a partition trains, SIGINT is Ray Train's (`fit` takes it over):
it aborts training at once, and the next follower trains that partition on from its
newest checkpoint, whose data position skips the batches it holds.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.console import LOGS_DIR, chatter_to, say
from pipelines.export.writer import export
from pipelines.train.checkpoint import PROGRESS_FILE, newest_complete
from pipelines.train.driver import run_dir_of, train
from pipelines.train.partitions import Partition, Watcher, changed, look
from pipelines.train.run_folder import RunFolder
from recsys.config import ConfigError, ExperimentConfig
from recsys.serving.format import MANIFEST

STATE_FILE = "follow.json"


def check_follow_config(cfg: ExperimentConfig) -> None:
    """Refuse settings that cannot hold for a log that keeps growing, naming the key."""
    d, t = cfg.data, cfg.train
    if d.valid is None and d.split == "days" and d.valid_days > 0:
        raise ConfigError(
            "data.valid_days: train --follow trains each partition whole, and holding out "
            "its newest day would hold out a day's partition entirely; set "
            "data.valid_days=0, or give a fixed validation log as data.valid"
        )
    if t.max_steps is not None:
        raise ConfigError(
            "train.max_steps: train --follow trains every partition that comes; "
            "stop it with --max-partitions or --until"
        )
    if t.patience is not None:
        raise ConfigError(
            "train.patience: an early stop would end training for every later partition; "
            "train --follow takes no patience"
        )


def event_time(text: str) -> int:
    """--until: seconds since the epoch, or an ISO date or date-time (UTC unless given)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"--until {text!r}: give event time as seconds since the epoch or an ISO date "
            "(2026-01-03, 2026-01-03T12:00)"
        ) from None
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())


def _when(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


class FollowState:
    """What `<run>/follow.json` records: the followed folder, the partitions trained, the
    one in training (None between partitions) and the exports written."""

    def __init__(self, path: Path, root: Path) -> None:
        self.path = path
        doc: dict[str, Any] = {"root": str(root), "trained": [], "training": None, "exports": []}
        if path.exists():
            doc = json.loads(path.read_text())
            if doc["root"] != str(root):
                raise ConfigError(
                    f"{path}: this run follows {doc['root']}, not {root}; choose another name"
                )
        self.trained: list[dict[str, Any]] = doc["trained"]
        self.training: dict[str, Any] | None = doc["training"]
        self.exports: list[dict[str, Any]] = doc["exports"]
        self.root = root

    def save(self) -> None:
        doc = {
            "root": str(self.root),
            "trained": self.trained,
            "training": self.training,
            "exports": self.exports,
        }
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.path)  # a reader or a crash sees the old record or the new


def _record(part: Partition) -> dict[str, Any]:
    return {
        "name": part.name,
        "files": {name: list(stamp) for name, stamp in part.files.items()},
        "rows": part.rows,
        "first_event": part.first_event,
        "last_event": part.last_event,
    }


def _files(record: dict[str, Any]) -> dict[str, tuple[int, int]]:
    return {name: (int(s[0]), int(s[1])) for name, s in record["files"].items()}


class _Signals:
    """SIGINT/SIGTERM set `stop` (the follower ends after the partition in training); a
    second one raises KeyboardInterrupt. Installed only from the main thread."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def take_back(self) -> None:
        """Handle the signals again after Ray Train's `fit`, which takes SIGINT over."""
        for sig in self._previous:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt
        self.received = signum
        self.stop.set()

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Follower:
    """One `train --follow` session over a run folder it holds."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        folder: RunFolder,
        root: Path,
        address: str | None,
        signals: _Signals,
    ) -> None:
        self.cfg, self.folder, self.root, self.address = cfg, folder, root, address
        self.signals = signals
        self.follow = cfg.train.follow
        self.run_dir = folder.path
        self.state = FollowState(self.run_dir / STATE_FILE, root)
        self.watcher = Watcher(root, cfg.features.timestamp, self.follow.require_marker)
        self.export_dir = Path(self.follow.export_dir or self.run_dir / "exports").resolve()
        self.last_export = -math.inf  # monotonic time of this session's last export
        self.trained_now: list[str] = []

    # ------------------------------------------------------------------ the loop

    def run(self, max_partitions: int | None, until: int | None) -> str:
        """Train until stopped, then export what is not exported yet; returns why it stopped."""
        stopped = self._loop(max_partitions, until)
        self._export_if_due(final=True)
        return stopped

    def _loop(self, max_partitions: int | None, until: int | None) -> str:
        if self.state.training is not None:
            self._resume_interrupted()
        while True:
            if self.signals.stop.is_set():
                return "signal"
            now = look(self.root)
            self._check_trained(now)
            taken = {p["name"] for p in self.state.trained}
            for part in self.watcher.complete(now, taken):
                if self.signals.stop.is_set():
                    return "signal"
                self._train(part)
                self._export_if_due()
                if max_partitions is not None and len(self.trained_now) >= max_partitions:
                    return f"--max-partitions {max_partitions}"
                if until is not None and part.last_event is not None and part.last_event >= until:
                    return f"--until {_when(until)}"
            for line in self.watcher.news():
                say(line)
            self._export_if_due()
            self.signals.stop.wait(self.follow.poll_s)

    def _check_trained(self, now: dict[str, Any]) -> None:
        for record in self.state.trained:
            seen = now.get(record["name"])
            how = None if seen is None else changed(_files(record), seen.files)
            if how is not None:
                raise ValueError(
                    f"{self.root / record['name']}: partition trained on already, and since "
                    f"then {how}; the follower never reads rows twice: write new rows as a "
                    "new partition, or follow with a new run name"
                )

    # ------------------------------------------------------------------ training

    def _progress(self) -> dict[str, Any]:
        try:
            checkpoint = newest_complete(self.run_dir)
        except FileNotFoundError:
            return {"step": 0, "epoch": 0, "batches_in_epoch": 0}
        return json.loads((checkpoint / PROGRESS_FILE).read_text())

    def _train(self, part: Partition) -> None:
        progress = self._progress()
        if progress.get("batches_in_epoch", 0):
            raise ConfigError(
                f"{self.run_dir}: its newest checkpoint stops inside epoch {progress['epoch']} "
                f"(step {progress['step']}); finish that training first (recsys train "
                "--resume) before following new partitions"
            )
        record = {
            **_record(part),
            "start_epoch": progress["epoch"],
            "target_epochs": progress["epoch"] + self.cfg.train.epochs,
            "start_step": progress["step"],
        }
        self.state.training = record
        self.state.save()
        self._fit(record)

    def _resume_interrupted(self) -> None:
        """The partition in training when the last follower stopped: trained on from the
        newest checkpoint if its files are as they were, else dropped when none of its
        steps was checkpointed (it is new again), else refused."""
        record = self.state.training
        assert record is not None
        seen = look(self.root).get(record["name"])
        if seen is not None and seen.files == _files(record):
            say(f"partition {record['name']}: training on where the last follower stopped")
            self._fit(record)
            return
        progress = self._progress()
        if progress["epoch"] == record["start_epoch"] and not progress.get("batches_in_epoch"):
            say(f"partition {record['name']}: changed before any step on it was checkpointed")
            self.state.training = None
            self.state.save()
            return
        raise ValueError(
            f"{self.root / record['name']}: the partition changed while it was training "
            f"(checkpointed at step {progress['step']}); restore its files as they were, "
            "or follow with a new run name"
        )

    def _fit(self, record: dict[str, Any]) -> None:
        name = record["name"]
        say(
            f"partition {name}: {record['rows']:,} rows, events {_when(record['first_event'])}"
            f" to {_when(record['last_event'])}"
        )
        step = record["start_step"]
        if record["rows"]:
            doc = self.cfg.model_dump(mode="json")
            doc["data"]["train"] = str(self.root / name)
            doc["train"]["epochs"] = record["target_epochs"]
            part_cfg = ExperimentConfig.model_validate(doc)
            try:
                train(part_cfg, self.address, True, folder=self.folder)
            finally:
                self.signals.take_back()
            progress = self._progress()
            if progress["epoch"] < record["target_epochs"]:
                raise KeyboardInterrupt  # Ray Train aborted the fit (SIGINT while training)
            step = int(progress["step"])
        trained = {k: v for k, v in record.items() if k != "start_step"}
        self.state.trained.append({**trained, "steps": [record["start_step"], step]})
        self.state.training = None
        self.state.save()
        self.trained_now.append(name)

    # ------------------------------------------------------------------ exports

    def _export_if_due(self, final: bool = False) -> None:
        progress = self._progress()
        step = int(progress["step"])
        exports = self.state.exports
        if step == 0 or (exports and exports[-1]["step"] >= step):
            return
        waited = time.monotonic() - self.last_export
        if not final and waited < self.follow.export_every_s:
            return
        base = next((e for e in reversed(exports) if e["base"] is None), None)
        deltas = len(exports) - exports.index(base) - 1 if base is not None else 0
        full = (
            base is None
            or not base["incremental"]
            or deltas + 1 >= self.follow.full_every
            or not (Path(base["path"]) / MANIFEST).is_file()
        )
        out = self.export_dir / f"step{step:08d}"
        self.export_dir.mkdir(parents=True, exist_ok=True)
        since = None if full else base["path"]
        summary = export(self.run_dir, out, since=since, newest=True)
        manifest = json.loads((out / MANIFEST).read_text())
        incremental = any(t.get("trained_steps") is not None for t in manifest["tables"])
        exports.append({"path": str(out), "step": step, "base": since, "incremental": incremental})
        self.last_export = time.monotonic()
        kind = "full" if since is None else f"delta over {Path(since).name}"
        say(f"export {out} ({kind}): {summary['bytes']:,} table bytes")
        if since is None:
            self._prune()
        self.state.save()

    def _prune(self) -> None:
        """Delete the exports older than the newest `keep_full` full ones, with their deltas."""
        fulls = [e["path"] for e in self.state.exports if e["base"] is None]
        doomed = set(fulls[: -self.follow.keep_full])
        gone = [e for e in self.state.exports if e["path"] in doomed or e["base"] in doomed]
        for entry in gone:
            shutil.rmtree(entry["path"], ignore_errors=True)
        self.state.exports = [e for e in self.state.exports if e not in gone]


def follow(
    cfg: ExperimentConfig,
    root: str | Path,
    address: str | None = None,
    resume: bool = False,
    max_partitions: int | None = None,
    until: int | None = None,
) -> dict[str, Any]:
    """Train on `root`'s partitions as they appear until stopped (a signal,
    `max_partitions` partitions trained, or a partition's events reaching `until`);
    returns what this session trained and exported."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no folder to follow")
    check_follow_config(cfg)
    doc = cfg.model_dump(mode="json")
    doc["data"]["train"] = str(root)
    cfg = ExperimentConfig.model_validate(doc)
    started = time.perf_counter()
    run_dir = run_dir_of(cfg)
    # Each partition's `train` writes result.json; a follower's run is never "finished".
    resume = resume or (run_dir / STATE_FILE).exists()
    with RunFolder(run_dir, cfg, resume) as folder, _Signals() as signals:
        chatter_to(run_dir / LOGS_DIR / "driver.log")
        say(f"train {cfg.name} --follow {root}: run {run_dir}")
        follower = Follower(cfg, folder, root, address, signals)
        stopped = follower.run(max_partitions, until)
        if signals.received is not None:
            say(f"{signal.Signals(signals.received).name}: stopped after the partition in hand")
        state = follower.state
    return {
        "run_dir": str(run_dir),
        "stopped_by": stopped,
        "partitions_trained": follower.trained_now,
        "partitions_total": len(state.trained),
        "step": state.trained[-1]["steps"][1] if state.trained else 0,
        "exports": [e["path"] for e in state.exports],
        "waiting": follower.watcher.waiting,
        "seconds": time.perf_counter() - started,
    }
