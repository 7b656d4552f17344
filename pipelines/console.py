"""What a command prints, and where everything else goes.

The console carries the run's own lines: what is being done, one line per logging
interval, the validation lines and a closing summary table. Library chatter (torchrec's
planner, fbgemm, gloo, Ray, Python warnings) goes to `<run>/logs/`: `driver.log` for the
command's process, `worker-<rank>.log` for each training worker (its file descriptors, as
fbgemm and gloo write there directly). Ray does not forward worker output to the driver
(`log_to_driver` off): rank 0 appends its lines to `logs/console.log`, which the driver
follows and prints, so that each line appears once. `--verbose` leaves everything where
the libraries put it; `--quiet` keeps errors and the summary only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import psutil
from tqdm import tqdm

Verbosity = Literal["quiet", "normal", "verbose"]
LOGS_DIR = "logs"
CONSOLE_FILE = "console.log"

_verbosity: Verbosity = "normal"


def set_verbosity(verbosity: Verbosity) -> None:
    global _verbosity
    _verbosity = verbosity


def verbosity() -> Verbosity:
    return _verbosity


def say(line: str) -> None:
    """One of the command's own lines: on the console (unless quiet) and in the log."""
    logging.getLogger("recsys").info(line)
    if _verbosity != "quiet":
        tqdm.write(line, file=sys.stdout)


def chatter_to(log_file: Path | None) -> None:
    """Python logging (Ray's loggers included) and warnings into `log_file` rather than
    onto the console; with --verbose (or no file), nothing moves."""
    if _verbosity == "verbose" or log_file is None:
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    for name in list(logging.root.manager.loggerDict):
        # Ray and torch (torch._logging: `W1207 ... torch/fx/...] ...`) attach their own
        # stderr handlers and stop propagation; their records go to the file too.
        if name.split(".")[0] in ("ray", "torch"):
            logger = logging.getLogger(name)
            logger.handlers = []
            logger.propagate = True


def raylet_messages_to_log() -> None:
    """Send the errors and warnings Ray's raylet publishes to the driver (`(raylet)
    WARNING: 12 PYTHON worker processes have been started ...`) to the log, unless
    --verbose. Ray's driver prints them to stdout from a thread of its own whatever
    `log_to_driver` says, through `ray._private.worker.print_to_stdstream`, which that
    thread looks up on every message; without `log_to_driver` nothing else calls it."""
    if _verbosity == "verbose":
        return
    import ray._private.worker as ray_worker

    def to_log(data: dict[str, Any], ignore_prefix: bool = False) -> None:
        source = logging.getLogger(f"ray.{data.get('pid', 'raylet')}")
        for line in data.get("lines", []):
            source.warning(line)

    ray_worker.print_to_stdstream = to_log


def run_folder(checkpoint: str | Path) -> Path:
    """The run a `--checkpoint` argument names: the run itself or one of its checkpoints."""
    path = Path(checkpoint)
    return path.parent if path.name.startswith("checkpoint_") else path


def run_log(checkpoint: str | Path, command: str) -> Path | None:
    """`logs/<command>.log` of the run a `--checkpoint` argument names; None when there
    is no such run, whose error comes next."""
    run = run_folder(checkpoint)
    return run / LOGS_DIR / f"{command}.log" if run.is_dir() else None


def worker_output(run_dir: Path, rank: int, verbose: bool) -> None:
    """Point this worker process's stdout, stderr and logging at `logs/worker-<rank>.log`
    (the descriptors themselves: fbgemm's and gloo's C++ write there), unless verbose."""
    if verbose:
        return
    path = run_dir / LOGS_DIR / f"worker-{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    chatter_to(path)


class RunLines:
    """Rank 0's console lines: appended to `logs/console.log` for the driver to print,
    and printed here (into the worker's log, or forwarded by Ray when verbose)."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.path = run_dir / LOGS_DIR / CONSOLE_FILE
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, line: str) -> None:
        if not self.enabled:
            return
        print(line, flush=True)
        with self.path.open("a") as out:
            out.write(line + "\n")


class TreeMemory:
    """Peak resident memory of this process and all its descendants (a local Ray's
    raylet, workers and object store included), sampled by `follow_run`."""

    def __init__(self) -> None:
        self.peak = 0
        self._process = psutil.Process()

    def sample(self) -> None:
        total = 0
        for process in [self._process, *self._process.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
        self.peak = max(self.peak, total)


def _new_lines(path: Path, offset: int) -> tuple[list[str], int]:
    """The complete lines written after `offset`, and the offset after them: a line still
    being written is left for the next call, never printed or parsed in halves."""
    if not path.exists():
        return [], offset
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]
    return complete.decode().splitlines(), offset + len(complete)


@contextlib.contextmanager
def follow_run(run_dir: Path, metrics_file: str, memory: TreeMemory) -> Iterator[None]:
    """While training runs: print rank 0's new console lines once each, draw a step bar
    from `metrics_file` on a terminal, and sample the process tree's memory."""
    console = run_dir / LOGS_DIR / CONSOLE_FILE
    metrics = run_dir / metrics_file
    offsets = [p.stat().st_size if p.exists() else 0 for p in (console, metrics)]
    show = _verbosity == "normal"  # verbose: Ray forwards the workers' own prints
    bar_on = show and sys.stderr.isatty()
    stop = threading.Event()

    def poll(bar: tqdm | None) -> None:
        memory.sample()
        lines, offsets[0] = _new_lines(console, offsets[0])
        for line in lines if show else []:
            tqdm.write(line, file=sys.stdout)
        records, offsets[1] = _new_lines(metrics, offsets[1])
        for record in (json.loads(r) for r in records):
            if bar is not None and "loss" in record and "final" not in record:
                bar.update(record["step"] - bar.n)

    def loop() -> None:
        with tqdm(desc="train", unit="step", disable=not bar_on, leave=False) as bar:
            while not stop.wait(0.5):
                poll(bar if bar_on else None)
            poll(None)  # the last lines, written as the run ended

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def table(title: str, rows: list[tuple[str, Any]]) -> str:
    """A two-column summary table; rows whose value is None are left out."""
    shown = [(k, _format(v)) for k, v in rows if v is not None]
    width = max((len(k) for k, _ in shown), default=0)
    rule = "-" * max([len(title), *(width + 2 + len(v) for _, v in shown)])
    return "\n".join([title, rule, *(f"{k.ljust(width)}  {v}" for k, v in shown)])


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def mebibytes(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def seconds(t: float) -> str:
    return f"{t:.1f} s" if t < 120 else f"{t / 60:.1f} min"


def report(title: str, data: dict[str, Any]) -> str:
    """A command's JSON-ready result as text: scalars (and small lists) in a two-column
    table, each list of records or mapping of records as a table of its own."""
    scalars = [(k, _short(v)) for k, v in data.items() if not _is_records(v)]
    blocks = [_folded_table(title, scalars)]
    for key, value in data.items():
        if _is_records(value):
            rows = value if isinstance(value, list) else [{key: k, **v} for k, v in value.items()]
            blocks.append(_columns(key, rows))
    return "\n\n".join(blocks)


def _folded_table(title: str, rows: list[tuple[str, Any]]) -> str:
    """`table`, with its short rows in two side-by-side halves when there are more than
    FOLD_AFTER / 2 of them; rows too wide for a half keep a line each, above."""
    shown = [(k, _format(v)) for k, v in rows if v is not None]
    key_width = max((len(k) for k, _ in shown), default=0)
    half = (WIDTH - 4) // 2
    lines = [f"{k.ljust(key_width)}  {v}" for k, v in shown]
    short = [line for line in lines if len(line) <= half]
    if len(short) <= FOLD_AFTER // 2:
        return table(title, rows)
    height = -(-len(short) // 2)
    left, right = short[:height], short[height:]
    folded = [
        (a.ljust(half) + "    " + right[i]) if i < len(right) else a for i, a in enumerate(left)
    ]
    body = [line for line in lines if len(line) > half] + folded
    rule = "-" * max([len(title), *(len(line) for line in body)])
    return "\n".join([title, rule, *body])


def _is_records(value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(isinstance(v, dict) for v in value)
    values = value.values() if isinstance(value, dict) else ()
    return bool(values) and all(isinstance(v, dict) for v in values)


def _short(value: Any) -> Any:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_format(v)}" for k, v in value.items()) or "none"
    if isinstance(value, list):
        return ", ".join(_format(v) for v in value) or "none"
    return value


WIDTH = 100  # the console width a tall, narrow table folds into
FOLD_AFTER = 12  # rows a table shows in one column before it folds


def _columns(title: str, rows: list[dict[str, Any]]) -> str:
    """A table of records; one taller than FOLD_AFTER rows and narrow enough folds into
    side-by-side panels, each with the header, as `ls` does with names."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_format(_short(row.get(k, ""))) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    header, body = line(keys), [line(c) for c in cells]
    width = max(len(header), *(len(b) for b in body))
    panels = min(max(1, (WIDTH + 4) // (width + 4)), -(-len(body) // FOLD_AFTER))
    if panels == 1:
        return "\n".join([title, "-" * len(header), header, *body])
    height = -(-len(body) // panels)
    columns = [body[i : i + height] for i in range(0, len(body), height)]
    lines = [
        "    ".join(c[r].ljust(width) if r < len(c) else "" for c in columns).rstrip()
        for r in range(height)
    ]
    heading = "    ".join([header.ljust(width)] * len(columns)).rstrip()
    return "\n".join([title, "-" * len(heading), heading, *lines])
