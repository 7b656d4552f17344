"""Scoring live traffic from an export: only the columns the model reads are needed, any
batch from one row scores what the trained model scores in eval mode, for every model
family, and sequence models export with extra sparse and dense features."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import yaml

from pipelines.build import build_model, save_vocabularies
from pipelines.cli import main
from pipelines.export.writer import export
from pipelines.train.checkpoint import save_checkpoint
from recsys.batch import BatchConverter
from recsys.config import config_from_dict
from recsys.contract import BadInputError
from recsys.metrics import evaluate_predictions
from recsys.serving.model import ServingModel
from tables.vocab import build_vocabularies
from tests.small_log import small_features, small_table
from tests.tables.test_sequence_tables import CATEGORIES, arrow_log, seq_doc

CTR_MODELS = {
    "dlrm": {"dense_arch": [8, 4], "over_arch": [8]},
    "deepfm": {"over_arch": [8]},
    "dcnv2": {"over_arch": [8], "cross_layers": 2},
}


def _ctr(name: str) -> tuple[dict[str, Any], pa.Table]:
    features = small_features().model_dump(mode="json")
    features.update(sequences=[], sequence_timestamps=None, user_id="user_id")
    doc = {
        "name": name,
        "features": features,
        "tables": [
            {"features": ["s_single", "s_multi"], "embedding_dim": 4},
            {"features": ["s_nullable"], "variant": "hash", "num_embeddings": 31},
            {"features": ["s_multi_null"], "variant": "qr", "num_embeddings": 20},
        ],
        "model": {"name": name, **CTR_MODELS[name], "batch_norm": True, "dropout": 0.3},
    }
    for table in doc["tables"]:
        table["embedding_dim"] = 4
    return doc, small_table(64, seed=1)


def _sequence(name: str) -> tuple[dict[str, Any], pa.Table]:
    """A sequence model with a dense feature and a sparse feature outside its sequences."""
    doc = seq_doc(name, decoupled=name == "dare")
    doc["features"]["sparse"].append("shop")
    doc["features"]["dense"] = ["price"]
    doc["features"]["user_id"] = "user_id"
    doc["tables"].append(
        {"features": ["shop"], "variant": "hash", "num_embeddings": 7, "embedding_dim": 4}
    )
    table = arrow_log(64, seed=4)
    rng = np.random.default_rng(4)
    table = table.append_column("shop", pa.array(rng.integers(0, 100, 64)))
    return doc, table.append_column("price", pa.array(rng.random(64)))


@pytest.fixture(scope="module", params=["dlrm", "deepfm", "dcnv2", "din", "twin", "dare"])
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[torch.nn.Module, Any, pa.Table, Path]:
    """(model in eval mode, config, its log, export): trained a few steps by hand, so that
    every table, BatchNorm statistic and layer has moved."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    doc, table = (_ctr if name in CTR_MODELS else _sequence)(name)
    cfg = config_from_dict(doc)
    pq.write_table(table, root / "log.parquet")
    vocab = (
        build_vocabularies(cfg, root / "log.parquet")
        if name in CTR_MODELS
        else {"category": CATEGORIES}
    )
    torch.manual_seed(0)
    model = build_model(cfg, vocab)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    batch = BatchConverter(cfg.features)(table)
    for _ in range(3):
        loss = F.binary_cross_entropy_with_logits(model(batch), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    run = root / "run"
    (run / "checkpoint_step00000003").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    save_vocabularies(run, vocab)
    save_checkpoint(run / "checkpoint_step00000003", model, optimizer, {"step": 3})
    export(run, root / "export")
    return model.eval(), cfg, table, root


def test_any_batch_from_one_row_scores_what_the_model_scores(
    exported: tuple[torch.nn.Module, Any, pa.Table, Path],
) -> None:
    model, cfg, table, root = exported
    with torch.no_grad():
        expected = torch.sigmoid(model(BatchConverter(cfg.features)(table))).numpy()
    served = ServingModel(root / "export")
    np.testing.assert_allclose(served.predict_table(table), expected, atol=1e-6)
    one_by_one = [served.predict_table(table.slice(i, 1)) for i in range(table.num_rows)]
    assert all(p.shape == (1,) for p in one_by_one)
    np.testing.assert_allclose(np.concatenate(one_by_one), expected, atol=1e-6)
    assert expected.std() > 1e-4  # the rows are told apart: the comparison means something


def test_traffic_without_label_and_timestamp_is_scored(
    exported: tuple[torch.nn.Module, Any, pa.Table, Path],
) -> None:
    _, cfg, table, root = exported
    labelled = ServingModel(root / "export").predict(root / "log.parquet", batch_size=7)
    assert labelled.column_names == ["prob", "label", "group"]
    traffic = table.drop_columns([cfg.features.label, cfg.features.timestamp, "user_id"])
    pq.write_table(traffic, root / "traffic.parquet")
    scored = ServingModel(root / "export").predict(root / "traffic.parquet", batch_size=7)
    assert scored.column_names == ["prob"]
    np.testing.assert_array_equal(scored.column("prob"), labelled.column("prob"))


def test_predict_reports_metrics_with_gauc_and_refuses_them_without_labels(
    exported: tuple[torch.nn.Module, Any, pa.Table, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, cfg, table, root = exported
    export_dir = str(root / "export")
    log = str(root / "log.parquet")
    main(["predict", "--export", export_dir, "--data", log, "--with-metrics", "--json"])
    report = json.loads(capsys.readouterr().out)
    scored = ServingModel(root / "export").predict(root / "log.parquet")
    reference = evaluate_predictions(
        table.column("label").to_numpy(), scored.column("prob").to_numpy(), table["user_id"]
    )
    assert report["auc"] == pytest.approx(reference["auc"], abs=1e-12)
    assert report["gauc"] == pytest.approx(reference["gauc"], abs=1e-12)
    unlabelled = root / "unlabelled.parquet"
    pq.write_table(table.drop_columns([cfg.features.label]), unlabelled)
    with pytest.raises(SystemExit):
        main(["predict", "--export", export_dir, "--data", str(unlabelled), "--with-metrics"])
    assert f"{unlabelled} has no label column 'label'" in capsys.readouterr().err


def test_traffic_still_needs_every_column_the_model_reads(
    exported: tuple[torch.nn.Module, Any, pa.Table, Path],
) -> None:
    _, cfg, table, root = exported
    feature = cfg.features.sparse[-1].name
    pq.write_table(table.drop_columns([feature, "label"]), root / "short.parquet")
    with pytest.raises(BadInputError, match=rf"short.parquet: missing column\(s\) \['{feature}'\]"):
        ServingModel(root / "export").predict(root / "short.parquet")


def test_behaviour_timestamps_make_the_impression_time_required(tmp_path: Path) -> None:
    """Time gaps are measured from the impression: traffic with behaviour timestamps must
    carry the row's timestamp too, while the label stays optional."""
    cfg = config_from_dict(seq_doc("din", timestamps=True))
    model = build_model(cfg, {"category": CATEGORIES})
    run = tmp_path / "run"
    (run / "checkpoint_step00000000").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    save_vocabularies(run, {"category": CATEGORIES})
    save_checkpoint(
        run / "checkpoint_step00000000", model, torch.optim.Adam(model.parameters()), {"step": 0}
    )
    export(run, tmp_path / "export")
    table = arrow_log(16, seed=2)
    pq.write_table(table.drop_columns(["label"]), tmp_path / "no_label.parquet")
    assert ServingModel(tmp_path / "export").predict(tmp_path / "no_label.parquet").num_rows == 16
    pq.write_table(table.drop_columns(["label", "timestamp"]), tmp_path / "no_time.parquet")
    with pytest.raises(BadInputError, match=r"missing column\(s\) \['timestamp'\]"):
        ServingModel(tmp_path / "export").predict(tmp_path / "no_time.parquet")
