"""How the engine's training cost grows: examples/s against log rows, table rows and workers,
and bytes per live ID, printed and plotted.

    .venv/bin/python bench/scaling.py [--quick] [--max-rows N] [--max-table-rows N]
        [--out DIR]

Setting: bench/peers.py's DLRM on the synthetic Criteo-like log (`bench/criteo_synth.py`:
embedding dim 16, one table per feature, fused row-wise Adagrad, batch 4096).
- **Log rows** (10^5, 3x10^5, 10^6; 10^7 with `--max-rows 10000000`, about 10 more
  minutes on 2 cores, so left out of the default): `recsys train` with 1 worker, 1 epoch,
  on logs of that size (vocabularies up to 10^6, hash tables of the vocabulary's size);
  examples/s from rank 0's logging intervals as bench/peers.py reads them (stream start,
  the last interval and validations left out). Streaming reads the log in batches, so the
  cost per example should not grow with the log.
- **Workers** (1, 2: the machine's 2 cores; more workers than cores would share them, so
  none are run): the 10^6-row log, same run, `train.workers` 1 and 2.
- **Table rows** (10^4 .. 10^8 in total over the 26 tables, each feature's share in
  proportion to its vocabulary; collisionless and hashed): in one process, a one-rank gloo
  group under DistributedModelParallel, one intra-op thread, 4 warm-up then 20 timed steps
  over the same batches of the 10^6-row log's first day. A size whose rows, optimizer state
  and (collisionless) ID map would take more than half of the host's available memory is
  skipped and said so (10^8 rows at dim 16 is 6.8 GB before the ID map; the host is
  shared). Bytes per live ID: table rows + optimizer state (+ ID map) over the live IDs
  (collisionless: the map's live rows; hashed: distinct rows the steps touched).

Goal (the one property the design claims here): examples/s at the largest log within 20%
of the smallest (`ratio` = largest / smallest >= 0.8). Last line: `RESULT scaling
ratio=<x> goal=>=0.8 met=yes|no ...`. Writes `<out>/scaling.json` and `<out>/scaling.png`
(default out: <bench cache>/scaling). Default: estimated at about 10 minutes on 2 idle cores
(not yet timed whole: the first default run met a host shared at load 20-90); `--quick`:
logs of 3x10^4 and 6x10^4 rows, 1 worker, tables of 10^4 and 10^5 rows, under a minute
of training (plus Ray's start-up).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist
from criteo_synth import BATCH, SPARSE, day_split, engine_config, engine_training_rate
from criteo_synth import synthetic_log as criteo_log
from harness import init_single_rank_group, shard_for_training, train_in_order
from real_logs import RECSYS, TreeMemory, bench_cache, load_avg, run_logged, table

from pipelines.build import build_model
from recsys.config import ExperimentConfig, config_from_dict
from recsys.logs import read_validated
from tables.collisionless.report import table_report
from tables.collisionless.transform import bind_ownership

LOG_VOCAB_MAX = 1_000_000
TABLE_LOG_ROWS = 1_000_000  # the log whose batches the table-rows curve steps through
WARMUP_STEPS, TIMED_STEPS = 4, 20
ROW_FLOATS = 16 + 1  # dim 16 plus row-wise Adagrad's one accumulator per row
FLATNESS_GOAL = 0.8


def train_run(
    rows: int, workers: int, workdir: Path, vocab_max: int = LOG_VOCAB_MAX
) -> dict[str, Any]:
    """`recsys train` of DLRM on the `rows`-row log with `workers` workers; its rate."""
    log, summary = criteo_log(rows, vocab_max)
    split = day_split(log, workdir / f"split_{rows}")
    vocab = {c: int(summary["vocab"][c]) for c in SPARSE}
    config = engine_config("DLRM", workers, split, vocab, 1, workdir / "runs")
    config["name"] = f"rows{rows}_w{workers}"
    del config["data"]["valid"], config["data"]["test"]
    config["data"]["valid_days"] = 0  # training only
    conf = workdir / f"{config['name']}.yaml"
    conf.write_text(json.dumps(config))  # JSON is YAML
    with TreeMemory() as memory:
        wall = run_logged([str(RECSYS), "train", str(conf)], workdir / f"{config['name']}.log")
    rate = engine_training_rate(workdir / "runs" / config["name"], BATCH, workers)
    return {
        "rows": rows,
        "train_rows": split["train"][1],
        "workers": workers,
        "examples_per_s": rate,
        "wall_s": wall,
        "pss_mib": memory.peak_pss_mib,
    }


def table_config(
    log_config: dict[str, Any], vocab: dict[str, int], total: int, variant: str
) -> ExperimentConfig:
    """The log's experiment with `total` table rows shared out by vocabulary size."""
    doc = json.loads(json.dumps(log_config))
    weight = sum(vocab.values())
    for entry in doc["tables"]:
        (feature,) = entry["features"]
        rows = max(4, round(total * vocab[feature] / weight))
        entry.pop("num_embeddings")
        entry["variant"] = variant
        if variant == "hash":
            entry["num_embeddings"] = rows
        else:  # shards by ID ownership (one shard on one rank)
            entry.update(capacity=rows, sharding="row_wise")
    return config_from_dict(doc, f"{variant} tables of {total:,} rows")


def touched_rows(cfg: ExperimentConfig, batches: list[pa.Table]) -> int:
    """Distinct hashed rows the batches look up, over all tables."""
    total = 0
    for entry in cfg.tables:
        (feature,) = entry.features
        ids = [b[feature].combine_chunks() for b in batches]
        ids = [
            pc.list_flatten(c) if pa.types.is_list(c.type) or pa.types.is_large_list(c.type) else c
            for c in ids
        ]
        values = np.concatenate([np.asarray(c.to_numpy()) for c in ids])
        total += len(np.unique(values % entry.num_embeddings))
    return total


def table_point(cfg: ExperimentConfig, batches: list[pa.Table]) -> dict[str, Any]:
    """Examples/s of the timed steps, and bytes per live ID after them."""
    torch.manual_seed(0)
    model = build_model(cfg, {}, table_device=torch.device("meta"))
    collisionless = cfg.tables[0].variant == "collisionless"
    if collisionless:
        bind_ownership(model, 0, dist.new_group(backend="gloo"))
    dmp, optimizer = shard_for_training(
        model, cfg, {s.name: s.sharding for s in model.sparse.specs}
    )
    train_in_order(dmp, optimizer, cfg, batches[:WARMUP_STEPS])
    examples, seconds = train_in_order(dmp, optimizer, cfg, batches[WARMUP_STEPS:])
    rows = sum(s.num_rows for s in dmp.module.sparse.specs)
    held = rows * ROW_FLOATS * 4
    if collisionless:
        report = table_report(dmp.module.sparse)
        live = sum(r["live_rows"] for r in report.values())
        held += sum(r["map_bytes"] + r["filter_bytes"] for r in report.values())
    else:
        live = touched_rows(cfg, batches)
    return {
        "table_rows": rows,
        "examples_per_s": examples / seconds,
        "live_ids": live,
        "bytes_per_live_id": held / live,
    }


def fits(total: int, variant: str) -> bool:
    """Whether rows, state and an ID map (at most 3x the rows' bytes) fit in half of the
    host's available memory."""
    need = total * ROW_FLOATS * 4 * (3 if variant == "collisionless" else 1)
    return need <= psutil.virtual_memory().available / 2


def plot(results: dict[str, Any], path: Path) -> None:
    """Four panels: log rows, table rows, workers, bytes per live ID (matplotlib's object
    API on the Agg canvas, as recsys.metrics draws)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 9), layout="constrained")
    FigureCanvasAgg(fig)
    (a, b), (c, d) = fig.subplots(2, 2)
    logs = results["log_rows"]
    a.plot([r["rows"] for r in logs], [r["examples_per_s"] for r in logs], "o-")
    a.set(xscale="log", xlabel="log rows", ylabel="examples/s", title="against log rows (1 worker)")
    for variant, points in results["table_rows"].items():
        xs = [p["table_rows"] for p in points]
        b.plot(xs, [p["examples_per_s"] for p in points], "o-", label=variant)
        d.plot(xs, [p["bytes_per_live_id"] for p in points], "o-", label=variant)
    b.set(xscale="log", xlabel="total table rows", ylabel="examples/s", title="against table rows")
    d.set(
        xscale="log",
        yscale="log",
        xlabel="total table rows",
        ylabel="bytes per live ID",
        title="memory per live ID",
    )
    b.legend()
    d.legend()
    workers = results["workers"]
    c.plot([r["workers"] for r in workers], [r["examples_per_s"] for r in workers], "o-")
    c.set(
        xlabel="workers",
        ylabel="examples/s",
        xticks=[r["workers"] for r in workers],
        title=f"against workers ({workers[0]['rows']:,}-row log)",
    )
    for ax in (a, b, c, d):
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (see the docstring)")
    parser.add_argument("--max-rows", type=int, default=1_000_000, help="largest log")
    parser.add_argument("--max-table-rows", type=int, default=100_000_000)
    parser.add_argument("--out", type=Path, help="default <bench cache>/scaling(_quick)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        log_sizes, worker_counts, table_sizes = [30_000, 60_000], [1], [10_000, 100_000]
        table_log = 60_000
    else:
        log_sizes = [n for n in (100_000, 300_000, 1_000_000, 10_000_000) if n <= args.max_rows]
        worker_counts = [1, 2]
        table_sizes = [10**k for k in range(4, 9) if 10**k <= args.max_table_rows]
        table_log = TABLE_LOG_ROWS
    out = (args.out or bench_cache() / ("scaling_quick" if args.quick else "scaling")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    print(f"output in {out}; load average {load_avg()}", flush=True)

    results: dict[str, Any] = {"log_rows": [], "workers": [], "table_rows": {}}
    for rows in log_sizes:
        res = train_run(rows, 1, out)
        results["log_rows"].append(res)
        print(
            f"log {rows:>10,} rows, 1 worker: {res['examples_per_s']:>8,.0f} examples/s; "
            f"load {load_avg()}",
            flush=True,
        )
    for workers in worker_counts:
        res = next((r for r in results["log_rows"] if r["rows"] == log_sizes[-1]), None)
        if workers != 1 or res is None:
            res = train_run(log_sizes[-1], workers, out)
        results["workers"].append(res)
        print(
            f"log {log_sizes[-1]:,} rows, {workers} worker(s): {res['examples_per_s']:,.0f} "
            f"examples/s; load {load_avg()}",
            flush=True,
        )

    log, summary = criteo_log(table_log, LOG_VOCAB_MAX)
    split = day_split(log, out / f"split_{table_log}")
    vocab = {c: int(summary["vocab"][c]) for c in SPARSE}
    base = engine_config("DLRM", 1, split, vocab, 1, out / "runs")
    first = table_config(base, vocab, table_sizes[0], "hash")
    stream = read_validated(split["train"][0], first.features, batch_size=BATCH)
    batches = [b for _, b in zip(range(WARMUP_STEPS + TIMED_STEPS), stream, strict=False)]
    init_single_rank_group()
    for variant in ("hash", "collisionless"):
        points = results["table_rows"].setdefault(variant, [])
        for total in table_sizes:
            if not fits(total, variant):
                print(
                    f"{variant} {total:,} table rows: skipped, more than half of the "
                    f"{psutil.virtual_memory().available / 2**30:.1f} GiB available"
                )
                continue
            point = table_point(table_config(base, vocab, total, variant), batches)
            points.append(point)
            print(
                f"{variant:<13} {point['table_rows']:>12,} table rows: "
                f"{point['examples_per_s']:>8,.0f} examples/s, {point['live_ids']:,} live "
                f"IDs, {point['bytes_per_live_id']:,.0f} B per live ID; load {load_avg()}",
                flush=True,
            )
    dist.destroy_process_group()

    print(f"\nall runs: {time.perf_counter() - began:.0f} s; load average {load_avg()}")
    print(
        "\n".join(
            table(
                ["curve", "x", "examples/s", "bytes per live ID"],
                [
                    ["log rows", f"{r['rows']:,}", f"{r['examples_per_s']:,.0f}", "-"]
                    for r in results["log_rows"]
                ]
                + [
                    ["workers", str(r["workers"]), f"{r['examples_per_s']:,.0f}", "-"]
                    for r in results["workers"]
                ]
                + [
                    [
                        f"table rows ({v})",
                        f"{p['table_rows']:,}",
                        f"{p['examples_per_s']:,.0f}",
                        f"{p['bytes_per_live_id']:,.0f}",
                    ]
                    for v, points in results["table_rows"].items()
                    for p in points
                ],
            )
        )
    )
    (out / "scaling.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "scaling.png")
    print(f"curves: {out / 'scaling.png'}, figures: {out / 'scaling.json'}")

    logs = results["log_rows"]
    ratio = logs[-1]["examples_per_s"] / logs[0]["examples_per_s"]
    speedup = results["workers"][-1]["examples_per_s"] / results["workers"][0]["examples_per_s"]
    tables_at = {v: f"{p[-1]['table_rows']}" for v, p in results["table_rows"].items() if p}
    print(
        f"RESULT scaling ratio={ratio:.2f} goal=>={FLATNESS_GOAL} "
        f"met={'yes' if ratio >= FLATNESS_GOAL else 'no'} log_rows={logs[0]['rows']}.."
        f"{logs[-1]['rows']} workers_speedup={speedup:.2f} "
        + " ".join(f"max_table_rows_{v}={n}" for v, n in tables_at.items())
        + f" load={load_avg().split()[0]}"
    )


if __name__ == "__main__":
    sys.exit(main())
