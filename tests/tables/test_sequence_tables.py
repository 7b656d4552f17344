"""Sequence tables from config: lookups against a per-row reference, the decoupled variant,
config errors, and a sharded model against the unsharded one on 2 gloo ranks."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import yaml

from models.sequence_ranking import SequenceRankingModel
from pipelines.build import build_model, save_vocabularies
from pipelines.export.writer import export
from pipelines.train.checkpoint import save_checkpoint
from recsys.batch import Batch, BatchConverter
from recsys.config import ConfigError, ExperimentConfig, config_from_dict
from recsys.serving.manifest import ExportError
from recsys.serving.model import ServingModel
from tables.sharding import combined_optimizer, shard_model
from tests.helpers import copy_full_state, gloo_group, spawn_ranks

ITEM_ROWS, POSITIONS = 50, 6
CATEGORIES = np.arange(0, 140, 7, dtype=np.int64)  # the category vocabulary (20 IDs)


def seq_doc(
    model: str = "twin", decoupled: bool = False, timestamps: bool = False
) -> dict[str, Any]:
    item: dict[str, Any] = {"name": "item", "features": ["item_id"], "embedding_dim": 8}
    category: dict[str, Any] = {"name": "category", "features": ["category_id"]}
    category["embedding_dim"] = 8
    if decoupled:
        item |= {"variant": "decoupled", "storage": "hash", "attention_dim": 4}
        category |= {"variant": "decoupled", "attention_dim": 4}
    else:
        item |= {"variant": "hash"}
    item["num_embeddings"] = ITEM_ROWS
    return {
        "name": "seq",
        "features": {
            "sparse": ["item_id", "category_id"],
            "sequences": [
                {"name": "hist_item", "target": "item_id"},
                {"name": "hist_category", "target": "category_id"},
            ],
            "sequence_timestamps": "hist_ts" if timestamps else None,
        },
        "tables": [item, category],
        "model": {
            "name": model,
            **({"din_length": 5} if model == "din" else {"top_k": 3}),
            "time_positions": POSITIONS,
        },
    }


def seq_cfg(
    model: str = "twin", decoupled: bool = False, timestamps: bool = False
) -> ExperimentConfig:
    return config_from_dict(seq_doc(model, decoupled, timestamps))


def arrow_log(rows: int, seed: int) -> pa.Table:
    """Impressions with histories of 0..11 behaviours; some IDs outside the vocabulary;
    behaviour times from seconds to decades before the impression, a few after it (all
    positive: the contract refuses negative list values)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 12, rows)
    lengths[0] = 9  # the batch holds behaviours even if the draw says otherwise
    total = int(lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)

    def history(values: np.ndarray) -> pa.Array:
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int64()))

    columns = {
        "label": rng.integers(0, 2, rows),
        "timestamp": 1_700_000_000 + np.arange(rows, dtype=np.int64),
        "user_id": rng.integers(0, 5, rows),
        "item_id": rng.integers(0, 10**6, rows),
        "category_id": rng.integers(0, 150, rows),
        "hist_item": history(rng.integers(0, 10**6, total)),
        "hist_category": history(rng.integers(0, 150, total)),
    }
    gaps = (2.0 ** rng.uniform(0, 30, total)).astype(np.int64) - 3
    columns["hist_ts"] = history(np.repeat(columns["timestamp"], lengths) - gaps)
    return pa.table(columns)


def batch_of(cfg: ExperimentConfig, rows: int = 8, seed: int = 0) -> Batch:
    return BatchConverter(cfg.features)(arrow_log(rows, seed))


def build(cfg: ExperimentConfig, seed: int = 0) -> SequenceRankingModel:
    torch.manual_seed(seed)
    model = build_model(cfg, {"category": CATEGORIES})
    assert isinstance(model, SequenceRankingModel)
    return model


def weights(model: SequenceRankingModel) -> dict[str, np.ndarray]:
    return {
        name: table.weight.detach().numpy()
        for ec in model.sequence.collections.values()
        for name, table in ec.embeddings.items()
    }


def reference_vectors(
    table: pa.Table, w: dict[str, np.ndarray], suffix: str
) -> tuple[np.ndarray, np.ndarray]:
    """Row by row: target and history vectors item | category | time of one set."""

    def vector(item: int, category: int, position: int) -> np.ndarray:
        found = np.flatnonzero(category == CATEGORIES)
        cat_row = found[0] + 1 if len(found) else 0
        return np.concatenate(
            [
                w[f"item{suffix}"][item % ITEM_ROWS],
                w[f"category{suffix}"][cat_row],
                w[f"item@time{suffix}"][min(position, POSITIONS - 1)],
            ]
        )

    rows = table.to_pylist()
    targets = [vector(r["item_id"], r["category_id"], 0) for r in rows]
    history = [
        vector(item, cat, len(r["hist_item"]) - j)
        for r in rows
        for j, (item, cat) in enumerate(zip(r["hist_item"], r["hist_category"], strict=True))
    ]
    return np.stack(targets), np.stack(history)


@pytest.mark.parametrize("decoupled", [False, True])
def test_lookups_match_a_row_by_row_reference(decoupled: bool) -> None:
    cfg = seq_cfg("dare" if decoupled else "twin", decoupled)
    model = build(cfg)
    table = arrow_log(8, seed=3)
    batch = BatchConverter(cfg.features)(table)
    out = model.sequence(batch.sparse, batch.sequences)
    lengths = [len(h) for h in table.column("hist_item").to_pylist()]
    assert out.offsets.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    w = weights(model)
    sets = {"attention": "@att", "representation": "@rep"} if decoupled else None
    for role in ("attention", "representation"):
        target, history = reference_vectors(table, w, sets[role] if sets else "")
        got_target = getattr(out, f"{role}_target").detach().numpy()
        got_history = getattr(out, f"{role}_history").detach().numpy()
        assert got_history.shape == (sum(lengths), target.shape[1])  # jagged, never padded
        np.testing.assert_array_equal(got_target, target)
        np.testing.assert_array_equal(got_history, history)
    dims = model.sequence.dims
    if decoupled:
        assert dims == {"att": [4, 4, 4], "rep": [8, 8, 8]}
        assert out.attention_history.shape[1] == 12 and out.representation_history.shape[1] == 24
    else:
        assert out.attention_history is out.representation_history
        assert dims == {"att": [8, 8, 8], "rep": [8, 8, 8]}


def test_decoupled_tables_are_separate_and_named() -> None:
    model = build(seq_cfg("dare", decoupled=True))
    specs = {s.name: s for s in model.sequence.specs}
    assert set(specs) == {
        "item@att",
        "item@rep",
        "category@att",
        "category@rep",
        "item@time@att",
        "item@time@rep",
    }
    assert (specs["item@att"].dim, specs["item@rep"].dim) == (4, 8)
    assert specs["category@rep"].num_rows == len(CATEGORIES) + 1
    assert set(model.table_sharding()) == set(specs)
    w = weights(model)
    assert w["item@att"].shape == (ITEM_ROWS, 4) and w["item@rep"].shape == (ITEM_ROWS, 8)
    # Gradients of a DARE loss reach both tables of the item feature, each its own.
    batch = batch_of(seq_cfg("dare", decoupled=True))
    model(batch).sum().backward()
    grads = {
        name: t.weight.grad
        for ec in model.sequence.collections.values()
        for name, t in ec.embeddings.items()
    }
    assert grads["item@att"].abs().sum() > 0 and grads["item@rep"].abs().sum() > 0


def test_tied_decoupled_tables_reduce_to_the_coupled_model() -> None:
    """DARE over two tables holding the same rows computes TWIN's logits."""
    doc = seq_doc("dare", decoupled=True)
    doc["tables"][0]["attention_dim"] = 8
    doc["tables"][1]["attention_dim"] = 8
    dare, twin = build(config_from_dict(doc)), build(seq_cfg("twin"), seed=1)
    twin_w = {
        n: t.weight for ec in twin.sequence.collections.values() for n, t in ec.embeddings.items()
    }
    with torch.no_grad():
        for ec in dare.sequence.collections.values():
            for name, table in ec.embeddings.items():
                table.weight.copy_(twin_w[name.rsplit("@", 1)[0]])
    dare.model.load_state_dict(twin.model.state_dict())
    batch = batch_of(seq_cfg("twin"), rows=16, seed=5)
    for model in (dare, twin):
        model.eval()
    torch.testing.assert_close(dare(batch), twin(batch), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["din", "twin", "twin_proj", "dare"])
def test_every_sequence_model_trains_from_config(name: str) -> None:
    cfg = seq_cfg(name, decoupled=name == "dare")
    model = build(cfg)
    batch = batch_of(cfg, rows=32, seed=7)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def _broken(change: Any) -> dict[str, Any]:
    doc = seq_doc("twin")
    change(doc)
    return doc


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (seq_doc("dare"), "the table of 'item_id' needs variant 'decoupled'"),
        (seq_doc("twin", decoupled=True), "model 'twin' reads one embedding set"),
        (
            _broken(lambda d: d.update(model={"name": "deepfm"}))
            | {"tables": seq_doc("dare", True)["tables"]},
            "variant 'decoupled' is for sequence models",
        ),
        (
            _broken(lambda d: d["tables"][0].update(attention_dim=4)),
            "attention_dim is only for variant 'decoupled', not 'hash'",
        ),
        (
            _broken(
                lambda d: d["tables"][0].update(
                    variant="decoupled", storage="hash", num_embeddings=None
                )
            ),
            "variant 'decoupled' with storage 'hash' needs num_embeddings",
        ),
        (
            _broken(
                lambda d: (
                    d["features"]["sparse"].append("shop_id"),
                    d["tables"].append(
                        {"features": ["shop_id"], "variant": "collisionless", "capacity": 64}
                    ),
                )
            ),
            "variant 'collisionless' serves CTR models' pooled features, not model 'twin'",
        ),
        (
            _broken(lambda d: d["features"].update(sequences=d["features"]["sequences"][:1])),
            "needs exactly 2, got 1",
        ),
        (
            _broken(
                lambda d: d["features"].update(
                    sparse=["item_id", {"name": "category_id", "multi_valued": True}]
                )
            ),
            "target 'category_id' must be single-valued",
        ),
        (
            _broken(lambda d: d["tables"][1].update(embedding_dim=6)),
            "tables[1]: embedding_dim 6 is not a multiple of 4",
        ),
    ],
)
def test_config_errors_name_the_problem(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(doc)


# ------------------------------------------------------------------------------ sharding

WORLD = 2
SHARDING = {"item@att": "row_wise", "item@rep": "table_wise", "category@rep": "column_wise"}


def _sharding_worker(rank: int, port: int, out: str) -> None:
    with gloo_group(rank, WORLD, port):
        cfg = seq_cfg("dare", decoupled=True)
        reference = build(cfg, seed=0).eval()  # eval: BatchNorm uses running stats on both sides
        sharding = {**reference.table_sharding(), **SHARDING}
        model = shard_model(
            build(cfg, seed=1), sharding, "sgd", 0.1, dist.group.WORLD, torch.device("cpu")
        )
        copy_full_state(model, reference.state_dict())
        model.eval()
        optimizer = combined_optimizer(model, "sgd", 0.1, lambda ps: torch.optim.SGD(ps, lr=0.1))
        reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
        table = arrow_log(8, seed=11)
        convert = BatchConverter(cfg.features)
        full, local = convert(table), convert(table.slice(4 * rank, 4))
        errors = []
        for step in range(3):
            logits, expected = model(local), reference(full)
            if not torch.allclose(logits, expected[4 * rank : 4 * rank + 4], atol=1e-5):
                errors.append(f"rank {rank} step {step}: logits differ")
            optimizer.zero_grad()
            logits.sum().backward()
            optimizer.step()
            reference_optimizer.zero_grad()
            (expected.sum() / WORLD).backward()
            reference_optimizer.step()
        plans = {t: p for module in model.plan.plan.values() for t, p in module.items()}  # type: ignore[union-attr]
        for name, kind in SHARDING.items():
            if plans[name].sharding_type != kind:
                errors.append(f"{name} planned {plans[name].sharding_type}, not {kind}")
        everyone: list = [None] * WORLD
        dist.all_gather_object(everyone, errors)
        if rank == 0:
            Path(out).write_text(json.dumps([e for part in everyone for e in part]))


def test_sharded_sequence_model_equals_unsharded(tmp_path: Path) -> None:
    out = tmp_path / "errors.json"
    spawn_ranks(_sharding_worker, WORLD, str(out))
    assert json.loads(out.read_text()) == []


# ------------------------------------------------------------------------------ export


@pytest.mark.parametrize(
    ("name", "timestamps", "dense"),
    [("din", False, False), ("dare", False, True), ("din", True, True), ("dare", True, False)],
)
def test_export_round_trip_scores_what_the_model_scores(
    name: str, timestamps: bool, dense: bool, tmp_path: Path
) -> None:
    """Checkpoint -> `recsys export` -> `ServingModel` (torch + pyarrow only) reproduces
    the trained model's probabilities, unknown IDs and capped time positions included, and
    the time gaps of a log with behaviour timestamps."""
    doc = seq_doc(name, decoupled=name == "dare", timestamps=timestamps)
    if dense:
        doc["features"]["dense"] = ["price"]
    cfg = config_from_dict(doc)

    def log(rows: int, seed: int) -> pa.Table:
        table = arrow_log(rows, seed)
        if dense:
            price = np.random.default_rng(seed).random(rows)
            table = table.append_column("price", pa.array(price))
        return table

    model = build(cfg)
    assert (model.model.time_gaps is not None) == timestamps
    batch = BatchConverter(cfg.features)(log(32, seed=9))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(3):  # move every table, the gap table and the BatchNorm statistics
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    run = tmp_path / "run"
    (run / "checkpoint_step00000003").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    save_vocabularies(run, {"category": CATEGORIES})
    save_checkpoint(run / "checkpoint_step00000003", model, optimizer, {"step": 3})
    summary = export(run, tmp_path / "export")
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    tables = {t["name"]: t for t in manifest["tables"]}
    assert summary["tables"] == len(model.sequence.specs) == len(tables)
    assert manifest["input"]["time_gaps"] == timestamps
    if name == "dare":
        assert tables["item@att"]["dim"] == 4 and tables["item@rep"]["dim"] == 8
        assert tables["category@att"]["lookup"] == "id"
    path = tmp_path / "log.parquet"
    table = log(40, seed=10)
    pq.write_table(table, path)
    served = ServingModel(tmp_path / "export").predict(path).column("prob").to_numpy()
    model.eval()
    with torch.no_grad():
        expected = torch.sigmoid(model(BatchConverter(cfg.features)(table))).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-6)
    # Without a table one of its fields reads, the export is refused naming the field.
    missing = manifest["input"]["fields"][0]["tables"]["att"]
    manifest["tables"] = [t for t in manifest["tables"] if t["name"] != missing]
    (tmp_path / "export" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=r"input\.fields\[0\]\.tables\.att: table '.*' is not in"):
        ServingModel(tmp_path / "export")


def test_behaviour_timestamps_reach_the_model_as_gaps() -> None:
    """With `sequence_timestamps` the model reads impression time - behaviour time; the
    same config without them builds the model without gap parameters, as before."""
    table = arrow_log(16, seed=12)
    with_times, without = seq_cfg("twin", timestamps=True), seq_cfg("twin")
    batch = BatchConverter(with_times.features)(table)
    gaps = build(with_times).inputs(batch).gaps
    rows = table.to_pylist()
    assert gaps.tolist() == [r["timestamp"] - t for r in rows for t in r["hist_ts"]]
    model = build(without)
    assert model.inputs(BatchConverter(without.features)(table)).gaps is None
    assert not any("time_gaps" in key for key in model.state_dict())
    assert build(with_times).model.time_gaps.table.weight.shape == (32, 24)


def test_dense_and_other_sparse_features_join_the_head() -> None:
    doc = seq_doc("dare", decoupled=True)
    doc["features"]["sparse"].append("shop")
    doc["features"]["dense"] = ["price"]
    doc["tables"].append(
        {"features": ["shop"], "variant": "hash", "num_embeddings": 7, "embedding_dim": 4}
    )
    cfg = config_from_dict(doc)
    model = build(cfg)
    assert model.pooled is not None and "shop" in model.table_sharding()
    rng = np.random.default_rng(0)
    table = arrow_log(8, seed=4)
    table = table.append_column("shop", pa.array(rng.integers(0, 100, 8))).append_column(
        "price", pa.array(rng.random(8))
    )
    batch = BatchConverter(cfg.features)(table)
    inputs = model.inputs(batch)
    assert inputs.other is not None and inputs.other.shape == (8, 1 + 4)
    model(batch).sum().backward()
    assert model.pooled.ebc.embedding_bags["shop"].weight.grad.abs().sum() > 0
