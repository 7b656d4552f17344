"""The synthetic log generator: the Parquet contract, determinism, the shape of the
distributions (Zipf, drift, histories) and a planted signal that models can learn."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from recsys.config import ConfigError, ExperimentConfig, load_config
from recsys.synth import AucHistogram, generate, raw_ids, zipf_ranks
from recsys.synth import common as synth_common
from recsys.synth import sequence as synth_sequence

REPO = Path(__file__).resolve().parents[2]
CTR_SMALL = [
    "data.synthetic.days=3",
    "data.synthetic.vocab_max=100000",
    "data.synthetic.num_users=2000",
]
SEQ_SMALL = [
    "data.synthetic.days=3",
    "data.synthetic.num_users=300",
    "data.synthetic.num_items=5000",
    "data.synthetic.num_categories=40",
    "data.synthetic.min_history=5",
    "data.synthetic.max_history=300",
]
DAY0 = int(datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp())
ID_LIST = pa.list_(pa.int64())


def ctr_config(*overrides: str) -> ExperimentConfig:
    return load_config(REPO / "conf/criteo_synth.yaml", [*CTR_SMALL, *overrides])


def seq_config(*overrides: str) -> ExperimentConfig:
    return load_config(REPO / "conf/taobao_synth.yaml", [*SEQ_SMALL, *overrides])


def day_files(out: Path) -> list[Path]:
    return sorted(out.glob("day=*/*.parquet"))


def read_log(out: Path) -> pa.Table:
    """All days in order, read file by file (no partition column is added)."""
    return pa.concat_tables(pq.ParquetFile(f).read() for f in day_files(out))


@pytest.fixture(scope="module")
def ctr_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentConfig, Path, dict]:
    cfg = ctr_config()
    out = tmp_path_factory.mktemp("ctr")
    return cfg, out, generate(cfg, rows=30_000, out=out)


@pytest.fixture(scope="module")
def seq_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentConfig, Path, dict]:
    cfg = seq_config()
    out = tmp_path_factory.mktemp("seq")
    return cfg, out, generate(cfg, rows=3_000, out=out)


# --------------------------------------------------------------------------- the contract


def expected_types(cfg: ExperimentConfig) -> dict[str, pa.DataType]:
    f = cfg.features
    types = {f.label: pa.int8(), f.timestamp: pa.int64(), f.user_id: pa.int64()}
    types |= {d.name: pa.float32() for d in f.dense}
    types |= {s.name: ID_LIST if s.multi_valued else pa.int64() for s in f.sparse}
    types |= {s.name: ID_LIST for s in f.sequences}
    if f.sequence_timestamps:
        types[f.sequence_timestamps] = ID_LIST
    return types


@pytest.mark.parametrize("log", ["ctr_log", "seq_log"])
def test_files_follow_the_parquet_contract(log: str, request: pytest.FixtureRequest) -> None:
    cfg, out, summary = request.getfixturevalue(log)
    files = day_files(out)
    days = cfg.data.synthetic.days
    assert [f.parent.name for f in files] == [f"day=2026-01-0{d + 1}" for d in range(days)]
    assert [f.name for f in files] == ["part-00000.parquet"] * days
    assert summary["files"] == [str(f.relative_to(out)) for f in files]
    assert json.loads((out / "_generator.json").read_text()) == summary
    ts = cfg.features.timestamp
    for day, path in enumerate(files):
        table = pq.ParquetFile(path).read()
        assert dict(zip(table.schema.names, table.schema.types, strict=True)) == expected_types(cfg)
        assert "day" not in table.schema.names
        for column in table.columns:
            assert column.null_count == 0
        times = table[ts].to_numpy()
        assert times.min() >= DAY0 + day * 86_400
        assert times.max() < DAY0 + (day + 1) * 86_400
        assert np.all(np.diff(times) >= 0), "rows within a day are sorted by time"
    assert sum(pq.ParquetFile(f).metadata.num_rows for f in files) == summary["rows"]


def test_ctr_values_are_in_range(ctr_log: tuple[ExperimentConfig, Path, dict]) -> None:
    cfg, out, _ = ctr_log
    table = read_log(out)
    assert set(np.unique(table["label"].to_numpy())) == {0, 1}
    count_like = 0
    for f in cfg.features.dense:
        values = table[f.name].to_numpy()
        assert np.isfinite(values).all()
        if (values >= 0).all() and (values == np.floor(values)).all():
            count_like += 1
            assert values.max() > 10 * (np.median(values) + 1), f"{f.name}: heavy-tailed counts"
    assert count_like >= 2 * len(cfg.features.dense) // 3
    assert (table["user_id"].to_numpy() >= 0).all()
    max_bag = cfg.data.synthetic.max_bag
    for f in cfg.features.sparse:
        column = table[f.name].combine_chunks()
        if f.multi_valued:
            lengths = column.value_lengths().to_numpy()
            assert lengths.min() == 1 and lengths.max() == max_bag
            column = column.flatten()
        ids = column.to_numpy()
        assert ids.min() >= 0, f.name


def test_ids_are_hash_like_and_bijective() -> None:
    index = np.concatenate([np.arange(1_000_000), 2**40 + np.arange(1000)]).astype(np.uint64)
    ids = raw_ids(index, feature_salt=12345)
    assert ids.dtype == np.int64 and ids.min() >= 0
    assert len(np.unique(ids)) == len(ids), "distinct vocabulary indices get distinct IDs"
    assert 0.45 < (ids >= 2**62).mean() < 0.55, "IDs spread over the whole positive range"
    assert not np.array_equal(ids[:100], raw_ids(index[:100], feature_salt=54321))


def test_generation_is_deterministic(tmp_path: Path) -> None:
    cfg = ctr_config("data.synthetic.days=2")
    first = generate(cfg, rows=4_000, out=tmp_path / "a")
    second = generate(cfg, rows=4_000, out=tmp_path / "b")
    assert read_log(tmp_path / "a").equals(read_log(tmp_path / "b"))
    assert first["oracle_auc"] == second["oracle_auc"]
    generate(ctr_config("data.synthetic.days=2", "data.synthetic.seed=1"), 4_000, tmp_path / "c")
    assert not read_log(tmp_path / "a").equals(read_log(tmp_path / "c"))


def test_user_id_read_as_an_id_feature_is_still_the_user(tmp_path: Path) -> None:
    """Declaring user_id among the sparse features changes what a model reads, not the log."""
    cfg = ctr_config("data.synthetic.days=1")
    data = cfg.model_dump()
    data["features"]["sparse"].insert(0, {"name": "user_id"})
    data["tables"][0]["features"].insert(0, "user_id")
    as_feature = ExperimentConfig.model_validate(data)
    generate(cfg, rows=2_000, out=tmp_path / "a")
    generate(as_feature, rows=2_000, out=tmp_path / "b")
    assert read_log(tmp_path / "a").equals(read_log(tmp_path / "b"))


def test_sequence_generation_is_deterministic(tmp_path: Path) -> None:
    cfg = seq_config("data.synthetic.days=2")
    generate(cfg, rows=400, out=tmp_path / "a")
    generate(cfg, rows=400, out=tmp_path / "b")
    assert read_log(tmp_path / "a").equals(read_log(tmp_path / "b"))


# --------------------------------------------------------------------------- distributions


def test_zipf_ranks_concentrate_on_the_head_of_a_huge_vocabulary() -> None:
    u = np.random.default_rng(0).random(1_000_000)
    ranks = zipf_ranks(u, 100_000_000, 1.1)
    assert ranks.min() >= 0 and ranks.max() < 100_000_000
    assert (ranks < 1_000_000).mean() > 0.8, "top 1% of the vocabulary takes most draws"
    assert (ranks == 0).mean() > (ranks == 1).mean() > (ranks == 10).mean()


def test_top_ids_take_a_large_share_of_the_log(tmp_path: Path) -> None:
    cfg = ctr_config("data.synthetic.days=1", "data.synthetic.vocab={C20: 10000}")
    generate(cfg, rows=20_000, out=tmp_path)
    _, counts = np.unique(read_log(tmp_path)["C20"].to_numpy(), return_counts=True)
    top = np.sort(counts)[::-1][:100]  # 1% of the vocabulary
    assert top.sum() / counts.sum() > 0.45  # uniform popularity would give 0.01


def id_overlap(days: list[set[int]], a: int, b: int) -> float:
    """Share of day b's distinct IDs that also occur on day a."""
    return len(days[a] & days[b]) / len(days[b])


@pytest.mark.parametrize("drift", [0.05, 0.0])
def test_vocabulary_drift_is_measurable(drift: float, tmp_path: Path) -> None:
    cfg = ctr_config(
        "data.synthetic.days=7",
        f"data.synthetic.daily_drift={drift}",
        "data.synthetic.vocab={C9: 300}",
    )
    generate(cfg, rows=35_000, out=tmp_path)
    days = [
        set(pq.ParquetFile(f).read(columns=["C9"])["C9"].to_pylist()) for f in day_files(tmp_path)
    ]
    consecutive = np.mean([id_overlap(days, d, d + 1) for d in range(6)])
    first_last = id_overlap(days, 0, 6)
    if drift:
        assert first_last < consecutive - 0.15, (first_last, consecutive)
    else:
        assert abs(first_last - consecutive) < 0.05, (first_last, consecutive)


# --------------------------------------------------------------------------- planted signal


def test_auc_histogram_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=50_000)
    labels = (rng.random(50_000) < 1 / (1 + np.exp(-2 * scores))).astype(np.int8)
    hist = AucHistogram()
    hist.add(scores[:20_000], labels[:20_000])
    hist.add(scores[20_000:], labels[20_000:])
    assert hist.auc() == pytest.approx(roc_auc_score(labels, scores), abs=1e-4)
    assert AucHistogram().auc() is None


def test_ctr_oracle_auc_and_positive_rate(ctr_log: tuple[ExperimentConfig, Path, dict]) -> None:
    cfg, _, summary = ctr_log
    assert 0.7 < summary["oracle_auc"] < 0.9
    assert len(summary["oracle_auc_per_day"]) == cfg.data.synthetic.days
    assert all(0.65 < auc < 0.92 for auc in summary["oracle_auc_per_day"].values())
    assert summary["positive_rate"] == pytest.approx(cfg.data.synthetic.base_ctr, abs=0.04)
    assert set(summary["distinct_ids"]) == {f.name for f in cfg.features.sparse}


def test_ctr_labels_are_learnable_from_the_written_ids(
    ctr_log: tuple[ExperimentConfig, Path, dict],
) -> None:
    """Per-ID click rates (naive Bayes over single-valued features), fitted on the first days,
    rank the last day's rows better than chance: the planted signal is in the columns."""
    cfg, out, _ = ctr_log
    table = read_log(out)
    labels = table["label"].to_numpy()
    test = table["timestamp"].to_numpy() >= DAY0 + (cfg.data.synthetic.days - 1) * 86_400
    score = np.zeros(len(labels))
    single = [f.name for f in cfg.features.sparse if not f.multi_valued]
    for name in [*single, "user_id"]:
        _, inverse = np.unique(table[name].to_numpy(), return_inverse=True)
        clicks = np.bincount(inverse[~test], weights=labels[~test], minlength=inverse.max() + 1)
        shown = np.bincount(inverse[~test], minlength=inverse.max() + 1)
        rate = (clicks + 2.5) / (shown + 10)  # smoothed towards the base rate
        score += np.log(rate / (1 - rate))[inverse]
    assert roc_auc_score(labels[test], score[test]) > 0.56


def test_sequence_oracle_auc_and_positive_rate(
    seq_log: tuple[ExperimentConfig, Path, dict],
) -> None:
    cfg, _, summary = seq_log
    assert 0.75 < summary["oracle_auc"] < 0.97
    assert len(summary["oracle_auc_per_day"]) == cfg.data.synthetic.days
    assert summary["positive_rate"] == pytest.approx(1 / 3, abs=0.07)


# --------------------------------------------------------------------------- sequences


def test_sequence_labels_reward_decoupled_attention() -> None:
    """The planted rule attends with one item factor and aggregates another: attending with
    the representation factor (a coupled model's best guess) or not at all ranks worse."""
    cfg = seq_config()
    plan = synth_sequence.calibrated_sequence_plan(
        synth_sequence.sequence_plan(cfg, cfg.data.synthetic)
    )
    imp = synth_sequence.draw_impressions(plan, 1, 3000, np.random.default_rng(1))
    hist = synth_sequence.draw_histories(plan, imp.users, imp.counts)
    true = synth_sequence.attention_logits(plan, imp.items, hist)
    labels = synth_common.draw_labels(plan.base + plan.scale * true, 0.5, np.random.default_rng(2))
    coupled = replace(plan, attention=synth_common.unit(plan.representation))
    pooled = replace(plan, attention=np.zeros_like(plan.attention))
    oracle = roc_auc_score(labels, true)
    for wrong in (coupled, pooled):
        auc = roc_auc_score(labels, synth_sequence.attention_logits(wrong, imp.items, hist))
        assert auc < oracle - 0.08, (auc, oracle)


def test_histories_are_bounded_aligned_and_before_the_impression(
    seq_log: tuple[ExperimentConfig, Path, dict],
) -> None:
    cfg, out, summary = seq_log
    synth = cfg.data.synthetic
    table = read_log(out)
    items, cats = table["hist_item_id"].combine_chunks(), table["hist_category_id"].combine_chunks()
    times = table["hist_timestamp"].combine_chunks()
    lengths = items.value_lengths().to_numpy()
    assert lengths.min() >= synth.min_history and lengths.max() <= synth.max_history
    assert np.array_equal(lengths, cats.value_lengths().to_numpy())
    assert np.array_equal(lengths, times.value_lengths().to_numpy())
    stats = summary["history_length"]
    assert stats["min"] == lengths.min() and stats["max"] == lengths.max()
    flat_times = times.flatten().to_numpy()
    row = np.repeat(np.arange(len(lengths)), lengths)
    same_row = row[1:] == row[:-1]
    assert (np.diff(flat_times)[same_row] > 0).all(), "oldest first, strictly increasing"
    assert (flat_times < table["timestamp"].to_numpy()[row]).all()


def test_item_category_mapping_is_fixed(seq_log: tuple[ExperimentConfig, Path, dict]) -> None:
    _, out, _ = seq_log
    table = read_log(out)
    items = np.concatenate(
        [table["item_id"].to_numpy(), table["hist_item_id"].combine_chunks().flatten().to_numpy()]
    )
    cats = np.concatenate(
        [
            table["category_id"].to_numpy(),
            table["hist_category_id"].combine_chunks().flatten().to_numpy(),
        ]
    )
    assert (items >= 0).all() and (cats >= 0).all()
    pairs = np.unique(np.stack([items, cats], axis=1), axis=0)
    assert len(pairs) == len(np.unique(items)), "each item has exactly one category"
    assert len(np.unique(cats)) > 5


def test_a_users_behaviours_are_the_same_in_every_history(
    seq_log: tuple[ExperimentConfig, Path, dict],
) -> None:
    """Histories are views of one behaviour stream per user: the behaviour at a given time is
    the same item in every row of that user, and later rows see at least as much history."""
    _, out, _ = seq_log
    table = read_log(out)
    lengths = table["hist_item_id"].combine_chunks().value_lengths().to_numpy()
    users = np.repeat(table["user_id"].to_numpy(), lengths)
    times = table["hist_timestamp"].combine_chunks().flatten().to_numpy()
    items = table["hist_item_id"].combine_chunks().flatten().to_numpy()
    events = np.unique(np.stack([users, times, items], axis=1), axis=0)
    assert len(events) == len(np.unique(np.stack([users, times], axis=1), axis=0))
    assert len(np.unique(table["user_id"].to_numpy())) > 100


# --------------------------------------------------------------------------- config errors


def test_missing_synthetic_section_names_the_key(tmp_path: Path) -> None:
    cfg = ctr_config("data.synthetic=null")
    with pytest.raises(ConfigError, match=r"data\.synthetic"):
        generate(cfg, rows=10, out=tmp_path)


@pytest.mark.parametrize(
    ("cfg", "culprit"),
    [
        (seq_config("features.dense=[price]"), "price"),
        (ctr_config("features.sequences=[{name: hist, target: C1}]"), "sequences"),
    ],
)
def test_families_reject_columns_they_cannot_generate(
    cfg: ExperimentConfig, culprit: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=culprit):
        generate(cfg, rows=10, out=tmp_path / "log")
    assert not (tmp_path / "log").exists(), "nothing is written for a bad config"


def test_output_folder_is_replaced_but_foreign_folders_are_not(tmp_path: Path) -> None:
    generate(ctr_config("data.synthetic.days=3"), rows=600, out=tmp_path / "log")
    generate(ctr_config("data.synthetic.days=2"), rows=600, out=tmp_path / "log")
    assert len(day_files(tmp_path / "log")) == 2, "no stale day from the earlier run"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty"):
        generate(ctr_config(), rows=600, out=tmp_path / "mine")
