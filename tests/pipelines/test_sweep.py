"""`recsys sweep` over every table variant on a small synthetic log, on one embedded Ray:
the frontier files are complete, the figures are the runs' own, a second sweep trains
nothing, and a sweep given another seed trains only that seed's runs and aggregates both."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import ray

from pipelines.build import load_vocabularies
from pipelines.sweep import FRONTIER_CSV, FRONTIER_PNG, POINTS_DIR, SEEDS_CSV, sweep
from pipelines.train.summary import best_validation
from recsys.synth import generate
from tables.budget import VARIANTS
from tables.footprint import ID_BYTES
from tests.pipelines.runs import SMALL_CTR, run_config

SPARSE = "[user_id, C1, C2, C3, {name: C24, multi_valued: true}]"
BUDGET, SEED, SECOND_SEED = 0.25, 3, 4


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("sweep")
    cfg = run_config(
        "demo.yaml",
        tmp,
        *SMALL_CTR,
        f"features.sparse={SPARSE}",
        "tables.0.features=[user_id, C1, C2, C3, C24]",
        "tables.0.min_count=1",
        "train.workers=1",
        "optembed.search={rounds: 1, mutations: 2, crossovers: 2, parents: 2, workers: 1}",
    )
    generate(cfg, rows=4_000, out=tmp / "log")
    out = tmp / "s"
    try:
        rows = sweep(cfg, [BUDGET], list(VARIANTS), out, seeds=[SEED])
        frontier = (out / FRONTIER_CSV).read_text()
        done = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("result.json")}
        again = sweep(cfg, [BUDGET], list(VARIANTS), out, seeds=[SEED])
        after = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("result.json")}
        two = sweep(cfg, [BUDGET], ["hash"], out, seeds=[SEED, SECOND_SEED])
        yield cfg, out, frontier, rows, again, done, after, two
    finally:
        ray.shutdown()


def test_frontier_holds_every_variant_and_budget(swept, tmp_path: Path) -> None:
    _, out, frontier_csv, rows, _, _, _, _ = swept
    expected = {(v, BUDGET if VARIANTS[v].budgeted else 1.0) for v in VARIANTS}
    assert {(r["variant"], r["budget"]) for r in rows} == expected
    (tmp_path / "f.csv").write_text(frontier_csv)
    frontier = pl.read_csv(tmp_path / "f.csv")
    assert set(zip(frontier["variant"], frontier["budget"], strict=True)) == expected
    assert frontier["seeds"].to_list() == [1] * len(VARIANTS)
    assert frontier["auc_mean"].null_count() == frontier["logloss_mean"].null_count() == 0
    assert (out / FRONTIER_PNG).stat().st_size > 10_000


def test_another_seed_trains_only_its_runs_and_is_aggregated(swept) -> None:
    _, out, _, _, _, _, after, two = swept
    assert [(r["variant"], r["seeds"]) for r in two] == [("hash", 2)]
    seeds = pl.read_csv(out / SEEDS_CSV)
    assert sorted(seeds["seed"].to_list()) == [SEED, SECOND_SEED]
    # the aggregate is the seeds' own mean and sample standard deviation
    auc = seeds["auc"].to_list()
    assert two[0]["auc_mean"] == pytest.approx(sum(auc) / 2, abs=1e-12)
    assert two[0]["auc_std"] == pytest.approx(abs(auc[0] - auc[1]) / 2**0.5, abs=1e-12)
    frontier = pl.read_csv(out / FRONTIER_CSV)
    assert frontier.select("variant", "seeds").rows() == [("hash", 2)]
    now = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("result.json")}
    assert {p: t for p, t in now.items() if p in after} == after
    assert [p.parent.name for p in now if p not in after] == [
        f"demo-hash-{BUDGET:g}-s{SECOND_SEED}"
    ]


def test_points_are_the_runs_best_validation_and_their_bytes(swept) -> None:
    cfg, out, _, _, _, _, _, _ = swept
    points = [json.loads(p.read_text()) for p in (out / POINTS_DIR).glob("*.json")]
    by = {p["variant"]: p for p in points if p["seed"] == SEED}
    for p in points:  # no data.test: scored by the best checkpoint's validation
        best = best_validation(Path(p["run"]))
        assert p["scored_on"] == "valid" and p["auc"] == best["valid_auc"], p["variant"]
    dim = cfg.tables[0].embedding_dim
    full = by["full"]
    vocab = load_vocabularies(Path(full["run"]))
    rows = sum(len(ids) + 1 for ids in vocab.values())  # rows: vocabulary + OOV
    # float32 rows and a row-wise Adagrad accumulator each, and the vocabularies' int64 IDs
    assert full["bytes"] == rows * (dim + 1) * 4 + ID_BYTES * sum(len(v) for v in vocab.values())
    hashed = by["hash"]
    assert hashed["parameters"] <= BUDGET * full["parameters"]
    assert hashed["bytes"] == hashed["parameters"] // dim * (dim + 1) * 4
    # collisionless rows follow live IDs; the filter admits fewer of them
    open_map, filtered = by["collisionless"], by["collisionless_filtered"]
    live, live_filtered = sum(open_map["live_rows"].values()), sum(filtered["live_rows"].values())
    assert open_map["parameters"] == live * dim and live_filtered < live
    compact = by["optembed"]
    assert set(compact["dims"]) == {f.name for f in cfg.features.sparse}
    assert compact["parameters"] == sum(
        compact["kept_rows"][f] * d for f, d in compact["dims"].items()
    )
    assert compact["export_bytes"] < compact["uncompacted_bytes"]


def test_a_second_sweep_reuses_every_point(swept) -> None:
    _, _, _, rows, again, done, after, _ = swept
    assert again == rows
    assert after == done  # no run trained again
