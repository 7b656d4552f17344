"""Ingestion benchmark: Parquet log -> `Batch`, vectorized path against naive per-row Python
and against pyarrow's bare Parquet read of the same files.

Both conversion paths read the same Criteo-shaped synthetic log (13 dense, 26 sparse of
which 3 multi-valued) on one core and produce the same `Batch` (checked on the first
batch). The naive path is what a first attempt looks like: `to_pylist()` and a Python loop
per row. The bare read is `pyarrow.parquet.ParquetFile.read_row_group` of the same columns
with nothing done to the tables: the decode cost every reader pays, the ceiling of any
ingestion path. After one untimed pass of each (page cache, first calls), the engine's
pass and the bare read alternate (`--repeats` each), so load from other processes hits
both alike; each rate is the median over its passes.

    python bench/ingest.py            # 2M rows, about 2 minutes
    python bench/ingest.py --quick    # 200k rows, under a minute

Goals (issue 2): at least 30x the naive path and at least 1M rows/s on one core; (issue 20)
at least half the bare pyarrow read rate. Last line:
`RESULT ingest ratio=<x> goal=30 met=yes|no rows_per_s=... vs_pyarrow=... ...`, met covering all.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.batch import Batch, BatchConverter
from recsys.config import ExperimentConfig, load_config
from recsys.contract import validate_table
from recsys.logs import parquet_files, read_validated

REPO = Path(__file__).resolve().parents[1]
BATCH_ROWS = 65_536


def naive_batches(files: list[Path], cfg: ExperimentConfig, limit: int) -> tuple[int, float]:
    """Per-row Python conversion; returns (rows converted, seconds)."""
    f = cfg.features
    sparse = [s.name for s in f.sparse]
    start, rows = time.perf_counter(), 0
    for file in files:
        table = pq.read_table(file, columns=f.column_names())
        for offset in range(0, table.num_rows, BATCH_ROWS):
            records = table.slice(offset, BATCH_ROWS).to_pylist()
            batch = _naive_batch(records, f.dense, sparse, f)
            rows += batch.batch_size
            if rows >= limit:
                return rows, time.perf_counter() - start
    return rows, time.perf_counter() - start


def _naive_batch(records: list[dict], dense_features, sparse: list[str], f) -> Batch:
    dense, labels, users, times = [], [], [], []
    values: dict[str, list[int]] = {k: [] for k in sparse}
    lengths: dict[str, list[int]] = {k: [] for k in sparse}
    for r in records:
        dense.append([r[d.name] if r[d.name] is not None else d.fill_null for d in dense_features])
        labels.append(float(r[f.label]))
        users.append(r[f.user_id])
        times.append(r[f.timestamp])
        for k in sparse:
            ids = r[k] if isinstance(r[k], list) else [r[k]]
            values[k].extend(ids)
            lengths[k].append(len(ids))
    return Batch(
        dense=torch.tensor(dense, dtype=torch.float32),
        sparse=KeyedJaggedTensor(
            keys=sparse,
            values=torch.tensor([v for k in sparse for v in values[k]], dtype=torch.int64),
            lengths=torch.tensor([n for k in sparse for n in lengths[k]], dtype=torch.int32),
        ),
        labels=torch.tensor(labels),
        timestamps=torch.tensor(times, dtype=torch.int64),
        group=torch.tensor(users, dtype=torch.int64),
    )


def fast_batches(path: Path, cfg: ExperimentConfig) -> tuple[int, float, int]:
    """The engine's path (validation included); returns (rows, seconds, bytes of tensors)."""
    convert = BatchConverter(cfg.features)
    start, rows, tensor_bytes = time.perf_counter(), 0, 0
    for table in read_validated(path, cfg.features, batch_size=BATCH_ROWS):
        batch = convert(table)
        rows += batch.batch_size
        tensor_bytes += (
            batch.dense.nbytes
            + batch.sparse.values().nbytes
            + batch.sparse.lengths().nbytes
            + batch.labels.nbytes
            + batch.timestamps.nbytes
            + batch.group.nbytes
        )
    return rows, time.perf_counter() - start, tensor_bytes


def bare_read(files: list[Path], cfg: ExperimentConfig) -> tuple[int, float]:
    """pyarrow alone: every row group of the same columns decoded, nothing else; (rows, s)."""
    columns = cfg.features.column_names()
    start, rows = time.perf_counter(), 0
    for file in files:
        parquet = pq.ParquetFile(file)
        for group in range(parquet.num_row_groups):
            rows += parquet.read_row_group(group, columns=columns).num_rows
    return rows, time.perf_counter() - start


def check_same_first_batch(files: list[Path], cfg: ExperimentConfig) -> None:
    table = pq.ParquetFile(files[0]).read_row_group(0, columns=cfg.features.column_names())
    table = table.slice(0, 2000)
    validate_table(table, cfg.features, str(files[0]))  # also warms up pyarrow.compute
    fast = BatchConverter(cfg.features)(table)
    slow = _naive_batch(
        table.to_pylist(), cfg.features.dense, [s.name for s in cfg.features.sparse], cfg.features
    )
    assert torch.equal(fast.dense, slow.dense), "dense differs"
    assert torch.equal(fast.sparse.values(), slow.sparse.values()), "sparse IDs differ"
    assert torch.equal(fast.sparse.lengths(), slow.sparse.lengths().to(torch.int32))
    assert torch.equal(fast.labels, slow.labels) and torch.equal(fast.group, slow.group)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="200k rows instead of 2M")
    parser.add_argument("--rows", type=int, help="rows to generate (overrides --quick)")
    parser.add_argument("--data", help="an existing Criteo-shaped log instead of generating one")
    parser.add_argument("--repeats", type=int, default=3, help="alternating passes of each")
    args = parser.parse_args()
    rows = args.rows or (200_000 if args.quick else 2_000_000)
    naive_limit = max(rows // 20, 20_000)

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    torch.set_num_threads(1)
    cfg = load_config(REPO / "conf" / "criteo_synth.yaml")

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "log"
        if not args.data:
            from recsys.synth import generate

            generate(cfg, rows=rows, out=data)
        files = parquet_files(data)
        file_bytes = sum(p.stat().st_size for p in files)
        check_same_first_batch(files, cfg)

        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fast_batches(data, cfg)  # warm-up: page cache, pyarrow.compute and torch first calls
        bare_read(files, cfg)
        fast_rates, bare_rates = [], []
        for _ in range(args.repeats):
            fast_rows, fast_s, tensor_bytes = fast_batches(data, cfg)
            fast_rates.append(fast_rows / fast_s)
            bare_rows, bare_s = bare_read(files, cfg)
            bare_rates.append(bare_rows / bare_s)
        rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        naive_rows, naive_s = naive_batches(files, cfg, naive_limit)

    fast_rate, naive_rate = statistics.median(fast_rates), naive_rows / naive_s
    bare_rate = statistics.median(bare_rates)
    ratio, vs_pyarrow = fast_rate / naive_rate, fast_rate / bare_rate
    fast_s = fast_rows / fast_rate
    parquet_mb_s = file_bytes / fast_s / 1e6
    print(f"log: {fast_rows:,} rows, {len(files)} files, {file_bytes / 1e6:.1f} MB Parquet")
    print(
        f"vectorized: {fast_rate:,.0f} rows/s, {parquet_mb_s:.1f} MB/s of Parquet, "
        f"{tensor_bytes / fast_s / 1e6:.1f} MB/s of tensors "
        f"({tensor_bytes / fast_rows:.0f} bytes per row in a Batch)"
    )
    print(
        f"pyarrow bare read of the same files and columns: {bare_rate:,.0f} rows/s, "
        f"{file_bytes * bare_rate / fast_rows / 1e6:.1f} MB/s of Parquet; the engine x"
        f"{vs_pyarrow:.2f} of it (medians of {args.repeats} alternating passes)"
    )
    print(f"naive per-row Python: {naive_rate:,.0f} rows/s on {naive_rows:,} rows")
    print(
        f"peak RSS {rss_peak / 1024:.0f} MiB "
        f"(before the vectorized pass {rss_before / 1024:.0f} MiB)"
    )
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    met = ratio >= 30 and fast_rate >= 1_000_000 and vs_pyarrow >= 0.5
    print(
        f"RESULT ingest ratio={ratio:.1f} goal=30 met={'yes' if met else 'no'} "
        f"rows_per_s={fast_rate:.0f} goal_rows_per_s=1000000 naive_rows_per_s={naive_rate:.0f} "
        f"vs_pyarrow={vs_pyarrow:.2f} goal_vs_pyarrow=0.5 pyarrow_rows_per_s={bare_rate:.0f} "
        f"parquet_mb_s={parquet_mb_s:.1f} bytes_per_row={tensor_bytes / fast_rows:.0f} "
        f"peak_rss_mib={rss_peak / 1024:.0f}"
    )


if __name__ == "__main__":
    main()
