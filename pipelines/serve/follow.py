"""The model a replica serves, and how it moves on to newer exports without a request noticing.

A replica holds one `Loaded` (a `ServingModel` and the `Version` it is) behind a single
reference. Whoever scores reads that reference once and keeps the object for the whole
batch, so a swap is one assignment: requests in flight finish on the model they started
with, later ones get the new one, and nothing waits or fails while a model loads. Loading
(checksums, Parquet, the dense program) happens in a background thread, off the request
path; an export that fails to load is logged, reported (`last_error`) and not tried again
until its manifest changes, while the old model keeps serving.

A followed folder receives exports as subfolders, full ones or deltas over an earlier one.
`recsys export` renames a finished export into place, so a subfolder with a manifest is
complete; hidden (staging) folders are ignored. Newest means highest training step, then
latest `exported_at`, then name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recsys.serving.format import MANIFEST
from recsys.serving.manifest import ExportError
from recsys.serving.model import ServingModel

log = logging.getLogger("recsys.serve")

# A folder's manifest as seen by the poller: its modification time and size, so that an
# export replaced in place (same name, new manifest) counts as new, and a folder that
# failed is tried again only once it changed.
Stamp = tuple[int, int]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Version:
    """What a replica serves, as `GET /version` reports it."""

    export: str
    step: int
    exported_at: str
    manifest_sha256: str
    base: str | None  # an incremental export: the export it was applied to
    loaded_at: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Loaded:
    model: ServingModel
    version: Version


def load(path: Path) -> Loaded:
    """The export at `path` (a delta applied to its base), checked as `ServingModel` checks."""
    model = ServingModel(path)
    training = model.manifest.training
    version = Version(
        export=str(path),
        step=int(training.get("step", -1)),
        exported_at=str(training.get("exported_at", "")),
        manifest_sha256=model.manifest_sha256,
        base=model.manifest.base,
        loaded_at=_now(),
    )
    return Loaded(model, version)


@dataclass(frozen=True)
class Candidate:
    path: Path
    key: tuple[int, str, str]  # (training step, exported_at, name): larger is newer
    stamp: Stamp


def _stamp(path: Path) -> Stamp | None:
    try:
        st = (path / MANIFEST).stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def candidates(root: Path) -> tuple[list[Candidate], dict[Path, tuple[Stamp, str]]]:
    """The complete exports under `root`, newest first, and the folders whose manifest
    cannot be read to be ordered (with why)."""
    found, unreadable = [], {}
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        stamp = _stamp(path)
        if stamp is None:
            continue
        try:
            training = json.loads((path / MANIFEST).read_text())["training"]
            key = (int(training["step"]), str(training["exported_at"]), path.name)
        except (OSError, ValueError, KeyError, TypeError) as err:
            unreadable[path] = (stamp, f"{path / MANIFEST}: no readable training step ({err})")
            continue
        found.append(Candidate(path, key, stamp))
    return sorted(found, key=lambda c: c.key, reverse=True), unreadable


class LiveModel:
    """The served model of one replica: a fixed export, or the newest of a followed folder,
    polled every `poll_s` seconds by a daemon thread."""

    def __init__(self, export: Path | None = None, follow: Path | None = None, poll_s: float = 5.0):
        if (export is None) == (follow is None):
            raise ValueError("serve one export or follow one folder")
        self.follow = follow
        self.poll_s = poll_s
        self.last_error: dict[str, str] | None = None
        self._failed: dict[Path, Stamp] = {}
        self._key: tuple[int, str, str] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if export is not None:
            self.current = load(export)
            return
        assert follow is not None
        if not self.poll_once():
            raise ExportError(f"{follow}: no export here loads ({self._describe_error()})")

    def _describe_error(self) -> str:
        return self.last_error["error"] if self.last_error else "no subfolder with a manifest"

    def _fail(self, path: Path, stamp: Stamp, error: str) -> None:
        self._failed[path] = stamp
        self.last_error = {"export": str(path), "error": error, "at": _now()}
        log.warning("skipping export %s: %s", path, error)

    def poll_once(self) -> bool:
        """Load the newest export newer than the one served, if any loads; True if the
        served model changed. Folders that failed are skipped until their manifest changes."""
        assert self.follow is not None
        found, unreadable = candidates(self.follow)
        for path, (stamp, error) in unreadable.items():
            if self._failed.get(path) != stamp:
                self._fail(path, stamp, error)
        for candidate in found:
            if self._key is not None and candidate.key <= self._key:
                return False
            if self._failed.get(candidate.path) == candidate.stamp:
                continue
            try:
                loaded = load(candidate.path)
            except Exception as err:  # whatever a folder holds, the old model keeps serving
                self._fail(candidate.path, candidate.stamp, f"{type(err).__name__}: {err}")
                continue
            self.current = loaded  # the swap: one reference, read once per batch
            self._key = candidate.key
            log.info("serving %s (step %d)", candidate.path, loaded.version.step)
            return True
        return False

    def start(self) -> None:
        """Poll the followed folder in the background (nothing to do for a fixed export)."""
        if self.follow is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="recsys-follow", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(AttributeError, OSError):  # Linux: niceness is per thread,
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)  # loads yield to scoring
        while not self._stop.wait(self.poll_s):
            try:
                self.poll_once()
            except Exception as err:  # a folder gone or unreadable: try again next time
                log.warning("polling %s failed: %s", self.follow, err)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
