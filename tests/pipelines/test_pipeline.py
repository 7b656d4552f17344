"""End to end on a real embedded Ray: train on 2 workers, resume, evaluate, export, predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from pipelines.evaluate import evaluate
from pipelines.export.writer import export
from pipelines.train.driver import train
from pipelines.train.split import make_split
from recsys.config import ExperimentConfig
from recsys.logs import read_validated
from recsys.serving.model import ServingModel
from tests.helpers import trained_probabilities
from tests.pipelines.runs import HELD_OUT_DAY, SMALL_CTR, module_run, run_config


def _config(tmp: Path, *extra: str) -> ExperimentConfig:
    return run_config(
        "demo.yaml",
        tmp,
        *SMALL_CTR,
        "train.epochs=1",
        "train.log_every=5",
        "train.checkpoint_every=5",
        # the recipe's parts (issue 19): evaluate and export must reproduce them exactly
        "model.batch_norm=true",
        "model.dropout=0.1",
        "train.embedding_l2=0.01",
        "train.dense_l2=1e-6",
        "train.clip_grad_norm=10",
        "train.sparse_optimizer=adagrad",
        f"data.test={tmp / 'log' / HELD_OUT_DAY}",  # what evaluate scores by default
        *extra,
    )


trained = module_run(_config, rows=30_000)


def test_training_reports_progress_metrics_and_checkpoints(trained) -> None:
    cfg, tmp, result = trained
    run = Path(result["run_dir"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if not r.get("final")]
    assert steps and steps == sorted(steps) and steps[0] == cfg.train.log_every
    final = records[-1]
    assert final["final"] and final["valid_rows"] > 0
    assert 0.5 < final["valid_auc"] < 1.0  # learned something from 20k training rows
    assert {"valid_gauc", "valid_logloss", "valid_calibration", "examples_per_s"} <= final.keys()
    assert Path(result["checkpoint"]).name.startswith("checkpoint_step")
    # every training row is read, or counted as dropped by Ray Data's equal split
    days = [d for d in (tmp / "log").iterdir() if d.name != HELD_OUT_DAY]
    rows = sum(pq.ParquetFile(f).metadata.num_rows for d in days for f in d.glob("*.parquet"))
    assert final["train_rows"] == rows
    assert 0 <= final["rows_unread_per_epoch"] < cfg.train.workers
    assert (run / "vocabularies.npz").exists() and (run / "config.yaml").exists()


def test_ids_read_as_the_oov_row_are_counted_per_feature(trained) -> None:
    """With `min_count: 2`, every occurrence of an ID seen once in training reads the OOV
    row: polars counts them on the training rows, one epoch's worth."""
    cfg, _, result = trained
    training = make_split(cfg).training_rows()
    expected = {}
    for f in cfg.features.sparse:
        ids = pl.col(f.name).explode() if f.multi_valued else pl.col(f.name)
        counts = training.select(ids.drop_nulls().alias("id")).group_by("id").len()
        rare = counts.filter(pl.col("len") < cfg.tables[0].min_count)
        expected[f.name] = rare.select(pl.col("len").sum()).collect().item()
    counted = result["metrics"]["unknown_ids"]
    unread = result["metrics"]["rows_unread_per_epoch"]
    assert set(counted) == set(expected) and sum(expected.values()) > 0
    if unread == 0:
        assert counted == expected
    else:  # the unread row's IDs may be among them
        assert all(0 <= expected[f] - counted[f] <= unread * 8 for f in expected)


def test_evaluate_matches_sklearn_on_the_models_predictions(trained) -> None:
    _, tmp, result = trained
    data = tmp / "log" / HELD_OUT_DAY
    report = evaluate(result["run_dir"], workers=2)
    assert report["data"] == str(data)
    probs = trained_probabilities(result["run_dir"], data)
    labels = np.concatenate(
        [t.column("label").to_numpy() for t in read_validated(data, trained[0].features)]
    )
    assert report["rows"] == len(labels)
    assert report["auc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-9)
    # Training scored the same rows through the sharded model in other batches: float32
    # sums in another order move probabilities by ulps, and the AUC by up to ~1e-7.
    assert report["auc"] == pytest.approx(result["metrics"]["valid_auc"], abs=1e-6)
    folder = Path(report["report_dir"])
    assert folder.parent == Path(result["run_dir"]) / "eval"
    assert (folder / "report.png").stat().st_size > 10_000
    again = evaluate(result["run_dir"])  # a later evaluation keeps the first one's report
    assert again["report_dir"] != report["report_dir"] and (folder / "report.json").exists()


def test_evaluate_in_one_process_equals_the_ray_actors(trained) -> None:
    """One worker scores in the command's own process, without Ray; two Ray Data actors
    score the same rows to the same numbers."""
    _, tmp, result = trained
    on_ray = evaluate(result["run_dir"], workers=2, report_dir=tmp / "eval_ray")
    here = evaluate(result["run_dir"], workers=1, report_dir=tmp / "eval_here")
    assert here.keys() == on_ray.keys()
    for key, value in on_ray.items():
        if key == "report_dir":
            continue
        if isinstance(value, float):
            assert here[key] == pytest.approx(value, abs=1e-9), key
        else:
            assert here[key] == value, key


def test_export_scores_exactly_what_the_trained_model_scores(trained) -> None:
    cfg, tmp, result = trained
    data = tmp / "log" / HELD_OUT_DAY
    out = tmp / "export"
    export(result["run_dir"], out)
    served = ServingModel(out).predict(data).column("prob").to_numpy()
    np.testing.assert_allclose(served, trained_probabilities(result["run_dir"], data), atol=1e-6)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tables"][0]["lookup"] == "id"
    assert len(manifest["tables"]) == len(cfg.features.sparse)

    export(result["run_dir"], tmp / "export_int8", dtype="int8")
    quantized = ServingModel(tmp / "export_int8").predict(data).column("prob").to_numpy()
    assert np.abs(quantized - served).max() < 0.02


def test_running_again_resumes_from_the_last_checkpoint(trained, repo: Path) -> None:
    _, tmp, first = trained
    steps_per_epoch = first["metrics"]["step"]
    again = train(_config(tmp, "train.epochs=2"), resume=True)
    assert again["metrics"]["step"] == 2 * steps_per_epoch
    assert again["metrics"]["epoch"] == 2
