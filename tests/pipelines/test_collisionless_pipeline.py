"""Collisionless tables end to end on a real embedded Ray: train on 2 workers with the
table report in the log, then export only live rows and serve what the model scores; last,
resume the run on 1 worker."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.build import build_model, load_trained, load_vocabularies, run_checkpoint
from pipelines.export.writer import export
from pipelines.train.checkpoint import load_model_weights
from pipelines.train.driver import train
from pipelines.train.summary import best_validation
from recsys.batch import BatchConverter
from recsys.config import ExperimentConfig
from recsys.logs import read_validated
from recsys.serving.model import ServingModel
from tables.collisionless.transform import collisionless_transforms
from tests.pipelines.runs import HELD_OUT_DAY, SMALL_CTR, module_run, run_config, validation_auc

CAPACITY = 512


def _config(tmp: Path, *extra: str) -> ExperimentConfig:
    return run_config(
        "demo.yaml",
        tmp,
        *SMALL_CTR,
        "tables.0.variant=collisionless",
        f"tables.0.capacity={CAPACITY}",
        "tables.0.ttl=43200",
        "tables.0.evict_every=3600",
        "train.log_every=5",
        "train.checkpoint_every=10",
        *extra,
    )


trained = module_run(_config, rows=20_000)


def test_training_logs_table_stats(trained) -> None:
    cfg, _, result = trained
    records = [
        json.loads(line)
        for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    ]
    logged = [r["tables"] for r in records if "tables" in r]
    assert logged and set(logged[-1]) == {f.name for f in cfg.features.sparse}
    big = max(logged[-1].values(), key=lambda t: t["live_rows"])
    assert big["live_rows"] <= 2 * CAPACITY and big["load_factor"] > 0.5
    assert sum(t["filtered"] for r in logged for t in r.values()) > 0  # min_count 2
    assert sum(t["evicted_lru"] + t["expired"] for r in logged for t in r.values()) > 0
    assert big["row_bytes"] == 2 * CAPACITY * 8 * 4
    assert big["map_bytes"] > 0 and big["filter_bytes"] > 0 and big["optimizer_bytes"] > 0
    # what training reports is the model's AUC (sharded in training, unsharded here)
    reference = validation_auc(cfg, result["run_dir"], Path(result["run_dir"]))
    best = best_validation(Path(result["run_dir"]))
    assert best is not None and best["valid_auc"] == pytest.approx(reference, abs=1e-6)
    assert reference > 0.5  # and it learned: 0.5 is chance


def test_export_serves_exactly_what_the_trained_model_scores(trained) -> None:
    cfg, tmp, result = trained
    data = tmp / "log" / HELD_OUT_DAY
    out = tmp / "export"
    export(result["run_dir"], out)
    _, model, _ = load_trained(result["run_dir"])
    convert = BatchConverter(cfg.features)
    with torch.no_grad():
        expected = np.concatenate(
            [torch.sigmoid(model(convert(t))).numpy() for t in read_validated(data, cfg.features)]
        )
    served = ServingModel(out).predict(data).column("prob").to_numpy()
    np.testing.assert_allclose(served, expected, atol=1e-6)

    manifest = json.loads((out / "manifest.json").read_text())
    live = {t.name: t.live_rows()[0].numpy() for t in collisionless_transforms(model)}
    for entry in manifest["tables"]:
        assert entry["lookup"] == "id" and len(entry["default_embedding"]) == 8
        ids = pq.read_table(out / entry["files"][0]).column("id").to_numpy()
        np.testing.assert_array_equal(ids, live[entry["name"]])  # live rows only, sorted
        assert len(ids) <= 2 * CAPACITY


def test_resumes_on_one_worker(trained, repo: Path) -> None:
    """The 2-worker checkpoint (ranks' files merged by Ray) read as 1 worker holds every
    live ID's row; `recsys train` with `train.workers=1` then resumes from it."""
    _, tmp, first = trained
    one = _config(tmp, "train.workers=1", f"tables.0.capacity={2 * CAPACITY}", "train.epochs=2")
    _, saved, _ = load_trained(first["run_dir"])
    model = build_model(one, load_vocabularies(Path(first["run_dir"])))
    load_model_weights(run_checkpoint(Path(first["run_dir"]), newest=True), model)
    pairs = zip(collisionless_transforms(saved), collisionless_transforms(model), strict=True)
    for two_workers, one_worker in pairs:
        ids, rows = two_workers.live_rows()
        same_ids, same_rows = one_worker.live_rows()
        assert torch.equal(same_ids, ids) and len(ids) > 0
        assert torch.equal(
            model.sparse.ebc.embedding_bags[one_worker.name].weight[same_rows],
            saved.sparse.ebc.embedding_bags[two_workers.name].weight[rows],
        )
        assert one_worker.steps == two_workers.steps == first["metrics"]["step"]
    again = train(one, resume=True)
    assert again["metrics"]["epoch"] == 2 and again["metrics"]["step"] > first["metrics"]["step"]
    _, resumed, _ = load_trained(again["run_dir"])
    tables = list(collisionless_transforms(resumed.sparse))
    assert tables and all(t.num_shards == 1 for t in tables)
    assert all(t.steps == again["metrics"]["step"] for t in tables)  # the clock went on
