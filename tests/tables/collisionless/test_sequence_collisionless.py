"""Decoupled sequence tables over collisionless storage: one ID map per feature serving its
attention and representation tables, checked against a dict of what each ID should read;
DARE trains on them; checkpoint and export round trips; config errors."""

from __future__ import annotations

import json
import re
from collections import Counter
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
from pipelines.build import build_model, load_trained, save_vocabularies
from pipelines.export.writer import export
from pipelines.train.checkpoint import save_checkpoint
from recsys.batch import BatchConverter
from recsys.config import ConfigError, ExperimentConfig, config_from_dict
from recsys.serving.model import ServingModel, load_tables
from tables.collisionless.ownership import hash64
from tables.collisionless.report import table_report
from tables.collisionless.sequence import SharedRowsTransform
from tables.collisionless.storage import table_storage
from tables.collisionless.transform import bind_ownership, collisionless_transforms
from tables.sharding import combined_optimizer, shard_model
from tests.helpers import copy_full_state, gloo_group, spawn_ranks
from tests.tables.test_sequence_tables import POSITIONS, seq_doc

ITEM_POOL = 10**12 + np.arange(40, dtype=np.int64) * 7919  # raw IDs far from any row number
CAPACITY = 64


def cl_doc(item_min_count: int = 2) -> dict[str, Any]:
    doc = seq_doc("dare", decoupled=True)
    collisionless = {"storage": "collisionless", "num_embeddings": None, "filter_width": 4096}
    doc["tables"][0] |= collisionless | {"capacity": CAPACITY, "min_count": item_min_count}
    doc["tables"][1] |= collisionless | {"capacity": CAPACITY}
    return doc


def cl_cfg(item_min_count: int = 2) -> ExperimentConfig:
    return config_from_dict(cl_doc(item_min_count))


def log(rows: int, seed: int, pool: np.ndarray = ITEM_POOL) -> pa.Table:
    """Impressions with histories of 0..9 behaviours over a small item pool, so that some
    items repeat (admitted at min_count 2) and some are seen once (filtered)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 10, rows)
    lengths[0] = 7
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    total = int(offsets[-1])

    def history(values: np.ndarray) -> pa.Array:
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int64()))

    return pa.table(
        {
            "label": rng.integers(0, 2, rows),
            "timestamp": np.arange(rows, dtype=np.int64) + 100 * seed,
            "user_id": rng.integers(0, 5, rows),
            "item_id": rng.choice(pool, rows),
            "category_id": rng.integers(0, 20, rows),
            "hist_item": history(rng.choice(pool, total)),
            "hist_category": history(rng.integers(0, 20, total)),
        }
    )


def build(cfg: ExperimentConfig) -> SequenceRankingModel:
    torch.manual_seed(0)
    model = build_model(cfg, {})
    assert isinstance(model, SequenceRankingModel)
    for transform in model.sequence.transforms.values():
        if isinstance(transform, SharedRowsTransform):
            with torch.no_grad():  # distinct defaults, so reading one is visible
                for k, default in enumerate(transform.defaults.values()):
                    default.copy_(torch.arange(default.numel()) + 10.0 * (k + 1))
    return model


def test_lookups_give_own_rows_to_admitted_ids_and_defaults_to_the_rest() -> None:
    cfg = cl_cfg()
    model = build(cfg)
    table = log(12, seed=1)
    batch = BatchConverter(cfg.features)(table)
    out = model.sequence(batch.sparse, batch.sequences, batch.timestamps)

    items = table.column("item_id").to_pylist()
    history = [i for h in table.column("hist_item").to_pylist() for i in h]
    counts = Counter(items + history)
    transform = model.sequence.transforms["item"]
    ids, rows = transform.live_rows()
    row_of = dict(zip(ids.tolist(), rows.tolist(), strict=True))
    assert set(row_of) == {i for i, n in counts.items() if n >= 2}
    assert 0 < len(row_of) < len(counts)  # some filtered
    assert len(set(row_of.values())) == len(row_of)  # one row each, in both tables

    def expected(raw: list[int], role: str) -> torch.Tensor:
        weight = model.sequence.collection_of(f"item@{role}").embeddings[f"item@{role}"].weight
        default = transform.defaults[f"item@{role}"]
        return torch.stack([weight[row_of[i]] if i in row_of else default for i in raw]).detach()

    item_att, item_rep = slice(0, 4), slice(0, 8)  # item | category | time, per set
    for raw, att, rep in (
        (items, out.attention_target, out.representation_target),
        (history, out.attention_history, out.representation_history),
    ):
        torch.testing.assert_close(att[:, item_att].detach(), expected(raw, "att"))
        torch.testing.assert_close(rep[:, item_rep].detach(), expected(raw, "rep"))
    # the two tables start unrelated: the attention row is no prefix of the representation row
    att_w = model.sequence.collection_of("item@att").embeddings["item@att"].weight
    rep_w = model.sequence.collection_of("item@rep").embeddings["item@rep"].weight
    assert not torch.allclose(att_w[rows], rep_w[rows, :4])
    report = table_report(model.sequence)
    assert report["item"]["live_rows"] == len(row_of)
    assert report["item"]["row_bytes"] == CAPACITY * (4 + 8) * 4
    assert report["category"]["filtered"] == 0

    model.eval()  # evaluation reads without admitting
    model.sequence(batch.sparse, batch.sequences, batch.timestamps)
    assert transform.live_rows()[0].tolist() == ids.tolist()


def _train(
    model: SequenceRankingModel, cfg: ExperimentConfig, steps: int
) -> tuple[list[float], torch.optim.Optimizer]:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    batch = BatchConverter(cfg.features)(log(48, seed=3))
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, optimizer


def test_dare_trains_and_round_trips_through_checkpoint_and_export(tmp_path: Path) -> None:
    """Training moves loss down; checkpoint -> `load_trained` and -> `recsys export` ->
    `ServingModel` (live rows plus defaults only) score what the trained model scores,
    IDs never seen included."""
    cfg = cl_cfg()
    model = build(cfg)
    losses, optimizer = _train(model, cfg, steps=8)
    assert losses[-1] < losses[0], losses
    run = tmp_path / "run"
    (run / "checkpoint_step00000008").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    save_vocabularies(run, {})
    save_checkpoint(run / "checkpoint_step00000008", model, optimizer, {"step": 8})

    unseen = 2 * 10**12 + np.arange(10, dtype=np.int64)
    table = log(40, seed=4, pool=np.concatenate([ITEM_POOL, unseen]))
    batch = BatchConverter(cfg.features)(table)
    model.eval()
    with torch.no_grad():
        expected = torch.sigmoid(model(batch)).numpy()
    _, restored, _ = load_trained(run)
    with torch.no_grad():
        np.testing.assert_array_equal(torch.sigmoid(restored(batch)).numpy(), expected)

    summary = export(run, tmp_path / "export")
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    tables = {t["name"]: t for t in manifest["tables"]}
    live = len(model.sequence.transforms["item"].live_rows()[0])
    assert tables["item@att"]["rows"] == tables["item@rep"]["rows"] == live < CAPACITY
    assert tables["item@att"]["dim"] == 4 and tables["item@rep"]["dim"] == 8
    assert tables["item@rep"]["default_embedding"] == (
        model.sequence.transforms["item"].defaults["item@rep"].tolist()
    )
    assert summary["tables"] == len(model.sequence.specs)
    pq.write_table(table, tmp_path / "log.parquet")
    served = ServingModel(tmp_path / "export").predict(tmp_path / "log.parquet")
    np.testing.assert_allclose(served.column("prob").to_numpy(), expected, atol=1e-6)


def test_incremental_export_applies_to_its_base(tmp_path: Path) -> None:
    """Export after 4 steps, train 4 more on new items (which evict old ones), export since
    the first: base + delta serves as the full export does, in both role tables, and the
    delta holds only the rows trained since, plus the evicted IDs as deletions."""
    cfg = cl_cfg(item_min_count=1)
    model = build(cfg)
    run = tmp_path / "run"
    (run / "config.yaml").parent.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    save_vocabularies(run, {})
    # SGD: as fbgemm's sparse optimizers, it moves only the rows a batch reads (Adam's
    # momentum would keep moving rows untouched since, which no delta could carry)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    convert = BatchConverter(cfg.features)
    new_items = 2 * 10**12 + np.arange(30, dtype=np.int64)
    for step in range(8):
        batch = convert(log(32, seed=10 + step, pool=ITEM_POOL if step < 4 else new_items))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in (3, 7):
            checkpoint = run / f"checkpoint_step{step + 1:08d}"
            checkpoint.mkdir()
            save_checkpoint(checkpoint, model, optimizer, {"step": step})
    export(run / "checkpoint_step00000004", tmp_path / "base")
    export(run, tmp_path / "delta", since=tmp_path / "base")
    export(run, tmp_path / "full")

    manifest = json.loads((tmp_path / "delta" / "manifest.json").read_text())
    deltas = {e["name"]: e for e in manifest["tables"] if e.get("delta")}
    assert set(deltas) == {"item@att", "item@rep", "category@att", "category@rep"}
    full, applied = load_tables(tmp_path / "full"), load_tables(tmp_path / "delta")
    for name in deltas:
        assert torch.equal(applied[name].ids, full[name].ids), name
        assert torch.equal(applied[name].weights, full[name].weights), name
    assert deltas["item@rep"]["deleted"] > 0  # old items evicted by the new ones
    assert deltas["item@rep"]["rows"] < len(full["item@rep"].ids)  # old items not retrained
    data = pa.concat_tables([log(40, seed=30), log(40, seed=31, pool=new_items)])
    pq.write_table(data, tmp_path / "log.parquet")
    served = ServingModel(tmp_path / "delta").predict(tmp_path / "log.parquet")
    expected = ServingModel(tmp_path / "full").predict(tmp_path / "log.parquet")
    np.testing.assert_array_equal(served.column("prob"), expected.column("prob"))


def _set(index: int, **changes: Any) -> dict[str, Any]:
    doc = cl_doc()
    doc["tables"][index] |= changes
    return doc


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            _set(0, capacity=None),
            "variant 'decoupled' with storage 'collisionless' needs capacity",
        ),
        (
            _set(0, num_embeddings=100),
            "variant 'decoupled' with storage 'collisionless' sizes its table by capacity",
        ),
        (_set(1, sharding="table_wise"), "sharding 'table_wise' is not possible"),
        (_set(0, filter_width=100), "filter_width must be a power of two"),
        (_set(1, variant="hash", attention_dim=None), "storage 'collisionless' is only for"),
        (_set(0, buckets=1) | {"train": {"workers": 2}}, "tables[0].buckets: 1 buckets"),
    ],
)
def test_config_errors_name_the_key(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(doc)


def test_positions_keep_their_own_sharding() -> None:
    specs = {s.name: s for s in build_model(cl_cfg(), {}).sequence.specs}
    assert specs["item@att"].sharding == specs["category@rep"].sharding == "row_wise"
    assert specs["item@time@att"].num_rows == POSITIONS
    assert specs["item@att"].num_rows == CAPACITY  # train.workers = 1


# ------------------------------------------------------------------------------ 2 ranks

WORLD = 2


def _rows_by_id(model: torch.nn.Module, name: str) -> dict[str, dict[int, list[float]]]:
    """Per role table of feature `name`: raw ID -> its row, for the rows held here."""
    sequence = model.sequence  # type: ignore[attr-defined]
    transform = sequence.transforms[name]
    ids, rows = transform.live_rows()
    out = {}
    for table in transform.storage_tables:
        weight, _, first = table_storage(sequence.collection_of(table), table)
        out[table] = dict(zip(ids.tolist(), weight[rows - first].tolist(), strict=True))
    return out


def _two_rank_worker(rank: int, port: int, out: str) -> None:
    """Rank `rank` of a DMP-sharded DARE over collisionless tables, against an unsharded
    model holding every shard, trained on the whole batch in the same process."""
    with gloo_group(rank, WORLD, port):
        cfg = config_from_dict(cl_doc() | {"train": {"workers": WORLD}})
        reference = build(cfg).eval()  # eval: BatchNorm uses running stats on both sides
        model = build_model(cfg, {}, table_device=torch.device("meta"))
        bind_ownership(model, rank, dist.new_group(backend="gloo"))
        model = shard_model(
            model, reference.table_sharding(), "sgd", 0.1, dist.group.WORLD, torch.device("cpu")
        )
        copy_full_state(model, reference.state_dict())
        model.eval()
        for m in (*collisionless_transforms(model), *collisionless_transforms(reference)):
            m.train()  # admission on
        optimizer = combined_optimizer(model, "sgd", 0.1, lambda ps: torch.optim.SGD(ps, lr=0.1))
        reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
        convert = BatchConverter(cfg.features)
        errors = []
        for step in range(3):
            table = log(16, seed=20 + step)
            full, local = convert(table), convert(table.slice(8 * rank, 8))
            logits, expected = model(local), reference(full)
            if not torch.allclose(logits, expected[8 * rank : 8 * rank + 8], atol=1e-5):
                errors.append(f"rank {rank} step {step}: logits differ")
            optimizer.zero_grad()
            logits.sum().backward()
            optimizer.step()
            reference_optimizer.zero_grad()
            (expected.sum() / WORLD).backward()
            reference_optimizer.step()
        report = table_report(model.module.sequence, dist.group.WORLD)
        expected_report = table_report(reference.sequence)
        for name in ("item", "category"):
            for key in ("lookups", "admitted", "filtered", "live_rows", "row_bytes"):
                if report[name][key] != expected_report[name][key]:
                    errors.append(
                        f"{name} {key}: {report[name][key]} != {expected_report[name][key]}"
                    )
        held: list[Any] = [None] * WORLD
        dist.all_gather_object(
            held, {n: _rows_by_id(model.module, n) for n in ("item", "category")}
        )
        everyone: list[Any] = [None] * WORLD
        dist.all_gather_object(everyone, errors)
        if rank == 0:
            for name in ("item", "category"):
                for table, rows in _rows_by_id(reference, name).items():
                    sharded = {**held[0][name][table], **held[1][name][table]}
                    if sharded.keys() != rows.keys():
                        everyone[0].append(f"{table}: other live IDs")
                    elif not all(np.allclose(sharded[i], r, atol=1e-5) for i, r in rows.items()):
                        everyone[0].append(f"{table}: rows differ")
            Path(out).write_text(json.dumps([e for part in everyone for e in part]))


def test_two_ranks_equal_one_unsharded_model(tmp_path: Path) -> None:
    out = tmp_path / "errors.json"
    spawn_ranks(_two_rank_worker, WORLD, str(out))
    assert json.loads(out.read_text()) == []


def _reuse_worker(rank: int, port: int, out: str) -> None:
    """One DMP rank with row-wise Adagrad: rows taken from evicted IDs start over in both
    role tables (hashed initial weights, zero optimizer state) before their first lookup."""
    with gloo_group(rank, 1, port):
        doc = cl_doc(item_min_count=1)
        doc["tables"][0]["capacity"] = 32
        cfg = config_from_dict(doc)
        model = build_model(cfg, {}, table_device=torch.device("meta"))
        bind_ownership(model, 0, dist.new_group(backend="gloo"))
        dmp = shard_model(
            model,
            model.table_sharding(),
            "rowwise_adagrad",
            0.1,
            dist.group.WORLD,
            torch.device("cpu"),
        )
        optimizer = combined_optimizer(
            dmp, "rowwise_adagrad", 0.1, lambda ps: torch.optim.SGD(ps, lr=0.1)
        )
        convert = BatchConverter(cfg.features)
        sequence, errors = dmp.module.sequence, []
        transform = sequence.transforms["item"]
        storage = {t: table_storage(sequence.collection_of(t), t) for t in transform.storage_tables}
        first = convert(log(16, seed=1, pool=ITEM_POOL[:20]))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(dmp(first), first.labels)
        loss.backward()
        optimizer.step()
        before = dict(zip(*(t.tolist() for t in transform.live_rows()), strict=True))
        trained = {t: states[0].clone() for t, (_, states, _) in storage.items()}
        dmp(convert(log(16, seed=2, pool=ITEM_POOL[20:])))
        ids, rows = transform.live_rows()
        reused = torch.tensor(
            [
                i not in before and r in before.values()
                for i, r in zip(*(ids.tolist(), rows.tolist()), strict=True)
            ]
        )
        if not reused.any():
            errors.append("no row was reused")
        for k, (table, (weight, states, _)) in enumerate(storage.items()):
            at = rows[reused]
            if not trained[table][at].abs().sum() > 0:
                errors.append(f"{table}: the reused rows had no optimizer state to clear")
            salted = ids[reused] if k == 0 else hash64(ids[reused], 0x5EC0 + k)
            init = transform.row_init.rows_of(salted, weight.shape[1])
            if not torch.equal(weight[at], init):
                errors.append(f"{table}: reused rows not re-initialized")
            if states[0][at].abs().sum() != 0:
                errors.append(f"{table}: optimizer state of reused rows not zeroed")
        Path(out).write_text(json.dumps(errors))


def test_reused_rows_start_over_in_both_sharded_tables(tmp_path: Path) -> None:
    out = tmp_path / "errors.json"
    spawn_ranks(_reuse_worker, 1, str(out))
    assert json.loads(out.read_text()) == []
