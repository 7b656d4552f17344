"""The `ctr` family: Criteo-shaped impressions labelled by a planted click model."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from recsys.config import (
    ConfigError,
    CtrSyntheticConfig,
    ExperimentConfig,
)
from recsys.synth.common import (
    DAY_SECONDS,
    DICTIONARY_MAX_VOCAB,
    PILOT_ROWS,
    ROW_GROUP_ROWS,
    Chunk,
    DistinctCounter,
    RunState,
    arrow_table,
    calibrate_base,
    day_start,
    draw_labels,
    hashed_normals,
    id_list,
    in_order,
    log_schema,
    raw_ids,
    rows_per_day,
    salt,
    sorted_unique,
    splitmix64,
    unit,
    write_chunks,
    zipf_ranks,
)

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
class CtrPlan:
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


def ctr_plan(cfg: ExperimentConfig, synth: CtrSyntheticConfig) -> CtrPlan:
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
    directions = unit(rng.standard_normal((len(sparse), synth.latent_dim)))
    return CtrPlan(
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
    plan: CtrPlan, spec: _SparseSpec, day: int, n: int, rng: np.random.Generator
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


def _dense_values(plan: CtrPlan, z: np.ndarray) -> np.ndarray:
    """Criteo-like dense columns from standard normals z (features x rows): three in four are
    heavy-tailed non-negative counts floor(exp(mu + sigma z) - 1)+, the rest continuous."""
    values = (plan.dense_mu[:, None] + plan.dense_sigma[:, None] * z).astype(np.float32)
    counts = np.arange(len(values)) % 4 != 3
    values[counts] = np.floor(np.maximum(np.expm1(values[counts]), 0.0))
    return values


def _pair_term(plan: CtrPlan, vectors: list[np.ndarray]) -> np.ndarray:
    total = np.zeros(len(vectors[0]) if vectors else 0, np.float64)
    for a, b in plan.pairs:
        total += np.einsum("ij,ij->i", vectors[a], vectors[b])
    return total


def _ctr_chunk(
    plan: CtrPlan, day: int, seconds: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[dict[str, pa.Array], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Draw n rows: (Arrow columns without the label, raw logit terms, vocab indices)."""
    columns: dict[str, pa.Array] = {plan.timestamp: pa.array(day_start(day) + seconds)}
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
        columns[spec.name] = id_list(draw.lengths, ids) if draw.lengths is not None else ids
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


def _ctr_logits(plan: CtrPlan, terms: dict[str, np.ndarray]) -> np.ndarray:
    logit = np.full(len(next(iter(terms.values()))), plan.base)
    for name, values in terms.items():
        logit += plan.term_scale[name] * values
    return logit


def _calibrated(plan: CtrPlan) -> CtrPlan:
    """Scale each logit part to its planned spread and set the base to hit base_ctr,
    measured on a pilot sample (vocabulary skew makes the analytic variance unreliable)."""
    rng = np.random.default_rng([plan.synth.seed, 2])
    seconds = np.zeros(PILOT_ROWS, np.int64)
    _, terms, _ = _ctr_chunk(plan, 0, seconds, PILOT_ROWS, rng)
    wanted = plan.synth.logit_std.model_dump()
    scale = {k: wanted[k] / max(float(v.std()), 1e-12) for k, v in terms.items()}
    plan = replace(plan, term_scale=scale)
    noise = plan.synth.noise * rng.standard_normal(PILOT_ROWS)
    base = calibrate_base(_ctr_logits(plan, terms), noise, plan.synth.base_ctr)
    return replace(plan, base=base)


def _ctr_chunk_task(
    plan: CtrPlan, schema: pa.Schema, day: int, chunk: int, seconds: np.ndarray
) -> Chunk:
    rng = np.random.default_rng([plan.synth.seed, 4, day, chunk])
    columns, terms, indices = _ctr_chunk(plan, day, seconds, len(seconds), rng)
    logits = _ctr_logits(plan, terms)
    labels = draw_labels(logits, plan.synth.noise, rng)
    columns[plan.label] = labels
    uniques = {name: sorted_unique(index) for name, index in indices.items()}
    return Chunk(day, arrow_table(schema, columns), logits, labels, uniques)


def _ctr_tasks(plan: CtrPlan, schema: pa.Schema, rows: int) -> Iterator[Callable[[], Chunk]]:
    """One task per row group, day after day; each day's rows are spread over its seconds
    once, so every chunk is time-sorted and follows the previous one."""
    for day, day_rows in enumerate(rows_per_day(rows, plan.synth.days)):
        cumulative = _diurnal_cumulative(day_rows, np.random.default_rng([plan.synth.seed, 3, day]))
        for chunk, start in enumerate(range(0, day_rows, ROW_GROUP_ROWS)):
            rows_here = np.arange(start, min(start + ROW_GROUP_ROWS, day_rows))
            seconds = np.searchsorted(cumulative, rows_here, side="right")
            yield partial(_ctr_chunk_task, plan, schema, day, chunk, seconds)


def generate_ctr(cfg: ExperimentConfig, plan: CtrPlan, rows: int, out: Path) -> dict[str, Any]:
    plan = _calibrated(plan)
    schema = log_schema(cfg.features)
    state = RunState(DistinctCounter([f.name for f in plan.sparse]))
    small = [f.name for f in plan.sparse if f.vocab <= DICTIONARY_MAX_VOCAB]
    dictionary = [plan.label, *plan.dense, *small]
    files = write_chunks(out, schema, dictionary, in_order(_ctr_tasks(plan, schema, rows)), state)
    return {"files": files, "vocab": {f.name: f.vocab for f in plan.sparse}, **state.summary()}
