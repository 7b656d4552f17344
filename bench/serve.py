"""Online scoring through `recsys serve` under load, across live table updates.

    python bench/serve.py [--quick] [--rows N] [--connections 32] [--rows-per-request R]
                          [--format arrow|json] [--replicas 1] [--seconds S]

Trains DLRM with a collisionless table by hand on conf/demo.yaml's synthetic log (in time
order, one process), checkpointing four times; exports the first checkpoint into a followed
folder and the other three as deltas over it beside that folder. Serves the folder on a
local Ray Serve, and drives it from a loopback load generator (aiohttp, a fixed number of
connections, each sending the next request as soon as its answer came) with rows of the
log's last day, without labels. After a steady phase, the three deltas are dropped into
the followed folder one after another (a rename, as `recsys export` does); an update's
window runs from its drop to the first answer scored by the new model. Measures QPS, rows/s,
p50/p99 latency and errors per phase, the memory of the process tree, and as the ceiling
the in-process `ServingModel.predict_table` throughput on the same requests' rows with as
many torch threads as the replicas hold CPUs (one each), the best of request-sized and
batch-sized tables.

Goals: no failed request during updates, p99 during updates within 2x the p99 outside
them, served rows/s at least half the ceiling. Last line:
`RESULT serve ratio=<served/ceiling> goal=0.5 met=yes|no p99_ratio=... errors=...`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import psutil
import pyarrow as pa
import ray
import torch
import yaml
from ray import serve

from pipelines.build import build_model
from pipelines.export.writer import export
from pipelines.serve.app import ServeSettings
from pipelines.serve.request import ARROW_STREAM, JSON
from pipelines.serve.run import deploy, start_ray
from pipelines.train.checkpoint import save_checkpoint
from recsys.batch import BatchConverter
from recsys.config import ExperimentConfig, config_from_dict, load_config
from recsys.logs import read_validated
from recsys.serving.model import ServingModel
from recsys.synth import generate

REPO = Path(__file__).resolve().parents[1]
UPDATES = 3


def _config(batch_size: int) -> ExperimentConfig:
    """conf/demo.yaml with its table collisionless (so that updates are deltas)."""
    doc = load_config(REPO / "conf" / "demo.yaml").model_dump(mode="json")
    doc["tables"][0].update(variant="collisionless", min_count=1, capacity=8192)
    doc["train"].update(workers=1, batch_size=batch_size)
    return config_from_dict(doc, "bench serve")


def build_exports(work: Path, rows: int) -> tuple[Path, list[Path], pa.Table]:
    """(followed folder holding the first export, the three later deltas outside it, the
    last day's rows as traffic): a model trained by hand, checkpointed four times."""
    cfg = _config(batch_size=1024)
    generate(cfg, rows=rows, out=work / "log")
    days = sorted((work / "log").glob("day=*"))
    batches = [t for day in days[:-1] for t in read_validated(day, cfg.features, 1024)]
    run = work / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    torch.manual_seed(0)
    model = build_model(cfg, {})
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    convert = BatchConverter(cfg.features)
    marks = {round(len(batches) * (k + 1) / (UPDATES + 1)) for k in range(UPDATES + 1)}
    checkpoints = []
    for step, table in enumerate(batches, start=1):
        batch = convert(table)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in marks:
            checkpoints.append(run / f"checkpoint_step{step:08d}")
            checkpoints[-1].mkdir()
            save_checkpoint(checkpoints[-1], model, optimizer, {"step": step, "epoch": 0})
    follow, staged = work / "follow", work / "staged"
    export(checkpoints[0], follow / "v0")
    deltas = []
    for k, checkpoint in enumerate(checkpoints[1:], start=1):
        export(checkpoint, staged / f"v{k}", since=follow / "v0")
        deltas.append(staged / f"v{k}")
    traffic = pa.concat_tables(read_validated(days[-1], cfg.features, 65_536))
    return follow, deltas, traffic.drop_columns([cfg.features.label])


def _chunks(traffic: pa.Table, rows: int, count: int) -> list[pa.Table]:
    return [traffic.slice((i * rows) % (traffic.num_rows - rows), rows) for i in range(count)]


def ceiling(
    export_dir: Path, chunks: list[pa.Table], threads: int, batch: int, seconds: float
) -> float:
    """In-process rows/s of `predict_table` on the requests' rows, alone or `batch` at a
    time (the better of the two), with `threads` torch threads."""
    model = ServingModel(export_dir)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        best = 0.0
        for tables in (chunks, [pa.concat_tables(chunks[:batch])]):
            model.predict_table(tables[0])  # warm-up
            rows, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                for t in tables:
                    model.predict_table(t)
                    rows += t.num_rows
            best = max(best, rows / (time.perf_counter() - start))
        return best
    finally:
        torch.set_num_threads(before)


def _body(table: pa.Table, fmt: str) -> bytes:
    if fmt == "json":
        return json.dumps({"rows": table.to_pylist()}).encode()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


@dataclass
class Load:
    """Requests of a run: start time, latency, status (0: no answer) and the step served."""

    url: str
    bodies: list[bytes]
    content_type: str
    starts: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    first_seen: dict[int, float] = field(default_factory=dict)  # step -> first answer
    running: bool = True

    async def client(self, session: aiohttp.ClientSession, worker: int) -> None:
        i = worker
        headers = {"Content-Type": self.content_type}
        while self.running:
            body = self.bodies[i % len(self.bodies)]
            i += 1
            start = time.perf_counter()
            status, step = 0, -1
            try:
                async with session.post(self.url, data=body, headers=headers) as response:
                    status = response.status
                    data = await response.read()
                    if status == 200:
                        step = json.loads(data)["version"]["step"]
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                pass
            now = time.perf_counter()
            self.first_seen.setdefault(step, now)
            self.starts.append(start)
            self.latencies.append(now - start)
            self.statuses.append(status)
            self.steps.append(step)


async def drive(
    load: Load, connections: int, follow: Path, deltas: list[Path], phase_s: float, steps: list[int]
) -> tuple[float, list[tuple[float, float]], float]:
    """Load for `phase_s`, then per delta: drop it, wait for its step, load `phase_s` more.
    Returns (start, update windows, end)."""
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=120)
    windows = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(load.client(session, w)) for w in range(connections)]
        await asyncio.sleep(min(2.0, phase_s / 2))  # warm-up, not counted
        begin = time.perf_counter()
        await asyncio.sleep(phase_s)
        for delta, step in zip(deltas, steps, strict=True):
            dropped = time.perf_counter()
            os.rename(delta, follow / delta.name)
            while step not in load.first_seen and time.perf_counter() - dropped < 120:
                await asyncio.sleep(0.01)
            windows.append((dropped, load.first_seen.get(step, time.perf_counter())))
            await asyncio.sleep(phase_s)
        end = time.perf_counter()
        load.running = False
        await asyncio.gather(*tasks)
    return begin, windows, end


def _phase(load: Load, rows: int, lo: float, hi: float) -> dict[str, float]:
    """Requests started in [lo, hi): counts, rates and latency percentiles."""
    starts = np.array(load.starts)
    return _stats(load, (starts >= lo) & (starts < hi), rows, hi - lo)


def _stats(load: Load, keep: np.ndarray, rows: int, seconds: float) -> dict[str, float]:
    lat = np.array(load.latencies)[keep] * 1000
    ok = int((np.array(load.statuses)[keep] == 200).sum())
    n = int(keep.sum())
    nan = float("nan")
    return {
        "requests": n,
        "errors": n - ok,
        "qps": n / seconds if seconds > 0 else nan,
        "rows_s": ok * rows / seconds if seconds > 0 else nan,
        "p50": float(np.percentile(lat, 50)) if n else nan,
        "p99": float(np.percentile(lat, 99)) if n else nan,
    }


def _role(p: psutil.Process) -> str:
    name = " ".join(p.cmdline())
    if p.pid == os.getpid():
        return "client (this process)"
    for role in ("ServeReplica", "ProxyActor", "ServeController"):
        if role in name:
            return role
    return "other Ray processes"


def _tree() -> dict[str, tuple[float, float, float]]:
    """Per role (client, replicas, proxy, controller, the rest of Ray): CPU seconds so far,
    RSS and PSS (MiB), summed over this process and every process under it."""
    totals: dict[str, list[float]] = {}
    for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            role = _role(p)
            cpu = p.cpu_times()
            info = p.memory_full_info()
        except (psutil.Error, OSError):
            continue
        t = totals.setdefault(role, [0.0, 0.0, 0.0])
        t[0] += cpu.user + cpu.system
        t[1] += info.rss / 2**20
        t[2] += getattr(info, "pss", info.rss) / 2**20
    return {role: (t[0], t[1], t[2]) for role, t in sorted(totals.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small log, 4 s phases")
    parser.add_argument("--rows", type=int, default=200_000, help="log rows to train on")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rows-per-request", type=int, default=256)
    parser.add_argument("--format", choices=["arrow", "json"], default="arrow")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=40.0, help="length of each phase")
    args = parser.parse_args()
    rows, phase_s = (20_000, 4.0) if args.quick else (args.rows, args.seconds)
    timed = 0.5 if args.quick else 2.0  # seconds per ceiling measurement
    torch.set_num_threads(1)  # on a shared machine, more threads spin against each other
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    try:
        began = time.perf_counter()
        follow, deltas, traffic = build_exports(work, rows)
        steps = [json.loads((d / "manifest.json").read_text())["training"]["step"] for d in deltas]
        chunks = _chunks(traffic, args.rows_per_request, 64)
        print(
            f"setup: {rows} log rows, DLRM + collisionless table, exports v0 and deltas at "
            f"steps {steps}, {time.perf_counter() - began:.0f} s",
            flush=True,
        )
        # The ceiling before and after the served run (the higher counts): a shared
        # machine's load moves between the two, and the served run sits in between.
        before = ceiling(follow / "v0", chunks, args.replicas, args.max_batch_size, timed)
        all_cores = ceiling(follow / "v0", chunks, os.cpu_count() or 1, args.max_batch_size, timed)
        start_ray(None, args.replicas)
        settings = ServeSettings(
            follow=str(follow),
            poll_s=0.5,
            max_batch_size=args.max_batch_size,
            batch_wait_ms=args.batch_wait_ms,
        )
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        deploy(settings, replicas=args.replicas, port=port)
        url = f"http://127.0.0.1:{port}/predict"
        load = Load(url, [_body(t, args.format) for t in chunks], JSON)
        if args.format == "arrow":
            load.content_type = ARROW_STREAM
        tree_before = _tree()
        load_start = os.getloadavg()[0]
        begin, windows, end = asyncio.run(
            drive(load, args.connections, follow, deltas, phase_s, steps)
        )
        tree_after = _tree()
        load_avg = f"{load_start:.1f} -> {os.getloadavg()[0]:.1f} (1 min)"
        serve.shutdown()
        ray.shutdown()
        after = ceiling(follow / "v0", chunks, args.replicas, args.max_batch_size, timed)
        top = max(before, after)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    r = args.rows_per_request
    starts = np.array(load.starts)
    in_update = np.zeros(len(starts), bool)
    for lo, hi in windows:
        in_update |= (starts >= lo) & (starts <= hi)
    counted = (starts >= begin) & (starts < end)
    phases = {"before updates": _phase(load, r, begin, windows[0][0])}
    for k, (lo, hi) in enumerate(windows, start=1):
        phases[f"update {k} ({hi - lo:.2f} s)"] = _phase(load, r, lo, hi)
        nxt = windows[k][0] if k < len(windows) else end
        phases[f"after update {k}"] = _phase(load, r, hi, nxt)
    during = _stats(load, counted & in_update, r, 0)
    outside = _stats(load, counted & ~in_update, r, 0)
    whole = _phase(load, r, begin, end)
    print(
        f"\nload: {args.connections} connections, {r} rows per request ({args.format}), "
        f"{args.replicas} replica(s), max batch {args.max_batch_size} requests, "
        f"wait {args.batch_wait_ms} ms"
    )
    head = ("requests", 9), ("errors", 7), ("QPS", 8), ("rows/s", 10), ("p50 ms", 8), ("p99 ms", 8)
    print(f"{'phase':<26}" + "".join(f"{name:>{width}}" for name, width in head))
    for name, p in {**phases, "all": whole}.items():
        print(
            f"{name:<26}{p['requests']:>9}{p['errors']:>7}{p['qps']:>8.0f}{p['rows_s']:>10.0f}"
            f"{p['p50']:>8.1f}{p['p99']:>8.1f}"
        )
    for name, p in (("during updates", during), ("outside updates", outside)):
        print(
            f"{name:<26}{p['requests']:>9}{p['errors']:>7}{'':>18}{p['p50']:>8.1f}{p['p99']:>8.1f}"
        )
    print(
        f"ceiling: predict_table in process {top:.0f} rows/s with {args.replicas} torch "
        f"thread(s) (before the served run {before:.0f}, after {after:.0f}; with all "
        f"{os.cpu_count()} cores {all_cores:.0f}); load average over the run {load_avg}"
    )
    requests = max(len(load.starts), 1)  # warm-up included, as in the CPU times
    print(
        f"{'process (role)':<26}{'CPU ms/request':>15}{'RSS MiB':>9}{'PSS MiB':>9}  (after updates)"
    )
    for role, (cpu, rss, pss) in tree_after.items():
        used = cpu - tree_before.get(role, (0.0, 0.0, 0.0))[0]
        print(f"{role:<26}{used * 1000 / requests:>15.2f}{rss:>9.0f}{pss:>9.0f}")
    for label, tree in (("before updates", tree_before), ("after updates", tree_after)):
        rss, pss = sum(t[1] for t in tree.values()), sum(t[2] for t in tree.values())
        print(f"memory {label}: process tree RSS {rss:.0f} MiB, PSS {pss:.0f} MiB")
    ratio = whole["rows_s"] / top
    p99_ratio = during["p99"] / outside["p99"]
    errors = whole["errors"]
    served_steps = sorted(set(load.steps) - {-1})
    met = ratio >= 0.5 and p99_ratio <= 2 and errors == 0 and served_steps[-1] == steps[-1]
    print(f"steps served: {served_steps}")
    print(
        f"RESULT serve ratio={ratio:.2f} goal=0.5 met={'yes' if met else 'no'} "
        f"p99_ratio={p99_ratio:.2f} errors={errors} served_rows_s={whole['rows_s']:.0f} "
        f"ceiling_rows_s={top:.0f} p99_ms={outside['p99']:.1f} p99_update_ms={during['p99']:.1f}"
    )


if __name__ == "__main__":
    main()
