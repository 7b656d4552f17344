"""A run folder has one writer and one config: what `recsys train` checks before it trains.

* One `train` at a time: the driver holds an exclusive `flock` on `<run>/.lock` while it
  trains; a second command on the same folder stops at once and names the holder. The
  kernel drops the lock with the process, so a killed run leaves no stale lock behind.
* A finished run (`result.json`) is not trained again by accident: re-running its name
  needs `--resume` (to train it further, e.g. with more epochs).
* A run with checkpoints resumes only under the config it was trained with, apart from the
  keys in `RESUMABLE_CHANGES` (how long, on how many workers, how often to log and save);
  any other difference is refused with its keys, before any work starts.
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import socket
from pathlib import Path
from typing import Any, TextIO

import yaml

from recsys.config import ConfigError, ExperimentConfig

CONFIG_FILE = "config.yaml"
RESULT_FILE = "result.json"
LOCK_FILE = ".lock"
# Keys whose change a resumed run takes in its stride; `tables.*.capacity` moves live
# collisionless rows exactly (see tables.collisionless.state).
RESUMABLE_CHANGES = (
    "train.epochs",
    "train.max_steps",
    "train.workers",
    "train.log_every",
    "train.checkpoint_every",
    "train.max_failures",
    "train.keep_checkpoints",
    "train.validate_every",
    "train.patience",
    "train.device",
    "train.follow.*",
    "tables.*.capacity",
)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        items: Any = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two config documents, resumable ones left
    out. A whole list entry counts by its leaf keys (`tables.0.capacity`)."""
    before, after = _flat(saved), _flat(new)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return [k for k in changed if not any(fnmatch.fnmatch(k, p) for p in RESUMABLE_CHANGES)]


class RunFolder:
    """The run folder of one `train` command, locked for as long as it is entered."""

    def __init__(self, path: Path, cfg: ExperimentConfig, resume: bool) -> None:
        self.path, self.cfg, self.resume = path, cfg, resume
        self._lock: TextIO | None = None

    @property
    def has_checkpoints(self) -> bool:
        return any(self.path.glob("checkpoint_*"))

    def __enter__(self) -> RunFolder:
        self.path.mkdir(parents=True, exist_ok=True)
        lock = (self.path / LOCK_FILE).open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise ConfigError(
                f"{self.path}: another `recsys train` is training this run ({holder}); "
                "wait for it or choose another name"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        self._lock = lock
        try:
            self._check()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def _check(self) -> None:
        if (self.path / RESULT_FILE).exists() and not self.resume:
            raise ConfigError(
                f"{self.path}: this run has finished ({RESULT_FILE}); pass --resume to train "
                "it further (e.g. with more train.epochs), or choose another name"
            )
        saved_path = self.path / CONFIG_FILE
        if not (self.has_checkpoints and saved_path.exists()):
            return  # nothing to resume: whatever was there is started afresh
        saved = yaml.safe_load(saved_path.read_text())
        changed = config_changes(saved, self.cfg.model_dump(mode="json"))
        if changed:
            raise ConfigError(
                f"{self.path}: resuming needs the config it was trained with; these keys "
                f"differ from its {CONFIG_FILE}: {changed}. Only {list(RESUMABLE_CHANGES)} "
                "may change on resume; for anything else choose another name"
            )

    def write_config(self) -> None:
        """The config the run trains with, written once preflight has accepted it."""
        doc = self.cfg.model_dump(mode="json")
        (self.path / CONFIG_FILE).write_text(yaml.safe_dump(doc))

    def write_result(self, summary: dict[str, Any]) -> None:
        (self.path / RESULT_FILE).write_text(json.dumps(summary, indent=2, default=str))
