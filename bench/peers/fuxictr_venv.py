"""A venv of its own for FuxiCTR 2.3.10, the peer the CTR benchmark measures the engine against.

FuxiCTR is never a dependency of the engine, so it lives in a separate venv under the bench
cache (`$RECSYS_BENCH_CACHE/fuxictr-2.3.10`, default `~/.cache/recsys-bench/fuxictr-2.3.10`).
torch is pinned to 2.13.0 because that CPU build lies on local disk for pip; an unpinned
`torch` (asked for by fuxictr itself) would pull a CUDA build of several GB.

    python bench/peers/fuxictr_venv.py     # creates it if missing, prints its python
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

FUXICTR_VERSION = "2.3.10"
REQUIREMENTS = (f"fuxictr=={FUXICTR_VERSION}", "polars<2", "torch==2.13.0")


def venv_dir() -> Path:
    """Where the peer venv lives; the cache root is overridable for CI or a roomier disk."""
    root = Path(os.environ.get("RECSYS_BENCH_CACHE", "~/.cache/recsys-bench")).expanduser()
    return root / f"fuxictr-{FUXICTR_VERSION}"


def ensure_fuxictr_venv(log: Path | None = None) -> Path:
    """Create the venv once (a stamp file marks a finished install) and return its python.

    A file lock serialises concurrent callers, e.g. two peer runs started in parallel, so
    that only one of them installs and the other waits for the stamp.
    """
    target = venv_dir()
    python = target / "bin" / "python"
    stamp = target / ".installed"
    wanted = "\n".join(REQUIREMENTS)
    if stamp.is_file() and stamp.read_text() == wanted and python.exists():
        return python
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text() == wanted and python.exists():
            return python
        out = open(log, "a") if log else None  # noqa: SIM115 - closed below
        try:
            base = getattr(sys, "_base_executable", sys.executable)
            subprocess.run([base, "-m", "venv", "--clear", str(target)], check=True)
            pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
            subprocess.run([*pip, *REQUIREMENTS], check=True, stdout=out, stderr=out)
        finally:
            if out:
                out.close()
        stamp.write_text(wanted)
    return python


if __name__ == "__main__":
    print(ensure_fuxictr_venv())
