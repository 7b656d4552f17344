"""What both generator families share: ID hashing, Zipf draws, label drawing, the oracle's
AUC histogram, and the writing of day-partitioned Parquet in parallel chunks."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.config import (
    FeaturesConfig,
)

DAY0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
DAY_SECONDS = 86_400
ROW_GROUP_ROWS = 131_072
# Sequence rows carry whole histories: a row group also ends at this many history elements.
ROW_GROUP_ELEMENTS = 2_000_000
DICTIONARY_MAX_VOCAB = 1 << 20  # sparse columns with larger vocabularies are written plain
PILOT_ROWS = 20_000  # rows drawn once to calibrate the planted logit's scale and base
SUMMARY_FILE = "_generator.json"

# --------------------------------------------------------------------------- hashing

_MASK63 = np.uint64((1 << 63) - 1)
# Standard-normal quantiles at the centres of 256 equal-probability cells: one hashed byte
# becomes one (discretized) Gaussian coordinate, with no transcendental function per value.
_BYTE_NORMALS = np.array(
    [NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)], dtype=np.float32
)
_BYTE_NORMALS /= _BYTE_NORMALS.std()


def salt(*parts: object) -> int:
    """A stable 64-bit salt from names (Python's hash() is randomized per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def splitmix64(keys: np.ndarray, key_salt: int) -> np.ndarray:
    """The splitmix64 finalizer of `keys ^ key_salt`: a bijection of uint64, well mixed."""
    z = keys.astype(np.uint64) ^ np.uint64(key_salt % 2**64)
    z += np.uint64(0x9E3779B97F4A7C15)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def raw_ids(index: np.ndarray, feature_salt: int) -> np.ndarray:
    """Vocabulary index -> raw non-negative int64 ID, bijective for a given salt.

    Every step (add, xor-shift, multiply by an odd constant) is a bijection modulo 2**63,
    so distinct indices never share an ID and all IDs spread over the positive int64 range.
    """
    x = (index.astype(np.uint64) + np.uint64(feature_salt & int(_MASK63))) & _MASK63
    x ^= x >> np.uint64(31)
    x = (x * np.uint64(0x7FB5D329728EA185)) & _MASK63
    x ^= x >> np.uint64(27)
    x = (x * np.uint64(0x81DADEF4BC2DD44D)) & _MASK63
    x ^= x >> np.uint64(33)
    return x.astype(np.int64)


def hashed_uniform(keys: np.ndarray, key_salt: int) -> np.ndarray:
    """One uniform [0, 1) per key, a pure function of (key, salt)."""
    return (splitmix64(keys, key_salt) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def hashed_normals(keys: np.ndarray, key_salt: int, dim: int) -> np.ndarray:
    """A (len(keys), dim) float32 standard-normal vector (256 levels per coordinate) per key,
    a pure function of (key, salt): latent vectors of 1e8 IDs without a table."""
    words = -(-dim // 8)
    hashed = np.empty((len(keys), words), dtype="<u8")
    for w in range(words):
        hashed[:, w] = splitmix64(keys, key_salt + w)
    return _BYTE_NORMALS[hashed.view(np.uint8).reshape(len(keys), words * 8)[:, :dim]]


def zipf_ranks(u: np.ndarray, n: np.ndarray | int, exponent: float) -> np.ndarray:
    """Inverse CDF of a power law on ranks 0..n-1 (P(r) ~ (r+1)^-exponent, exponent != 1),
    with O(1) memory in n.

    Continuous approximation: x = (1 + u ((n+1)^a - 1))^(1/a), a = 1 - exponent, is power-law
    distributed on [1, n+1), rank = floor(x) - 1; expm1 keeps (n+1)^a - 1 accurate when the
    exponent is close to 1. In place, as it runs on every sparse value drawn.
    """
    a = 1.0 - exponent
    top = np.asarray(n, dtype=np.float64)
    x = u * np.expm1(a * np.log(top + 1.0))
    x += 1.0
    np.log(x, out=x)
    x *= 1.0 / a
    np.exp(x, out=x)
    return np.minimum(x.astype(np.int64) - 1, top.astype(np.int64) - 1)


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1."""
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --------------------------------------------------------------------------- oracle AUC


@dataclass
class AucHistogram:
    """Streaming AUC of a score in [-LIMIT, LIMIT] from per-bin class counts.

    Bins are 1/2048 of a logit unit wide, so the AUC is exact up to ties inside a bin
    (far below 1e-3), in bounded memory for any number of rows.
    """

    LIMIT = 16.0
    BINS = 65_536
    counts: np.ndarray = field(default_factory=lambda: np.zeros((2, AucHistogram.BINS), np.int64))

    def add(self, scores: np.ndarray, labels: np.ndarray) -> None:
        scaled = (np.clip(scores, -self.LIMIT, self.LIMIT) + self.LIMIT) / (2 * self.LIMIT)
        bins = np.minimum((scaled * self.BINS).astype(np.int64), self.BINS - 1)
        flat = np.bincount(bins + self.BINS * labels.astype(np.int64), minlength=2 * self.BINS)
        self.counts += flat.reshape(2, self.BINS)

    def merged(self, other: AucHistogram) -> AucHistogram:
        return AucHistogram(self.counts + other.counts)

    def auc(self) -> float | None:
        neg, pos = self.counts
        n_neg, n_pos = int(neg.sum()), int(pos.sum())
        if n_neg == 0 or n_pos == 0:
            return None
        below = np.cumsum(neg) - neg
        return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def calibrate_base(logits: np.ndarray, noise: np.ndarray, rate: float) -> float:
    """The constant b with mean(sigmoid(b + logits + noise)) == rate, by bisection."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _sigmoid(mid + logits + noise).mean() < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def draw_labels(logits: np.ndarray, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    noisy = logits + noise_std * rng.standard_normal(len(logits))
    return (rng.random(len(logits)) < _sigmoid(noisy)).astype(np.int8)


# --------------------------------------------------------------------------- writing


def day_name(day: int) -> str:
    return (DAY0 + timedelta(days=day)).strftime("%Y-%m-%d")


def day_start(day: int) -> int:
    return int((DAY0 + timedelta(days=day)).timestamp())


def id_list(lengths: np.ndarray, values: np.ndarray) -> pa.ListArray:
    """A list<int64> column from per-row lengths and the flat values, no copy of values."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int64()))


def prepare_out(out: Path) -> None:
    """Refuse to write into a foreign non-empty folder; replace an earlier generator run."""
    if out.exists() and any(out.iterdir()):
        if not (out / SUMMARY_FILE).exists():
            raise ValueError(f"{out} is not empty and holds no {SUMMARY_FILE}: not overwriting it")
        for part in out.glob("day=*"):
            shutil.rmtree(part)
        (out / SUMMARY_FILE).unlink()
    out.mkdir(parents=True, exist_ok=True)


def rows_per_day(rows: int, days: int) -> list[int]:
    return [rows // days + (d < rows % days) for d in range(days)]


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting: numpy's hash-based unique is several times slower on IDs."""
    ordered = np.sort(values)
    keep = np.empty(len(ordered), bool)
    keep[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


class DistinctCounter:
    """Exact distinct vocabulary indices per feature over the whole log, in memory
    proportional to the distinct count: chunk uniques are merged once they outgrow it."""

    def __init__(self, names: list[str]) -> None:
        self.seen = {n: np.empty(0, np.uint64) for n in names}
        self.pending: dict[str, list[np.ndarray]] = {n: [] for n in names}

    def add(self, name: str, unique_index: np.ndarray) -> None:
        parts = self.pending[name]
        parts.append(unique_index)
        if sum(map(len, parts)) > max(len(self.seen[name]), 1 << 20):
            self._merge(name)

    def _merge(self, name: str) -> None:
        self.seen[name] = sorted_unique(np.concatenate([self.seen[name], *self.pending[name]]))
        self.pending[name].clear()

    def counts(self) -> dict[str, int]:
        for name in self.seen:
            self._merge(name)
        return {name: len(values) for name, values in self.seen.items()}


@dataclass
class Chunk:
    """One generated row group and what the summary needs from it."""

    day: int
    table: pa.Table
    logits: np.ndarray  # the planted noise-free logit (the oracle score)
    labels: np.ndarray
    uniques: dict[str, np.ndarray]  # feature -> distinct vocabulary indices in the chunk
    history_lengths: np.ndarray | None = None  # sequence family


@dataclass
class RunState:
    """What the summary needs, accumulated chunk by chunk while the log is written."""

    distinct: DistinctCounter
    auc: dict[int, AucHistogram] = field(default_factory=dict)
    positives: int = 0
    rows: int = 0
    history_lengths: np.ndarray | None = None  # sequence family: rows per history length

    def record(self, chunk: Chunk) -> None:
        self.auc.setdefault(chunk.day, AucHistogram()).add(chunk.logits, chunk.labels)
        self.positives += int(chunk.labels.sum())
        self.rows += len(chunk.labels)
        for name, unique in chunk.uniques.items():
            self.distinct.add(name, unique)
        if chunk.history_lengths is not None and self.history_lengths is not None:
            self.history_lengths += chunk.history_lengths

    def summary(self) -> dict[str, Any]:
        total = AucHistogram()
        for hist in self.auc.values():
            total = total.merged(hist)
        return {
            "positive_rate": self.positives / max(self.rows, 1),
            "oracle_auc": total.auc(),
            "oracle_auc_per_day": {day_name(d): h.auc() for d, h in sorted(self.auc.items())},
            "distinct_ids": self.distinct.counts(),
        }


def in_order(tasks: Iterable[Callable[[], Chunk]]) -> Iterator[Chunk]:
    """Run chunk tasks on a thread pool (numpy and Arrow release the GIL on big arrays) and
    yield their results in submission order, with a bounded number of chunks in memory."""
    workers = min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        running: deque[Future[Chunk]] = deque()
        for task in tasks:
            running.append(pool.submit(task))
            if len(running) > workers:
                yield running.popleft().result()
        while running:
            yield running.popleft().result()


def write_chunks(
    out: Path,
    schema: pa.Schema,
    dictionary: list[str],
    chunks: Iterable[Chunk],
    state: RunState,
) -> list[str]:
    """Write time-ordered chunks, one row group each, to `day=YYYY-MM-DD/part-00000.parquet`.

    Dictionary encoding only for low-cardinality columns: on hash-like IDs it costs a third
    of the write time for a few percent of size.
    """
    files: list[str] = []
    writer: pq.ParquetWriter | None = None
    day = None
    try:
        for chunk in chunks:
            if chunk.day != day:
                if writer is not None:
                    writer.close()
                day = chunk.day
                files.append(f"day={day_name(day)}/part-00000.parquet")
                (out / files[-1]).parent.mkdir(parents=True, exist_ok=True)
                writer = pq.ParquetWriter(
                    out / files[-1], schema, compression="lz4", use_dictionary=dictionary
                )
            writer.write_table(chunk.table, row_group_size=chunk.table.num_rows)
            state.record(chunk)
    finally:
        if writer is not None:
            writer.close()
    return files


def log_schema(features: FeaturesConfig) -> pa.Schema:
    """The Parquet contract's types for exactly the declared columns, in declaration order."""
    ids = pa.list_(pa.int64())
    types = {features.label: pa.int8(), features.timestamp: pa.int64()}
    if features.user_id:
        types[features.user_id] = pa.int64()
    types |= {f.name: pa.float32() for f in features.dense}
    types |= {f.name: ids if f.multi_valued else pa.int64() for f in features.sparse}
    types |= {s.name: ids for s in features.sequences}
    if features.sequence_timestamps:
        types[features.sequence_timestamps] = ids
    return pa.schema(list(types.items()))


def arrow_table(schema: pa.Schema, columns: dict[str, Any]) -> pa.Table:
    return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)
