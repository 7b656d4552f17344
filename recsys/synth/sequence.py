"""The `sequence` family: Taobao-shaped impressions with long behaviour histories,
labelled by a planted target-attention model (see `recsys.synth`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from recsys.config import (
    ConfigError,
    ExperimentConfig,
    SequenceSyntheticConfig,
)
from recsys.synth.common import (
    DAY_SECONDS,
    PILOT_ROWS,
    ROW_GROUP_ELEMENTS,
    ROW_GROUP_ROWS,
    Chunk,
    DistinctCounter,
    RunState,
    arrow_table,
    calibrate_base,
    day_start,
    draw_labels,
    hashed_uniform,
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
class SequencePlan:
    """The item universe and the planted attention model of a sequence log."""

    synth: SequenceSyntheticConfig
    columns: dict[str, str]  # role -> column name
    sequences: list[tuple[str, str]]  # (column, "item" | "category")
    categories: int
    attention: np.ndarray  # (items, latent_dim) unit vectors a_i
    representation: np.ndarray  # (items, latent_dim) r_i, independent of a_i
    scale: float = 1.0
    base: float = 0.0


def sequence_plan(cfg: ExperimentConfig, synth: SequenceSyntheticConfig) -> SequencePlan:
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
    attention = CATEGORY_SHARE * unit(cat_dir)[item_cat] + (1 - CATEGORY_SHARE) * unit(own)
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
    return SequencePlan(
        synth=synth,
        columns=columns,
        sequences=[(s.name, roles[s.target]) for s in feats.sequences],
        categories=categories,
        attention=unit(attention),
        representation=representation / np.float32(math.sqrt(k)),
    )


def _items_from(
    plan: SequencePlan, users: np.ndarray, u: list[np.ndarray], share: float
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
    return day_start(0) - PRE_LOG_DAYS * DAY_SECONDS


def _behaviour_gap(plan: SequencePlan, users: np.ndarray) -> np.ndarray:
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


def _history_counts(plan: SequencePlan, users: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Number of the user's behaviours strictly before t (all slots before t's slot, plus
    t's own slot when its behaviour already happened)."""
    gap = _behaviour_gap(plan, users)
    slot = np.floor((t - _history_start()) / gap).astype(np.int64)
    return slot + (_behaviour_times(users, slot, gap, plan.synth.seed) < t)


@dataclass
class Histories:
    """Jagged histories of a chunk of impressions (flat, oldest first within a row)."""

    lengths: np.ndarray
    items: np.ndarray
    categories: np.ndarray
    times: np.ndarray


def draw_histories(plan: SequencePlan, users: np.ndarray, counts: np.ndarray) -> Histories:
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
    return Histories(lengths, items, categories, _behaviour_times(flat_users, k, gap, seed))


def attention_logits(plan: SequencePlan, targets: np.ndarray, hist: Histories) -> np.ndarray:
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
class Impressions:
    """A day's impressions in time order: who, when, which candidate."""

    users: np.ndarray
    times: np.ndarray
    items: np.ndarray
    categories: np.ndarray
    counts: np.ndarray  # behaviours before the impression


def draw_impressions(
    plan: SequencePlan, day: int, rows: int, rng: np.random.Generator
) -> Impressions:
    """Every user gets rows // num_users impressions, the remainder goes to distinct random
    users; times uniform over the day; candidates partly from the user's favourites."""
    n_users = plan.synth.num_users
    rest = rng.choice(n_users, rows % n_users, replace=False)
    users = np.concatenate([np.tile(np.arange(n_users), rows // n_users), rest])
    times = day_start(day) + rng.integers(0, DAY_SECONDS, rows)
    order = np.lexsort((users, times))
    users, times = users[order].astype(np.uint64), times[order]
    items, categories = _items_from(plan, users, list(rng.random((4, rows))), TARGET_INTEREST_SHARE)
    return Impressions(users, times, items, categories, _history_counts(plan, users, times))


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
    plan: SequencePlan, imp: Impressions, hist: Histories, labels: np.ndarray
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
        columns[name] = id_list(hist.lengths, flat[role])
    if "history_time" in c:
        columns[c["history_time"]] = id_list(hist.lengths, hist.times)
    return columns


def _slice(imp: Impressions, start: int, end: int) -> Impressions:
    return Impressions(
        *(getattr(imp, f)[start:end] for f in ("users", "times", "items", "categories", "counts"))
    )


def _seq_chunk_task(
    plan: SequencePlan, schema: pa.Schema, day: int, chunk: int, imp: Impressions
) -> Chunk:
    hist = draw_histories(plan, imp.users, imp.counts)
    logits = plan.base + plan.scale * attention_logits(plan, imp.items, hist)
    rng = np.random.default_rng([plan.synth.seed, 14, day, chunk])
    labels = draw_labels(logits, plan.synth.noise, rng)
    uniques = {
        plan.columns["item"]: sorted_unique(imp.items.astype(np.uint64)),
        plan.columns["category"]: sorted_unique(imp.categories.astype(np.uint64)),
    }
    lengths = np.bincount(hist.lengths, minlength=plan.synth.max_history + 1)
    table = arrow_table(schema, _seq_columns(plan, imp, hist, labels))
    return Chunk(day, table, logits, labels, uniques, lengths)


def _seq_tasks(plan: SequencePlan, schema: pa.Schema, rows: int) -> Iterator[Callable[[], Chunk]]:
    """One task per row group; a day's impressions are drawn (and time-sorted) at once."""
    seed, max_history = plan.synth.seed, plan.synth.max_history
    for day, day_rows in enumerate(rows_per_day(rows, plan.synth.days)):
        if not day_rows:
            continue
        day_imp = draw_impressions(plan, day, day_rows, np.random.default_rng([seed, 13, day]))
        for chunk, (start, end) in enumerate(_seq_chunks(day_imp.counts, max_history)):
            yield partial(_seq_chunk_task, plan, schema, day, chunk, _slice(day_imp, start, end))


def calibrated_sequence_plan(plan: SequencePlan) -> SequencePlan:
    """Scale the planted logit to SEQ_LOGIT_STD and set the base for SEQ_POSITIVE_RATE,
    measured on a pilot sample of day-0 impressions."""
    synth = plan.synth
    rng = np.random.default_rng([synth.seed, 12])
    lo, hi = synth.min_history, synth.max_history
    mean_length = (hi - lo) / math.log(hi / lo) if hi > lo else lo  # of the log-uniform
    rows = max(100, min(PILOT_ROWS, round(2 * ROW_GROUP_ELEMENTS / mean_length)))
    imp = draw_impressions(plan, 0, rows, rng)
    raw = np.concatenate(
        [
            attention_logits(plan, part.items, draw_histories(plan, part.users, part.counts))
            for part in (_slice(imp, *ends) for ends in _seq_chunks(imp.counts, synth.max_history))
        ]
    )
    scale = SEQ_LOGIT_STD / max(float(raw.std()), 1e-12)
    noise = synth.noise * rng.standard_normal(rows)
    return replace(plan, scale=scale, base=calibrate_base(scale * raw, noise, SEQ_POSITIVE_RATE))


def generate_sequence(
    cfg: ExperimentConfig, plan: SequencePlan, rows: int, out: Path
) -> dict[str, Any]:
    plan = calibrated_sequence_plan(plan)
    synth = plan.synth
    schema = log_schema(cfg.features)
    distinct = DistinctCounter([synth.item_feature, synth.category_feature])
    state = RunState(distinct, history_lengths=np.zeros(synth.max_history + 1, np.int64))
    dictionary = [cfg.features.label, synth.category_feature]
    files = write_chunks(out, schema, dictionary, in_order(_seq_tasks(plan, schema, rows)), state)
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
