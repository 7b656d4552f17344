"""Synthetic Parquet logs with a planted model, so that table variants can be compared on AUC.

Two families, chosen by `data.synthetic.family`:

- `ctr`: Criteo-shaped impressions (dense counts, single- and multi-valued sparse IDs from
  Zipf-popular, daily drifting vocabularies, a Zipf user population) labelled by a planted
  factorization-machine-like click model.
- `sequence`: Taobao-shaped impressions with long behaviour histories, labelled by a planted
  target-attention model whose attention and representation follow different item factors:
  logit = <r_t, sum_h softmax_h(sharpness * <a_t, a_h> - recency) r_h>. The attention factor
  a is mostly the item's category direction (which behaviours matter: those of the same
  and of similar categories); the representation r (what they contribute) is a category
  direction independent of it (a quarter of r's variance) plus the item's own. So both the
  item and the category table of a coupled model are asked for two unrelated factors, the
  situation DARE addresses: attending with r instead of a costs about two thirds of the
  AUC gap between mean pooling and the oracle (tests/test_synth.py). The per-category part
  of r also lets a log of a few rows per item teach a model something about r.

Everything random about a CTR ID (its raw 64-bit value, latent vector, drift phase) is a
hash of (feature, vocabulary index), computed on the fly, so vocabularies of 1e8 cost no
memory; the sequence family's item factors are seeded tables (num_items rows). Everything
random about a row comes from a numpy Generator seeded by (seed, day, chunk), so a config
and a row count always give the same data. The "oracle" is the planted noise-free logit: the
click probability given the columns, E[sigmoid(logit + noise)], increases with it, so its
AUC against the sampled labels is the best any model of the columns can reach (up to the
rounding of dense counts).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from functools import partial
from itertools import combinations
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.config import (
    ConfigError,
    CtrSyntheticConfig,
    ExperimentConfig,
    FeaturesConfig,
    SequenceSyntheticConfig,
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


def _unit(x: np.ndarray) -> np.ndarray:
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


def _calibrate_base(logits: np.ndarray, noise: np.ndarray, rate: float) -> float:
    """The constant b with mean(sigmoid(b + logits + noise)) == rate, by bisection."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _sigmoid(mid + logits + noise).mean() < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _draw_labels(logits: np.ndarray, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    noisy = logits + noise_std * rng.standard_normal(len(logits))
    return (rng.random(len(logits)) < _sigmoid(noisy)).astype(np.int8)


# --------------------------------------------------------------------------- writing


def _day_name(day: int) -> str:
    return (DAY0 + timedelta(days=day)).strftime("%Y-%m-%d")


def _day_start(day: int) -> int:
    return int((DAY0 + timedelta(days=day)).timestamp())


def _id_list(lengths: np.ndarray, values: np.ndarray) -> pa.ListArray:
    """A list<int64> column from per-row lengths and the flat values, no copy of values."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int64()))


def _prepare_out(out: Path) -> None:
    """Refuse to write into a foreign non-empty folder; replace an earlier generator run."""
    if out.exists() and any(out.iterdir()):
        if not (out / SUMMARY_FILE).exists():
            raise ValueError(f"{out} is not empty and holds no {SUMMARY_FILE}: not overwriting it")
        for part in out.glob("day=*"):
            shutil.rmtree(part)
        (out / SUMMARY_FILE).unlink()
    out.mkdir(parents=True, exist_ok=True)


def _rows_per_day(rows: int, days: int) -> list[int]:
    return [rows // days + (d < rows % days) for d in range(days)]


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting: numpy's hash-based unique is several times slower on IDs."""
    ordered = np.sort(values)
    keep = np.empty(len(ordered), bool)
    keep[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


class _DistinctCounter:
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
        self.seen[name] = _sorted_unique(np.concatenate([self.seen[name], *self.pending[name]]))
        self.pending[name].clear()

    def counts(self) -> dict[str, int]:
        for name in self.seen:
            self._merge(name)
        return {name: len(values) for name, values in self.seen.items()}


@dataclass
class _Chunk:
    """One generated row group and what the summary needs from it."""

    day: int
    table: pa.Table
    logits: np.ndarray  # the planted noise-free logit (the oracle score)
    labels: np.ndarray
    uniques: dict[str, np.ndarray]  # feature -> distinct vocabulary indices in the chunk
    history_lengths: np.ndarray | None = None  # sequence family


@dataclass
class _RunState:
    """What the summary needs, accumulated chunk by chunk while the log is written."""

    distinct: _DistinctCounter
    auc: dict[int, AucHistogram] = field(default_factory=dict)
    positives: int = 0
    rows: int = 0
    history_lengths: np.ndarray | None = None  # sequence family: rows per history length

    def record(self, chunk: _Chunk) -> None:
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
            "oracle_auc_per_day": {_day_name(d): h.auc() for d, h in sorted(self.auc.items())},
            "distinct_ids": self.distinct.counts(),
        }


def _in_order(tasks: Iterable[Callable[[], _Chunk]]) -> Iterator[_Chunk]:
    """Run chunk tasks on a thread pool (numpy and Arrow release the GIL on big arrays) and
    yield their results in submission order, with a bounded number of chunks in memory."""
    workers = min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        running: deque[Future[_Chunk]] = deque()
        for task in tasks:
            running.append(pool.submit(task))
            if len(running) > workers:
                yield running.popleft().result()
        while running:
            yield running.popleft().result()


def _write_chunks(
    out: Path,
    schema: pa.Schema,
    dictionary: list[str],
    chunks: Iterable[_Chunk],
    state: _RunState,
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
                files.append(f"day={_day_name(day)}/part-00000.parquet")
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


def _schema(features: FeaturesConfig) -> pa.Schema:
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


def _arrow_table(schema: pa.Schema, columns: dict[str, Any]) -> pa.Table:
    return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)


# --------------------------------------------------------------------------- CTR family

USER_ZIPF = 0.7  # user activity: skewed, but no user owns a large share of the log
USER_FEATURES = 3  # sparse features whose vectors interact with the user vector


@dataclass(frozen=True)
class _SparseSpec:
    """A sparse feature's vocabulary size and the salt of all its hashes."""

    name: str
    vocab: int
    multi_valued: bool
    salt: int


@dataclass(frozen=True)
class _CtrPlan:
    """Everything fixed for a CTR log: vocabularies, the click model, dense feature shapes."""

    synth: CtrSyntheticConfig
    label: str
    timestamp: str
    user_id: str | None
    dense: list[str]
    sparse: list[_SparseSpec]
    pairs: list[tuple[int, int]]
    user_features: list[int]
    # First-order effect of an ID = <its latent vector, the feature's direction>; the
    # directions' lengths make some features matter more than others.
    bias_directions: np.ndarray  # (sparse features, latent_dim)
    dense_weights: np.ndarray
    dense_mu: np.ndarray
    dense_sigma: np.ndarray
    term_scale: dict[str, float] = field(default_factory=dict)
    base: float = 0.0


def vocab_sizes(synth: CtrSyntheticConfig, names: list[str]) -> dict[str, int]:
    """Log-uniform sizes from vocab_min to vocab_max in declaration order, unless overridden."""
    lo, hi = math.log(synth.vocab_min), math.log(synth.vocab_max)
    steps = max(len(names) - 1, 1)
    sizes = {n: round(math.exp(lo + (hi - lo) * i / steps)) for i, n in enumerate(names)}
    if len(names) == 1:
        sizes[names[0]] = synth.vocab_max
    return sizes | dict(synth.vocab)


def _ctr_plan(cfg: ExperimentConfig, synth: CtrSyntheticConfig) -> _CtrPlan:
    feats = cfg.features
    if feats.sequences or feats.sequence_timestamps:
        raise ConfigError(
            "data.synthetic: family 'ctr' writes no behaviour sequences; "
            "use family 'sequence' or drop features.sequences"
        )
    # The user_id column may also be read as an ID feature; it is drawn as the user.
    item_features = [f for f in feats.sparse if f.name != feats.user_id]
    names = [f.name for f in item_features]
    sizes = vocab_sizes(synth, names)
    sparse = [
        _SparseSpec(f.name, sizes[f.name], f.multi_valued, salt(synth.seed, "ctr", f.name))
        for f in item_features
    ]
    rng = np.random.default_rng([synth.seed, 1])
    all_pairs = list(combinations(range(len(sparse)), 2))
    chosen = rng.permutation(len(all_pairs))[: len(sparse)] if all_pairs else []
    user_features = rng.permutation(len(sparse))[:USER_FEATURES] if feats.user_id else []
    n_dense = len(feats.dense)
    weights = rng.standard_normal(n_dense)
    importance = rng.exponential(size=len(sparse))
    directions = _unit(rng.standard_normal((len(sparse), synth.latent_dim)))
    return _CtrPlan(
        synth=synth,
        label=feats.label,
        timestamp=feats.timestamp,
        user_id=feats.user_id,
        dense=[f.name for f in feats.dense],
        sparse=sparse,
        pairs=sorted(all_pairs[i] for i in chosen),
        user_features=sorted(int(i) for i in user_features),
        bias_directions=(directions * importance[:, None]).astype(np.float32),
        dense_weights=weights / max(np.linalg.norm(weights), 1e-12),
        dense_mu=rng.uniform(-0.5, 3.0, n_dense),
        dense_sigma=rng.uniform(0.6, 1.6, n_dense),
    )


def _drifted_index(spec: _SparseSpec, ranks: np.ndarray, day: int, drift: float) -> np.ndarray:
    """Popularity rank -> vocabulary index on `day`.

    Each rank holds a generation of IDs: index = rank + vocab * generation, with
    generation = floor(day * drift + phase(rank)) and phase uniform per rank. So each day a
    share `drift` of the ranks, spread over the whole popularity curve, switch to a brand-new
    ID (with a new latent vector) and their old ID is never drawn again. The phase is the
    rank's 64-bit hash / 2**64, compared as an integer: this runs on every value drawn.
    """
    whole, frac = divmod(day * drift, 1.0)
    generation = np.full(len(ranks), int(whole), np.int64)
    if frac > 0:
        threshold = np.uint64(min(int((1.0 - frac) * 2.0**64), 2**64 - 1))
        generation += splitmix64(ranks, spec.salt + 1) >= threshold
    return (ranks + spec.vocab * generation).astype(np.uint64)


@dataclass
class _SparseDraw:
    """One chunk of one sparse feature: vocabulary indices and their latent vectors."""

    index: np.ndarray  # flat vocabulary indices (all bag members)
    lengths: np.ndarray | None  # bag lengths for multi-valued features
    vector: np.ndarray  # (rows, latent_dim) latent vector (the bag mean)


def _draw_sparse(
    plan: _CtrPlan, spec: _SparseSpec, day: int, n: int, rng: np.random.Generator
) -> _SparseDraw:
    synth = plan.synth
    lengths = rng.integers(1, synth.max_bag + 1, n) if spec.multi_valued else None
    total = int(lengths.sum()) if lengths is not None else n
    ranks = zipf_ranks(rng.random(total), spec.vocab, synth.zipf_exponent)
    index = _drifted_index(spec, ranks, day, synth.daily_drift)
    vector = hashed_normals(index, spec.salt + 2, synth.latent_dim)
    if lengths is not None:
        starts = np.cumsum(lengths) - lengths
        vector = np.add.reduceat(vector, starts, axis=0) / lengths[:, None].astype(np.float32)
    return _SparseDraw(index, lengths, vector)


def _diurnal_cumulative(n: int, rng: np.random.Generator) -> np.ndarray:
    """Cumulative impressions per second of a day with a day/night cycle; row i of the day
    falls in second searchsorted(cum, i, 'right'), so any slice of rows is time-sorted."""
    seconds = np.arange(DAY_SECONDS)
    weight = 1.0 + 0.6 * np.sin(2 * np.pi * (seconds / DAY_SECONDS - 0.3))
    return np.cumsum(rng.multinomial(n, weight / weight.sum()))


def _dense_values(plan: _CtrPlan, z: np.ndarray) -> np.ndarray:
    """Criteo-like dense columns from standard normals z (features x rows): three in four are
    heavy-tailed non-negative counts floor(exp(mu + sigma z) - 1)+, the rest continuous."""
    values = (plan.dense_mu[:, None] + plan.dense_sigma[:, None] * z).astype(np.float32)
    counts = np.arange(len(values)) % 4 != 3
    values[counts] = np.floor(np.maximum(np.expm1(values[counts]), 0.0))
    return values


def _pair_term(plan: _CtrPlan, vectors: list[np.ndarray]) -> np.ndarray:
    total = np.zeros(len(vectors[0]) if vectors else 0, np.float64)
    for a, b in plan.pairs:
        total += np.einsum("ij,ij->i", vectors[a], vectors[b])
    return total


def _ctr_chunk(
    plan: _CtrPlan, day: int, seconds: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[dict[str, pa.Array], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Draw n rows: (Arrow columns without the label, raw logit terms, vocab indices)."""
    columns: dict[str, pa.Array] = {plan.timestamp: pa.array(_day_start(day) + seconds)}
    terms: dict[str, np.ndarray] = {}
    latent = plan.synth.latent_dim
    user_vec = None
    if plan.user_id:
        users = zipf_ranks(rng.random(n), plan.synth.num_users, USER_ZIPF).astype(np.uint64)
        user_salt = salt(plan.synth.seed, "ctr", plan.user_id)
        columns[plan.user_id] = pa.array(raw_ids(users, user_salt))
        user_vec = hashed_normals(users, user_salt + 3, latent)
        terms["user"] = hashed_normals(users, user_salt + 2, 1)[:, 0]
    if plan.dense:
        z = rng.standard_normal((len(plan.dense), n))
        values = _dense_values(plan, z)
        columns.update(zip(plan.dense, values, strict=True))
        terms["dense"] = plan.dense_weights @ z
    indices: dict[str, np.ndarray] = {}
    vectors: list[np.ndarray] = []
    bias = np.zeros(n)
    for spec, direction in zip(plan.sparse, plan.bias_directions, strict=True):
        draw = _draw_sparse(plan, spec, day, n, rng)
        ids = raw_ids(draw.index, spec.salt)
        columns[spec.name] = _id_list(draw.lengths, ids) if draw.lengths is not None else ids
        indices[spec.name] = draw.index
        bias += draw.vector @ direction
        vectors.append(draw.vector)
    if plan.sparse:
        terms["bias"] = bias
    if plan.pairs:
        terms["pairs"] = _pair_term(plan, vectors)
    if user_vec is not None:
        for f in plan.user_features:
            terms["user"] = terms["user"] + np.einsum("ij,ij->i", user_vec, vectors[f])
    return columns, terms, indices


def _ctr_logits(plan: _CtrPlan, terms: dict[str, np.ndarray]) -> np.ndarray:
    logit = np.full(len(next(iter(terms.values()))), plan.base)
    for name, values in terms.items():
        logit += plan.term_scale[name] * values
    return logit


def _calibrated(plan: _CtrPlan) -> _CtrPlan:
    """Scale each logit part to its planned spread and set the base to hit base_ctr,
    measured on a pilot sample (vocabulary skew makes the analytic variance unreliable)."""
    rng = np.random.default_rng([plan.synth.seed, 2])
    seconds = np.zeros(PILOT_ROWS, np.int64)
    _, terms, _ = _ctr_chunk(plan, 0, seconds, PILOT_ROWS, rng)
    wanted = plan.synth.logit_std.model_dump()
    scale = {k: wanted[k] / max(float(v.std()), 1e-12) for k, v in terms.items()}
    plan = replace(plan, term_scale=scale)
    noise = plan.synth.noise * rng.standard_normal(PILOT_ROWS)
    base = _calibrate_base(_ctr_logits(plan, terms), noise, plan.synth.base_ctr)
    return replace(plan, base=base)


def _ctr_chunk_task(
    plan: _CtrPlan, schema: pa.Schema, day: int, chunk: int, seconds: np.ndarray
) -> _Chunk:
    rng = np.random.default_rng([plan.synth.seed, 4, day, chunk])
    columns, terms, indices = _ctr_chunk(plan, day, seconds, len(seconds), rng)
    logits = _ctr_logits(plan, terms)
    labels = _draw_labels(logits, plan.synth.noise, rng)
    columns[plan.label] = labels
    uniques = {name: _sorted_unique(index) for name, index in indices.items()}
    return _Chunk(day, _arrow_table(schema, columns), logits, labels, uniques)


def _ctr_tasks(plan: _CtrPlan, schema: pa.Schema, rows: int) -> Iterator[Callable[[], _Chunk]]:
    """One task per row group, day after day; each day's rows are spread over its seconds
    once, so every chunk is time-sorted and follows the previous one."""
    for day, day_rows in enumerate(_rows_per_day(rows, plan.synth.days)):
        cumulative = _diurnal_cumulative(day_rows, np.random.default_rng([plan.synth.seed, 3, day]))
        for chunk, start in enumerate(range(0, day_rows, ROW_GROUP_ROWS)):
            rows_here = np.arange(start, min(start + ROW_GROUP_ROWS, day_rows))
            seconds = np.searchsorted(cumulative, rows_here, side="right")
            yield partial(_ctr_chunk_task, plan, schema, day, chunk, seconds)


def _generate_ctr(cfg: ExperimentConfig, plan: _CtrPlan, rows: int, out: Path) -> dict[str, Any]:
    plan = _calibrated(plan)
    schema = _schema(cfg.features)
    state = _RunState(_DistinctCounter([f.name for f in plan.sparse]))
    small = [f.name for f in plan.sparse if f.vocab <= DICTIONARY_MAX_VOCAB]
    dictionary = [plan.label, *plan.dense, *small]
    files = _write_chunks(out, schema, dictionary, _in_order(_ctr_tasks(plan, schema, rows)), state)
    return {"files": files, "vocab": {f.name: f.vocab for f in plan.sparse}, **state.summary()}


# --------------------------------------------------------------------------- sequence family

PRE_LOG_DAYS = 30  # every user's first `length` behaviours happen in the 30 days before day 0
TIME_JITTER = 0.9  # behaviour k happens in [k, k + 0.9) of the user's slots: strictly ordered
CATEGORY_ZIPF = 1.2
ITEM_ZIPF = 1.1  # popularity of items inside their category
MAX_INTERESTS = 4  # a user's favourite categories
HISTORY_INTEREST_SHARE = 0.8  # behaviours in a favourite category; the rest anywhere
TARGET_INTEREST_SHARE = 0.5  # candidates in a favourite category; the rest anywhere
ATTENTION_SHARPNESS = 8.0  # on <a_t, a_h> of unit vectors: same-category behaviours win
RECENCY = 0.5  # attention penalty per log(1 + behaviours since)
CATEGORY_SHARE = 0.8  # of an item's attention factor that is its category's direction
# Of an item's representation variance that is its category's (a direction independent of
# the category's attention one): the category table, too, must serve both factors.
REPRESENTATION_CATEGORY_SHARE = 0.25
SEQ_LOGIT_STD = 2.2  # spread of the planted logit: oracle AUC about 0.85 at noise 0.5
SEQ_POSITIVE_RATE = 1 / 3  # about two negatives per positive


@dataclass(frozen=True)
class _SeqPlan:
    """The item universe and the planted attention model of a sequence log."""

    synth: SequenceSyntheticConfig
    columns: dict[str, str]  # role -> column name
    sequences: list[tuple[str, str]]  # (column, "item" | "category")
    categories: int
    attention: np.ndarray  # (items, latent_dim) unit vectors a_i
    representation: np.ndarray  # (items, latent_dim) r_i, independent of a_i
    scale: float = 1.0
    base: float = 0.0


def _seq_plan(cfg: ExperimentConfig, synth: SequenceSyntheticConfig) -> _SeqPlan:
    feats = cfg.features
    roles = {synth.item_feature: "item", synth.category_feature: "category"}
    extra = [f.name for f in feats.dense]
    extra += [f.name for f in feats.sparse if f.name not in roles and f.name != feats.user_id]
    if extra:
        raise ConfigError(
            f"data.synthetic: family 'sequence' generates only {sorted(roles)}, "
            f"not the declared features {extra}"
        )
    multi = [f.name for f in feats.sparse if f.multi_valued]
    if multi:
        raise ConfigError(f"data.synthetic: family 'sequence' needs single-valued {multi}")
    categories = min(synth.num_categories, synth.num_items)
    rng = np.random.default_rng([synth.seed, 11])
    k = synth.latent_dim
    cat_dir = rng.standard_normal((categories, k), dtype=np.float32)
    own = rng.standard_normal((synth.num_items, k), dtype=np.float32)
    item_cat = np.arange(synth.num_items) % categories
    attention = CATEGORY_SHARE * _unit(cat_dir)[item_cat] + (1 - CATEGORY_SHARE) * _unit(own)
    own_representation = rng.standard_normal((synth.num_items, k), dtype=np.float32)
    cat_representation = rng.standard_normal((categories, k), dtype=np.float32)[item_cat]
    share = REPRESENTATION_CATEGORY_SHARE
    representation = math.sqrt(share) * cat_representation
    representation += math.sqrt(1 - share) * own_representation
    columns = {"label": feats.label, "timestamp": feats.timestamp, "item": synth.item_feature}
    columns["category"] = synth.category_feature
    if feats.user_id:
        columns["user"] = feats.user_id
    if feats.sequence_timestamps:
        columns["history_time"] = feats.sequence_timestamps
    return _SeqPlan(
        synth=synth,
        columns=columns,
        sequences=[(s.name, roles[s.target]) for s in feats.sequences],
        categories=categories,
        attention=_unit(attention),
        representation=representation / np.float32(math.sqrt(k)),
    )


def _items_from(
    plan: _SeqPlan, users: np.ndarray, u: list[np.ndarray], share: float
) -> tuple[np.ndarray, np.ndarray]:
    """(item, category) per draw: from one of the user's favourite categories with
    probability `share`, else from the global category popularity; inside the category by
    item popularity. `u` holds 4 uniforms per draw. Item i belongs to category i mod C."""
    seed, c = plan.synth.seed, plan.categories
    favourites = np.uint64(1) + splitmix64(users, salt(seed, "interests")) % np.uint64(
        MAX_INTERESTS
    )
    slot = (u[0] * favourites).astype(np.uint64)
    favourite = hashed_uniform(users * np.uint64(MAX_INTERESTS) + slot, salt(seed, "favourite"))
    category = zipf_ranks(np.where(u[2] < share, favourite, u[1]), c, CATEGORY_ZIPF)
    in_category = (plan.synth.num_items - category + c - 1) // c
    return category + c * zipf_ranks(u[3], in_category, ITEM_ZIPF), category


def _history_start() -> int:
    return _day_start(0) - PRE_LOG_DAYS * DAY_SECONDS


def _behaviour_gap(plan: _SeqPlan, users: np.ndarray) -> np.ndarray:
    """Seconds between a user's behaviours: the user's log-uniform count of behaviours in
    [min_history, max_history] fills the PRE_LOG_DAYS before day 0, and goes on at that pace."""
    lo, hi = math.log(plan.synth.min_history), math.log(plan.synth.max_history)
    u = hashed_uniform(users, salt(plan.synth.seed, "length"))
    length = np.round(np.exp(lo + (hi - lo) * u))
    length = np.clip(length, plan.synth.min_history, plan.synth.max_history)
    return PRE_LOG_DAYS * DAY_SECONDS / length


def _behaviour_times(users: np.ndarray, k: np.ndarray, gap: np.ndarray, seed: int) -> np.ndarray:
    """Time of a user's k-th behaviour: inside slot [k, k + 0.9) * gap, so strictly increasing."""
    jitter = TIME_JITTER * hashed_uniform(_event_keys(users, k), salt(seed, "jitter"))
    return _history_start() + np.floor((k + jitter) * gap).astype(np.int64)


def _event_keys(users: np.ndarray, k: np.ndarray) -> np.ndarray:
    return (users << np.uint64(32)) | k.astype(np.uint64)


def _history_counts(plan: _SeqPlan, users: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Number of the user's behaviours strictly before t (all slots before t's slot, plus
    t's own slot when its behaviour already happened)."""
    gap = _behaviour_gap(plan, users)
    slot = np.floor((t - _history_start()) / gap).astype(np.int64)
    return slot + (_behaviour_times(users, slot, gap, plan.synth.seed) < t)


@dataclass
class _Histories:
    """Jagged histories of a chunk of impressions (flat, oldest first within a row)."""

    lengths: np.ndarray
    items: np.ndarray
    categories: np.ndarray
    times: np.ndarray


def _histories(plan: _SeqPlan, users: np.ndarray, counts: np.ndarray) -> _Histories:
    """Each impression's history: the user's last <= max_history behaviours before it."""
    seed = plan.synth.seed
    lengths = np.minimum(counts, plan.synth.max_history)
    row = np.repeat(np.arange(len(users)), lengths)
    starts = np.cumsum(lengths) - lengths
    k = (counts - lengths - starts)[row] + np.arange(len(row))
    flat_users = users[row]
    keys = _event_keys(flat_users, k)
    u = [hashed_uniform(keys, salt(seed, "behaviour", j)) for j in range(4)]
    items, categories = _items_from(plan, flat_users, u, HISTORY_INTEREST_SHARE)
    gap = _behaviour_gap(plan, users)[row]
    return _Histories(lengths, items, categories, _behaviour_times(flat_users, k, gap, seed))


def _attention_logits(plan: _SeqPlan, targets: np.ndarray, hist: _Histories) -> np.ndarray:
    """<r_t, sum_h softmax_h(sharpness * <a_t, a_h> - recency(h)) r_h> per impression."""
    row = np.repeat(np.arange(len(targets)), hist.lengths)
    starts = np.cumsum(hist.lengths) - hist.lengths
    age = ((starts + hist.lengths - 1)[row] - np.arange(len(row))).astype(np.float32)
    a, r = plan.attention, plan.representation
    score = ATTENTION_SHARPNESS * np.einsum("ij,ij->i", a[targets][row], a[hist.items])
    score -= RECENCY * np.log1p(age)
    score -= np.maximum.reduceat(score, starts)[row]
    weight = np.exp(score)
    weight /= np.add.reduceat(weight, starts)[row]
    interest = np.add.reduceat(weight[:, None] * r[hist.items], starts, axis=0)
    return np.einsum("ij,ij->i", r[targets], interest)


@dataclass
class _Impressions:
    """A day's impressions in time order: who, when, which candidate."""

    users: np.ndarray
    times: np.ndarray
    items: np.ndarray
    categories: np.ndarray
    counts: np.ndarray  # behaviours before the impression


def _impressions(plan: _SeqPlan, day: int, rows: int, rng: np.random.Generator) -> _Impressions:
    """Every user gets rows // num_users impressions, the remainder goes to distinct random
    users; times uniform over the day; candidates partly from the user's favourites."""
    n_users = plan.synth.num_users
    rest = rng.choice(n_users, rows % n_users, replace=False)
    users = np.concatenate([np.tile(np.arange(n_users), rows // n_users), rest])
    times = _day_start(day) + rng.integers(0, DAY_SECONDS, rows)
    order = np.lexsort((users, times))
    users, times = users[order].astype(np.uint64), times[order]
    items, categories = _items_from(plan, users, list(rng.random((4, rows))), TARGET_INTEREST_SHARE)
    return _Impressions(users, times, items, categories, _history_counts(plan, users, times))


def _seq_chunks(counts: np.ndarray, max_history: int) -> Iterator[tuple[int, int]]:
    """Row ranges of at most ROW_GROUP_ROWS rows and about ROW_GROUP_ELEMENTS history items."""
    ends = np.cumsum(np.minimum(counts, max_history))
    start = 0
    while start < len(counts):
        budget = (ends[start - 1] if start else 0) + ROW_GROUP_ELEMENTS
        end = int(np.searchsorted(ends, budget, side="right"))
        end = min(max(end, start + 1), start + ROW_GROUP_ROWS)
        yield start, end
        start = end


def _seq_columns(
    plan: _SeqPlan, imp: _Impressions, hist: _Histories, labels: np.ndarray
) -> dict[str, Any]:
    seed, c = plan.synth.seed, plan.columns
    item_salt, cat_salt = salt(seed, "seq", "item"), salt(seed, "seq", "category")
    columns: dict[str, Any] = {
        c["label"]: labels,
        c["timestamp"]: imp.times,
        c["item"]: raw_ids(imp.items, item_salt),
        c["category"]: raw_ids(imp.categories, cat_salt),
    }
    if "user" in c:
        columns[c["user"]] = raw_ids(imp.users, salt(seed, "seq", "user"))
    flat = {"item": raw_ids(hist.items, item_salt), "category": raw_ids(hist.categories, cat_salt)}
    for name, role in plan.sequences:
        columns[name] = _id_list(hist.lengths, flat[role])
    if "history_time" in c:
        columns[c["history_time"]] = _id_list(hist.lengths, hist.times)
    return columns


def _slice(imp: _Impressions, start: int, end: int) -> _Impressions:
    return _Impressions(
        *(getattr(imp, f)[start:end] for f in ("users", "times", "items", "categories", "counts"))
    )


def _seq_chunk_task(
    plan: _SeqPlan, schema: pa.Schema, day: int, chunk: int, imp: _Impressions
) -> _Chunk:
    hist = _histories(plan, imp.users, imp.counts)
    logits = plan.base + plan.scale * _attention_logits(plan, imp.items, hist)
    rng = np.random.default_rng([plan.synth.seed, 14, day, chunk])
    labels = _draw_labels(logits, plan.synth.noise, rng)
    uniques = {
        plan.columns["item"]: _sorted_unique(imp.items.astype(np.uint64)),
        plan.columns["category"]: _sorted_unique(imp.categories.astype(np.uint64)),
    }
    lengths = np.bincount(hist.lengths, minlength=plan.synth.max_history + 1)
    table = _arrow_table(schema, _seq_columns(plan, imp, hist, labels))
    return _Chunk(day, table, logits, labels, uniques, lengths)


def _seq_tasks(plan: _SeqPlan, schema: pa.Schema, rows: int) -> Iterator[Callable[[], _Chunk]]:
    """One task per row group; a day's impressions are drawn (and time-sorted) at once."""
    seed, max_history = plan.synth.seed, plan.synth.max_history
    for day, day_rows in enumerate(_rows_per_day(rows, plan.synth.days)):
        if not day_rows:
            continue
        day_imp = _impressions(plan, day, day_rows, np.random.default_rng([seed, 13, day]))
        for chunk, (start, end) in enumerate(_seq_chunks(day_imp.counts, max_history)):
            yield partial(_seq_chunk_task, plan, schema, day, chunk, _slice(day_imp, start, end))


def _seq_calibrated(plan: _SeqPlan) -> _SeqPlan:
    """Scale the planted logit to SEQ_LOGIT_STD and set the base for SEQ_POSITIVE_RATE,
    measured on a pilot sample of day-0 impressions."""
    synth = plan.synth
    rng = np.random.default_rng([synth.seed, 12])
    lo, hi = synth.min_history, synth.max_history
    mean_length = (hi - lo) / math.log(hi / lo) if hi > lo else lo  # of the log-uniform
    rows = max(100, min(PILOT_ROWS, round(2 * ROW_GROUP_ELEMENTS / mean_length)))
    imp = _impressions(plan, 0, rows, rng)
    raw = np.concatenate(
        [
            _attention_logits(plan, part.items, _histories(plan, part.users, part.counts))
            for part in (_slice(imp, *ends) for ends in _seq_chunks(imp.counts, synth.max_history))
        ]
    )
    scale = SEQ_LOGIT_STD / max(float(raw.std()), 1e-12)
    noise = synth.noise * rng.standard_normal(rows)
    return replace(plan, scale=scale, base=_calibrate_base(scale * raw, noise, SEQ_POSITIVE_RATE))


def _generate_sequence(
    cfg: ExperimentConfig, plan: _SeqPlan, rows: int, out: Path
) -> dict[str, Any]:
    plan = _seq_calibrated(plan)
    synth = plan.synth
    schema = _schema(cfg.features)
    distinct = _DistinctCounter([synth.item_feature, synth.category_feature])
    state = _RunState(distinct, history_lengths=np.zeros(synth.max_history + 1, np.int64))
    dictionary = [cfg.features.label, synth.category_feature]
    files = _write_chunks(out, schema, dictionary, _in_order(_seq_tasks(plan, schema, rows)), state)
    return {
        "files": files,
        **state.summary(),
        "history_length": _length_stats(state.history_lengths),
    }


def _length_stats(histogram: np.ndarray) -> dict[str, float]:
    """min / mean / p50 / p90 / p99 / max of history lengths from their exact histogram."""
    total = int(histogram.sum())
    if total == 0:
        return {}
    lengths = np.arange(len(histogram))
    cumulative = np.cumsum(histogram)
    present = np.flatnonzero(histogram)
    stats = {"min": int(present[0]), "mean": float((lengths * histogram).sum() / total)}
    for q in (50, 90, 99):
        stats[f"p{q}"] = int(np.searchsorted(cumulative, q / 100 * total))
    stats["max"] = int(present[-1])
    stats["elements"] = int((lengths * histogram).sum())
    return stats


# --------------------------------------------------------------------------- entry point


def generate(cfg: ExperimentConfig, rows: int, out: Path) -> dict[str, Any]:
    """Write `rows` synthetic impressions under `out` (Hive partitions by day) and return a
    JSON-able summary, also written to `out/_generator.json`."""
    synth = cfg.data.synthetic
    if synth is None:
        raise ConfigError(
            f"{cfg.name}: data.synthetic is missing; gen-data needs a synthetic section "
            "with family 'ctr' or 'sequence'"
        )
    if rows < 1:
        raise ValueError(f"rows must be positive, got {rows}")
    began = time.perf_counter()
    if isinstance(synth, CtrSyntheticConfig):
        run = partial(_generate_ctr, cfg, _ctr_plan(cfg, synth))
    else:
        run = partial(_generate_sequence, cfg, _seq_plan(cfg, synth))
    out = Path(out)
    _prepare_out(out)  # only once the config is known to be usable
    summary = run(rows, out)
    seconds = time.perf_counter() - began
    summary = {
        "family": synth.family,
        "seed": synth.seed,
        "rows": rows,
        "days": synth.days,
        "first_day": _day_name(0),
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds, 1),
        **summary,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
