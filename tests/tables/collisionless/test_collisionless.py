"""Collisionless tables in the model: routing by owner, filter, expiry, resets, 1 vs 2 ranks.

The in-process tests drive an unsharded `PooledEmbeddings` (every shard held locally) and
check it against what each ID should read. The spawned test trains the same model with
torchrec DMP on 1 rank (capacity 2C) and on 2 gloo ranks (capacity C each), on the same
global batches, and compares what it learned per ID, the dense weights and the logits.
Each run checkpoints and trains on; the other world size restores that checkpoint (2 -> 1
and 1 -> 2 ranks) and must hold the same per-ID state and train on as the saved run did.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import yaml
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pipelines.build import build_model, load_trained
from pipelines.export.writer import export
from pipelines.train.checkpoint import load_checkpoint, save_checkpoint
from recsys.batch import BatchConverter
from recsys.config import ExperimentConfig, config_from_dict
from recsys.serving.manifest import ExportError
from recsys.serving.model import ServingModel, load_tables
from tables.collisionless.report import table_report
from tables.collisionless.state import load_id_maps, save_id_maps
from tables.collisionless.storage import table_storage
from tables.collisionless.transform import CollisionlessTransform, bind_ownership
from tables.initializers import RowInit
from tables.pooled import PooledEmbeddings, TableSpec
from tables.sharding import combined_optimizer, shard_model
from tables.transforms import ModuloHash
from tests.helpers import gloo_group, spawn_ranks

DIM = 8
CAPACITY = 64  # rows per rank at 2 ranks
GLOBAL_BATCH = 16
STEPS = 5
DAY = 86_400


def _config(workers: int, capacity: int) -> ExperimentConfig:
    collisionless = {
        "variant": "collisionless",
        "capacity": capacity,
        "embedding_dim": DIM,
        "buckets": 64,
    }
    return config_from_dict(
        {
            "name": "cl",
            "features": {
                "dense": ["d0", "d1"],
                "sparse": [
                    {"name": "a", "allow_negative": True},
                    {"name": "b", "multi_valued": True},
                    "c",
                ],
            },
            "tables": [
                {**collisionless, "features": ["a"], "ttl": 2 * DAY, "evict_every": DAY},
                {**collisionless, "features": ["b"], "min_count": 2, "filter_width": 1024},
                {
                    "features": ["c"],
                    "variant": "hash",
                    "num_embeddings": 32,
                    "embedding_dim": DIM,
                    "sharding": "row_wise",
                },
            ],
            "model": {"name": "dlrm", "dense_arch": [16, DIM], "over_arch": [16]},
            "train": {"workers": workers, "sparse_optimizer": "rowwise_adagrad"},
        }
    )


def _log(step: int) -> pa.Table:
    """A global batch of day `step`: IDs drift (a's old IDs stop, so they expire), b repeats
    some IDs (so the filter admits them at their second sighting), extreme values appear."""
    rng = np.random.default_rng(step)
    big = np.iinfo(np.int64).max
    a = rng.integers(step * 10, step * 10 + 12, GLOBAL_BATCH)
    a[0], a[1] = -big - 1, big
    b = [rng.integers(0, 40, rng.integers(0, 4)).tolist() for _ in range(GLOBAL_BATCH)]
    return pa.table(
        {
            "label": pa.array(rng.integers(0, 2, GLOBAL_BATCH), pa.int8()),
            "timestamp": pa.array(step * DAY + np.arange(GLOBAL_BATCH), pa.int64()),
            "user_id": pa.array(rng.integers(0, 5, GLOBAL_BATCH), pa.int64()),
            "d0": pa.array(rng.normal(size=GLOBAL_BATCH), pa.float32()),
            "d1": pa.array(rng.normal(size=GLOBAL_BATCH), pa.float32()),
            "a": pa.array(a, pa.int64()),
            "b": pa.array(b, pa.list_(pa.int64())),
            "c": pa.array(rng.integers(0, 1000, GLOBAL_BATCH), pa.int64()),
        }
    )


# ------------------------------------------------------------------------ in process


def _single_table(**kwargs: Any) -> PooledEmbeddings:
    spec = TableSpec("t", ("f",), "collisionless", 8, DIM, "sum", "row_wise")
    transform = CollisionlessTransform("t", ("f",), 4, 2, DIM, buckets=8, **kwargs)
    with torch.no_grad():
        transform.default.copy_(torch.arange(DIM, dtype=torch.float32))
    return PooledEmbeddings([spec], {"t": transform})


def _kjt(bags: list[list[int]]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(
        keys=["f"],
        values=torch.tensor([i for bag in bags for i in bag], dtype=torch.int64),
        lengths=torch.tensor([len(bag) for bag in bags], dtype=torch.int32),
    )


def _reference(sparse: PooledEmbeddings, bags: list[list[int]]) -> torch.Tensor:
    """Each ID reads its own row if it has one, else the default: summed per bag."""
    transform = sparse.transforms["t"]
    ids, rows = transform.live_rows()
    row_of = dict(zip(ids.tolist(), rows.tolist(), strict=True))
    weight = sparse.ebc.embedding_bags["t"].weight.detach()
    return torch.stack(
        [
            sum(
                (weight[row_of[i]] if i in row_of else transform.default for i in bag),
                torch.zeros(DIM),
            )
            for bag in bags
        ]
    )


def test_filtered_ids_read_the_default_until_admitted() -> None:
    sparse = _single_table(min_count=2)
    bags = [[5, 7], [], [5], [9, 9]]  # 5 and 9 seen twice: admitted; 7 once: filtered
    out = sparse(_kjt(bags), torch.arange(4)).values().detach()
    ids, rows = sparse.transforms["t"].live_rows()
    assert ids.tolist() == [5, 9] and len(set(rows.tolist())) == 2
    torch.testing.assert_close(out, _reference(sparse, bags))
    weight = sparse.ebc.embedding_bags["t"].weight.detach()
    torch.testing.assert_close(weight[rows], RowInit("uniform", 1 / 8**0.5).rows_of(ids, DIM))
    counters = sparse.transforms["t"].take_counters()
    assert (counters.map.admitted, counters.map.filtered, counters.map.lookups) == (2, 1, 5)


def test_expiry_frees_rows_and_readmission_starts_fresh() -> None:
    sparse = _single_table(ttl=10, evict_every=5)
    sparse(_kjt([[1, 2]]), torch.tensor([0]))
    sparse(_kjt([[2]]), torch.tensor([8]))
    with torch.no_grad():
        sparse.ebc.embedding_bags["t"].weight.fill_(3.0)  # as if trained
    sparse(_kjt([[3]]), torch.tensor([12]))  # pass at 12: 1 unseen since 0 -> expired
    transform = sparse.transforms["t"]
    assert sorted(transform.live_rows()[0].tolist()) == [2, 3]
    assert transform.take_counters().expired == 1
    out = sparse(_kjt([[1]]), torch.tensor([13])).values().detach()
    start = RowInit("uniform", 1 / 8**0.5).rows_of(torch.tensor([1]), DIM)[0]
    torch.testing.assert_close(out[0], start)


def test_eval_mode_reads_without_admitting() -> None:
    sparse = _single_table()
    sparse(_kjt([[4]]), torch.tensor([0]))
    sparse.eval()
    bags = [[4, 6], [6]]
    out = sparse(_kjt(bags), torch.tensor([1, 1])).values().detach()
    assert sparse.transforms["t"].live_rows()[0].tolist() == [4]
    torch.testing.assert_close(out, _reference(sparse, bags))


def test_every_admitted_id_owns_a_distinct_row_at_full_load() -> None:
    sparse = _single_table()
    ids = torch.tensor([-(2**63), 2**63 - 1, -1, 0, 1, 17, 99, 1234567])
    sparse(_kjt([ids.tolist()]), torch.tensor([0]))
    live, rows = sparse.transforms["t"].live_rows()
    counters = sparse.transforms["t"].take_counters().map
    assert counters.admitted + counters.overflowed == 8  # a shard's IDs beyond 4 overflow
    assert len(set(rows.tolist())) == len(rows) == counters.admitted
    assert set(live.tolist()) <= set(ids.tolist())


def test_id_maps_round_trip_exactly(tmp_path: Path) -> None:
    """Save mid-stream, restore into a fresh module: the rest of the stream is identical."""
    stream = [([[1, 2], [2, 3]], [0, 1]), ([[3, 4, 5]], [9]), ([[1, 6], [7]], [20, 21])]
    stream += [([[8, 2]], [30]), ([[1, 9, 9]], [41])]

    def run(sparse: PooledEmbeddings, part: list) -> list[torch.Tensor]:
        return [sparse(_kjt(b), torch.tensor(t)).values().detach() for b, t in part]

    original = _single_table(min_count=2, ttl=15, evict_every=10)
    run(original, stream[:2])
    save_id_maps(original, tmp_path)
    weights = {k: v.clone() for k, v in original.state_dict().items()}
    expected = run(original, stream[2:])

    restored = _single_table(min_count=2, ttl=15, evict_every=10)
    restored.load_state_dict(weights)
    load_id_maps(restored, tmp_path)
    for got, want in zip(run(restored, stream[2:]), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    a, b = original.transforms["t"], restored.transforms["t"]
    for s in a.shards:
        for key, value in a.shards[s].idmap.state_dict().items():
            assert torch.equal(value, b.shards[s].idmap.state_dict()[key]), key
        counters = a.shards[s].filter.sketch.counters
        assert torch.equal(counters, b.shards[s].filter.sketch.counters)


def test_shared_table_features_must_be_adjacent() -> None:
    spec = TableSpec("t", ("f", "h"), "collisionless", 8, DIM, "sum", "row_wise")
    hashed = TableSpec("u", ("g",), "hash", 4, DIM, "sum", "auto")
    transforms = {"t": CollisionlessTransform("t", ("f", "h"), 4, 2, DIM), "u": ModuloHash(4)}
    sparse = PooledEmbeddings([spec, hashed], transforms)
    kjt = KeyedJaggedTensor(
        keys=["f", "g", "h"], values=torch.arange(3), lengths=torch.ones(3, dtype=torch.int32)
    )
    with pytest.raises(ValueError, match=r"must be adjacent in features\.sparse"):
        sparse(kjt, torch.zeros(1))


# ------------------------------------------------------------------------ export
@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_run(tmp_path_factory.mktemp("run"))


def trained_run(run_dir: Path) -> Path:
    """Two workers' shards held in one process, trained on days 0-5 with a checkpoint
    after day 2 and one after day 5."""
    cfg = _config(workers=2, capacity=64)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    torch.manual_seed(0)
    model = build_model(cfg, {})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    convert = BatchConverter(cfg.features)
    for step in range(6):
        batch = convert(_log(step))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in (2, 5):
            checkpoint = run_dir / f"checkpoint_step{step + 1:08d}"
            checkpoint.mkdir()
            save_checkpoint(checkpoint, model, optimizer, {"step": step + 1, "epoch": 0})
    return run_dir


def test_export_holds_live_rows_and_serves_what_the_model_scores(run: Path, tmp_path: Path) -> None:
    cfg, model, _ = load_trained(run)
    export(run, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entries = {e["name"]: e for e in manifest["tables"]}
    for name in ("a", "b"):
        transform = model.sparse.transforms[name]
        ids, rows = transform.live_rows()
        table = pq.read_table(tmp_path / entries[name]["files"][0])
        assert table.column("id").to_pylist() == ids.tolist()
        weights = model.sparse.ebc.embedding_bags[name].weight.detach()
        np.testing.assert_array_equal(
            np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), weights[rows]
        )
        assert entries[name]["lookup"] == "id"
        assert entries[name]["default_embedding"] == transform.default.detach().tolist()
    data = _log(7)  # a's IDs of day 7 were never seen: they read the default
    assert not set(data.column("a").to_pylist()) & set(
        model.sparse.transforms["a"].live_rows()[0].tolist()
    ) - {-(2**63), 2**63 - 1}
    with torch.no_grad():
        expected = torch.sigmoid(model(BatchConverter(cfg.features)(data))).numpy()
    served = ServingModel(tmp_path).predict_table(data)
    np.testing.assert_allclose(served, expected, atol=1e-6)


def test_incremental_export_applies_to_its_base(run: Path, tmp_path: Path) -> None:
    """Export after day 2, then day 5 since it: base + delta serves as the full export of
    day 5 does, while the delta holds only the rows trained on days 3-5."""
    export(run / "checkpoint_step00000003", tmp_path / "base")
    export(run, tmp_path / "delta", since=tmp_path / "base")
    export(run, tmp_path / "full")
    full = load_tables(tmp_path / "full")
    applied = load_tables(tmp_path / "delta")
    manifest = json.loads((tmp_path / "delta" / "manifest.json").read_text())
    deltas = {e["name"]: e for e in manifest["tables"] if e.get("delta")}
    assert set(deltas) == {"a", "b"} and manifest["format_version"] == 4
    for name, entry in deltas.items():
        assert torch.equal(applied[name].ids, full[name].ids)
        assert torch.equal(applied[name].weights, full[name].weights)
        assert entry["rows"] < len(full[name].ids) or name == "a"
    assert deltas["a"]["deleted"] > 0  # a's day 0-2 IDs expired by day 5 (ttl: 2 days)
    data = pa.concat_tables([_log(day) for day in range(8)])
    np.testing.assert_array_equal(
        ServingModel(tmp_path / "delta").predict_table(data),
        ServingModel(tmp_path / "full").predict_table(data),
    )
    with pytest.raises(ValueError, match="base export saw 6 training steps"):
        export(run / "checkpoint_step00000003", tmp_path / "backwards", since=tmp_path / "full")
    assert not (tmp_path / "backwards").exists()  # a failed export leaves no folder
    # The delta records its base's manifest digest: a base exported again is another export.
    export(run, tmp_path / "base")
    with pytest.raises(ExportError, match=r"base: .* is not the one this delta was written on"):
        load_tables(tmp_path / "delta")


# ------------------------------------------------------------------------ 1 vs 2 ranks


def _sharded(cfg: ExperimentConfig, rank: int) -> tuple[Any, Any]:
    model = build_model(cfg, {}, table_device=torch.device("meta"))
    bind_ownership(model, rank, dist.new_group(backend="gloo"))
    dmp = shard_model(
        model,
        {s.name: s.sharding for s in model.sparse.specs},
        "rowwise_adagrad",
        0.1,
        dist.group.WORLD,
        torch.device("cpu"),
    )
    optimizer = combined_optimizer(
        dmp, "rowwise_adagrad", 0.1, lambda ps: torch.optim.SGD(ps, lr=0.05)
    )
    return dmp, optimizer


def _steps(dmp: Any, optimizer: Any, cfg: ExperimentConfig, steps: range, rank: int) -> list:
    """Train on the rank's share of the global batches of `steps`; the logits of each."""
    convert = BatchConverter(cfg.features)
    local = GLOBAL_BATCH // dist.get_world_size()
    logits = []
    for step in steps:
        batch = convert(_log(step).slice(rank * local, local))
        out = dmp(batch)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out, batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        logits.append(out.detach().tolist())
    return logits


AFTER = range(STEPS, STEPS + 2)  # steps trained after the checkpoint


def _row_state(dmp: Any) -> dict[str, dict[str, list[float]]]:
    """Per table, live ID -> its row's weights, row-wise Adagrad momentum, last-seen time
    and count, read from the rank's TBE, fused optimizer and ID map."""
    out = {}
    for name in ("a", "b"):
        transform = dmp.module.sparse.transforms[name]
        weight, (momentum,), first = table_storage(dmp.module.sparse.ebc, name)
        shard = transform.shards[transform.rank]
        ids, rows = transform.live_rows()
        slots = rows - transform.rank * transform.capacity
        values = torch.cat(
            [
                weight[rows - first].double(),
                momentum[rows - first].double().unsqueeze(1),
                shard.idmap.last_seen[slots].double().unsqueeze(1),
                shard.idmap.counts[slots].double().unsqueeze(1),
            ],
            1,
        )
        out[name] = dict(zip(map(str, ids.tolist()), values.tolist(), strict=True))
    return out


def _continued(dmp: Any, optimizer: Any, cfg: ExperimentConfig, rank: int) -> dict[str, Any]:
    """The model as restored (or saved), then trained on the steps after the checkpoint."""
    sparse = dmp.module.sparse
    restored = _row_state(dmp)
    defaults = {name: sparse.transforms[name].default.tolist() for name in ("a", "b")}
    clocks = {
        name: (sparse.transforms[name].steps, sparse.transforms[name].last_pass) for name in "ab"
    }
    logits = _steps(dmp, optimizer, cfg, AFTER, rank)
    return {
        "restored": restored,
        "defaults": defaults,
        "clocks": clocks,
        "after_logits": logits,
        "after_rows": _row_state(dmp),
        "after_report": table_report(sparse, dist.group.WORLD),
    }


def _train(rank: int, world: int, ckpt: Path) -> dict[str, Any]:
    cfg = _config(world, CAPACITY * 2 // world)
    torch.manual_seed(0)
    dmp, optimizer = _sharded(cfg, rank)
    # Table rows come from the ID hash; only the dense layers need the same start.
    torch.manual_seed(1)
    dense = build_model(cfg, {}, table_device=torch.device("meta")).dense.state_dict()
    dmp.module.dense.load_state_dict(dense)
    hashed, _, first = table_storage(dmp.module.sparse.ebc, "c")
    hashed.copy_(RowInit("uniform", 0.1).rows_of(torch.arange(first, first + hashed.shape[0]), DIM))
    logits = _steps(dmp, optimizer, cfg, range(STEPS), rank)
    report = table_report(dmp.module.sparse, dist.group.WORLD)
    embeddings: dict[str, dict[int, list[float]]] = {}
    for name in ("a", "b"):
        transform = dmp.module.sparse.transforms[name]
        weight, _, first = table_storage(dmp.module.sparse.ebc, name)
        ids, rows = transform.live_rows()
        embeddings[name] = dict(zip(ids.tolist(), weight[rows - first].tolist(), strict=True))
    state = {k: v.tolist() for k, v in dmp.module.dense.state_dict().items()}
    state.update({f"default.{n}": dmp.module.sparse.transforms[n].default.tolist() for n in "ab"})
    save_checkpoint(ckpt, dmp, optimizer, {"step": STEPS})
    continued = _continued(dmp, optimizer, cfg, rank)
    # Restored into a fresh model on the same ranks, the steps after it are bitwise equal.
    resumed = True
    if world > 1:
        fresh, fresh_optimizer = _sharded(cfg, rank)
        load_checkpoint(ckpt, fresh, fresh_optimizer)
        resumed = _steps(fresh, fresh_optimizer, cfg, AFTER, rank) == continued["after_logits"]
    return {
        "logits": logits,
        "embeddings": embeddings,
        "dense": state,
        "report": report,
        "resumed": resumed,
        **continued,
    }


def _restore(rank: int, world: int, ckpt: Path) -> dict[str, Any]:
    """Another world's checkpoint restored onto `world` ranks, then trained on."""
    cfg = _config(world, CAPACITY * 2 // world)
    dmp, optimizer = _sharded(cfg, rank)
    load_checkpoint(ckpt, dmp, optimizer)
    return _continued(dmp, optimizer, cfg, rank)


def _merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The ranks' results as one: logits per step in rank order (the global batch), per-ID
    dicts united; everything else as rank 0 has it."""
    merged = results[0]
    merged["resumed"] = all(r.get("resumed", True) for r in results)
    for other in results[1:]:
        for key in ("logits", "after_logits"):
            if key in merged:
                pairs = zip(merged[key], other[key], strict=True)
                merged[key] = [a + b for a, b in pairs]
        for key in ("embeddings", "restored", "after_rows"):
            for name, rows in other.get(key, {}).items():
                merged[key][name].update(rows)
    return merged


def _worker(rank: int, port: int, world: int, out: str, restore_from: str | None) -> None:
    with gloo_group(rank, world, port):
        if restore_from is None:
            result = _train(rank, world, Path(out).parent / "checkpoint")
        else:
            result = _restore(rank, world, Path(restore_from))
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, result)
        if rank == 0:
            Path(out).write_text(json.dumps(_merge(everyone)))


def _spawn(world: int, out: Path, restore_from: Path | None = None) -> dict[str, Any]:
    source = None if restore_from is None else str(restore_from)
    spawn_ranks(_worker, world, world, str(out), source)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    results = {}
    for world in (1, 2):
        out = tmp_path_factory.mktemp(f"world{world}") / "result.json"
        results[world] = _spawn(world, out)
        results[world]["checkpoint"] = str(out.parent / "checkpoint")
    return results


@pytest.fixture(scope="module")
def restored(
    runs: dict[int, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[int, int], dict[str, Any]]:
    """(saved on, restored onto) -> the restored run: 2 -> 1 and 1 -> 2 workers."""
    results = {}
    for saved, world in ((2, 1), (1, 2)):
        out = tmp_path_factory.mktemp(f"restore{saved}to{world}") / "result.json"
        results[saved, world] = _spawn(world, out, Path(runs[saved]["checkpoint"]))
    return results


def test_two_ranks_learn_what_one_rank_learns(runs: dict[int, dict[str, Any]]) -> None:
    one, two = runs[1], runs[2]
    np.testing.assert_allclose(two["logits"], one["logits"], atol=1e-5)
    for name in ("a", "b"):
        assert one["embeddings"][name].keys() == two["embeddings"][name].keys()
        for key, row in one["embeddings"][name].items():
            np.testing.assert_allclose(two["embeddings"][name][key], row, atol=1e-5)
    for key, value in one["dense"].items():
        np.testing.assert_allclose(two["dense"][key], value, atol=1e-5, err_msg=key)


def test_two_rank_checkpoint_resumes_bitwise(runs: dict[int, dict[str, Any]]) -> None:
    assert runs[2]["resumed"]


@pytest.mark.parametrize("move", [(2, 1), (1, 2)])
def test_restore_onto_another_worker_count_continues_exactly(
    move: tuple[int, int],
    runs: dict[int, dict[str, Any]],
    restored: dict[tuple[int, int], dict[str, Any]],
) -> None:
    """Every live ID keeps its row, momentum, last-seen time and count bitwise; the default,
    the clock and (summed) the counters continue; the steps after the checkpoint score and
    learn what the saved run scores and learns on its own number of workers."""
    source, got = runs[move[0]], restored[move]
    for name in ("a", "b"):
        assert got["restored"][name] == source["restored"][name]
        assert len(source["restored"][name]) > 10
        assert got["defaults"][name] == source["defaults"][name]
        assert got["clocks"][name] == source["clocks"][name]
        counts = ("lookups", "hits", "admitted", "filtered", "expired", "live_rows")
        for key in counts:
            assert got["after_report"][name][key] == source["after_report"][name][key], key
    np.testing.assert_allclose(got["after_logits"], source["after_logits"], atol=1e-5)
    for name in ("a", "b"):
        assert got["after_rows"][name].keys() == source["after_rows"][name].keys()
        for key, row in source["after_rows"][name].items():
            np.testing.assert_allclose(got["after_rows"][name][key], row, atol=1e-5)


def test_reports_are_summed_over_ranks(runs: dict[int, dict[str, Any]]) -> None:
    one, two = runs[1]["report"], runs[2]["report"]
    counts = ("lookups", "hits", "admitted", "filtered", "expired", "live_rows", "row_bytes")
    for name in ("a", "b"):
        assert {k: two[name][k] for k in counts} == {k: one[name][k] for k in counts}
    assert one["a"]["expired"] > 0 and one["b"]["filtered"] > 0
    assert one["a"]["live_rows"] == len(runs[1]["embeddings"]["a"])
    assert one["a"]["load_factor"] == one["a"]["live_rows"] / (2 * CAPACITY)
    assert one["a"]["optimizer_bytes"] == 2 * CAPACITY * 4  # row-wise Adagrad: a float per row
    assert one["b"]["filter_bytes"] > 0 == one["a"]["filter_bytes"]
