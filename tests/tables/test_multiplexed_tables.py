"""Multiplexed and quotient-remainder tables end to end: config, model, export, sharding."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pipelines.build import build_model
from pipelines.export.writer import export
from recsys.batch import BatchConverter
from recsys.config import ConfigError, ExperimentConfig, config_from_dict
from recsys.hashing import bucket, derive_salt
from recsys.serving.model import ServingModel
from tables.budget import VARIANTS, budget_tables, full_parameters
from tables.pooled import PooledEmbeddings, make_transforms, table_specs
from tables.sharding import combined_optimizer, shard_model
from tests.helpers import (
    copy_full_state,
    gloo_group,
    hand_written_run,
    spawn_ranks,
    trained_probabilities,
)
from tests.small_log import small_features, small_table

DIM = 4
TABLES = [
    {"features": ["s_single"], "embedding_dim": DIM},
    {
        "name": "mux",
        "features": ["s_multi", "s_nullable"],
        "variant": "multiplexed",
        "num_embeddings": 97,
        "embedding_dim": DIM,
        "probes": {"s_multi": 2},
        "pooling": "mean",
    },
    {"features": ["s_multi_null"], "variant": "qr", "num_embeddings": 20, "embedding_dim": DIM},
]


def _cfg(tables: list[dict] = TABLES, **extra) -> ExperimentConfig:
    doc = {
        "name": "mux",
        "features": small_features().model_dump(mode="json"),
        "tables": tables,
        "model": {"name": "dlrm", "dense_arch": [8, DIM], "over_arch": [8]},
        **extra,
    }
    return config_from_dict(doc)


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("entry", "change", "message"),
    [
        (1, {"num_embeddings": None}, "tables[1]: variant 'multiplexed' needs num_embeddings"),
        (1, {"name": None}, "tables[1]: variant 'multiplexed' needs a name"),
        (1, {"probes": {"s_single": 2}}, "tables[1]: probes names features not in this table"),
        (1, {"probes": 0}, "tables[1].probes"),
        (2, {"probes": 2}, "tables[2]: probes is only for variant 'multiplexed', not 'qr'"),
        (2, {"num_embeddings": None}, "tables[2]: variant 'qr' needs num_embeddings"),
        (2, {"num_embeddings": 1}, "tables[2]: variant 'qr' needs num_embeddings >= 2"),
        (2, {"shared": True, "name": "q"}, "tables[2]: variant 'qr' gives every feature its own"),
    ],
)
def test_config_errors_name_the_key(entry: int, change: dict, message: str) -> None:
    tables = list(TABLES)
    tables[entry] = {**tables[entry], **change}
    with pytest.raises(ConfigError, match=re.escape(message)):
        _cfg(tables)


def test_sequences_cannot_read_hashed_tables() -> None:
    tables = [{**TABLES[1], "features": ["s_single", "s_multi", "s_nullable"]}, TABLES[2]]
    with pytest.raises(ConfigError, match="sequence 'hist': its target 's_single'"):
        _cfg(tables)


# ------------------------------------------------------------------------------ model


def test_specs_widths_and_dlrm_chunks() -> None:
    cfg = _cfg()
    vocab = {"s_single": np.arange(10, dtype=np.int64)}
    model = build_model(cfg, vocab)
    specs = {s.name: (s.num_rows, s.lookups, s.transform) for s in model.sparse.specs}
    assert specs == {
        "s_single": (11, (("s_single",),), "s_single"),
        "mux": (97, (("s_multi@0", "s_multi@1"), ("s_nullable@0",)), "mux"),
        "s_multi_null@q": (10, (("s_multi_null@q",),), "s_multi_null"),
        "s_multi_null@r": (10, (("s_multi_null@r",),), "s_multi_null"),
    }
    assert model.sparse.feature_names == ["s_single", "s_multi", "s_nullable", "s_multi_null"]
    assert model.sparse.feature_dims == [DIM, 2 * DIM, DIM, 2 * DIM]
    assert model.dense.num_chunks == 6  # DLRM: every DIM-wide chunk is a vector
    batch = BatchConverter(cfg.features)(small_table(16, 0))
    assert model(batch).shape == (16,)


def test_same_value_in_two_features_reads_different_rows() -> None:
    cfg = _cfg()
    specs = [s for s in table_specs(cfg, {"s_single": np.arange(3)}) if s.name == "mux"]
    module = PooledEmbeddings(specs, make_transforms(cfg, specs, {}))
    weight = module.ebc.embedding_bags["mux"].weight
    with torch.no_grad():  # row r holds r in every column
        weight.copy_(torch.arange(97, dtype=torch.float32)[:, None].expand(-1, DIM))
    values = [7, -3, 2**62]
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=["s_multi", "s_nullable"],
        values=torch.tensor(values * 2),
        lengths=torch.tensor([1, 1, 1] * 2),
    )
    out = module(features).to_dict()
    ids = torch.tensor(values)
    # salts come from the features' positions in features.sparse: s_multi 1, s_nullable 2
    expected_multi = [bucket(ids, derive_salt(1, j), 97).float() for j in range(2)]
    expected_nullable = bucket(ids, derive_salt(2, 0), 97).float()
    assert torch.equal(out["s_multi"][:, 0], expected_multi[0])
    assert torch.equal(out["s_multi"][:, DIM], expected_multi[1])
    assert torch.equal(out["s_nullable"][:, 0], expected_nullable)
    assert not torch.equal(expected_multi[0], expected_nullable)


# ------------------------------------------------------------------------------ export


def test_export_serves_what_the_model_scores(tmp_path: Path) -> None:
    cfg = _cfg()
    log = tmp_path / "log.parquet"
    pq.write_table(small_table(300, 1), log)
    run = tmp_path / "run"
    hand_written_run(cfg, log, run)

    export(run, tmp_path / "export")
    served = ServingModel(tmp_path / "export").predict(log).column("prob").to_numpy()
    np.testing.assert_allclose(served, trained_probabilities(run, log), atol=1e-6)
    assert served.std() > 0  # random tables: the lookups matter

    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    tables = {t["name"]: t for t in manifest["tables"]}
    assert tables["mux"]["lookup"] == "hash"
    assert [p["salt"] for p in tables["mux"]["probes"]["s_multi"]] == [
        derive_salt(1, 0),
        derive_salt(1, 1),
    ]
    assert tables["s_multi_null@q"]["probes"]["s_multi_null"] == [
        {"salt": derive_salt(3, 0), "hash_size": 100, "divisor": 10}
    ]


# ------------------------------------------------------------------------------ budgets


def test_budget_tables_stay_within_budget() -> None:
    tables = config_from_dict(
        {
            "name": "b",
            "features": {"sparse": ["a", "b", "c"]},
            "tables": [{"features": ["a", "b", "c"], "variant": "hash", "num_embeddings": 9}],
        }
    ).tables
    rows = {"a": 10_001, "b": 1_000, "c": 5}
    full = full_parameters(tables, rows)
    assert full == 11_006 * 64
    budget = full // 20
    for variant in ("hash", "qr", "multiplexed"):
        derived = budget_tables(tables, variant, budget, rows)
        spent = sum(t.num_embeddings * t.embedding_dim for t in derived)  # type: ignore[operator]
        assert budget - 3 * 64 < spent <= budget + 64, variant  # qr: c rounds up to 2 rows
    assert [t.num_embeddings for t in budget_tables(tables, "hash", budget, rows)] == [499, 50, 1]
    (mux,) = budget_tables(tables, "multiplexed", budget, rows)
    assert mux.features == ["a", "b", "c"] and mux.num_embeddings == budget // 64
    assert all(t.variant == "full" for t in budget_tables(tables, "full", budget, rows))


def test_budget_tables_keep_the_entries_init() -> None:
    tables = config_from_dict(
        {
            "name": "b",
            "features": {"sparse": ["a", "b"]},
            "tables": [
                {"features": ["a", "b"], "variant": "hash", "num_embeddings": 9}
                | {"init": {"distribution": "uniform", "bound": 0.2}}
            ],
        }
    ).tables
    for variant in VARIANTS:
        derived = budget_tables(tables, variant, 64 * 40, {"a": 50, "b": 60})
        assert {(t.init.distribution, t.init.bound) for t in derived} == {("uniform", 0.2)}


def test_unbudgeted_variants_size_themselves_from_the_vocabulary() -> None:
    tables = config_from_dict(
        {
            "name": "b",
            "features": {"sparse": ["a", "b"]},
            "tables": [{"features": ["a", "b"], "variant": "hash", "num_embeddings": 9}],
        }
    ).tables
    rows = {"a": 1_000, "b": 60}
    for variant, min_count in (("collisionless", 1), ("collisionless_filtered", 3)):
        derived = budget_tables(tables, variant, 1, rows, workers=2, min_count=3)
        assert [(t.features, t.min_count) for t in derived] == [
            (["a"], min_count),
            (["b"], min_count),
        ]
        # room for every vocabulary ID over the two workers, with CAPACITY_SLACK to spare
        assert [t.capacity for t in derived] == [751, 64]
    (compact,) = budget_tables(tables, "optembed", 1, rows)
    assert (compact.variant, compact.storage_variant, compact.features) == (
        "optembed",
        "full",
        ["a", "b"],
    )


# ------------------------------------------------------------------------------ sharding

WORLD = 2
SHARDING = {"mux": "row_wise", "s_single": "table_wise", "s_multi_null@q": "column_wise"}


class _Head(nn.Module):
    def __init__(self, cfg: ExperimentConfig, vocab: dict[str, np.ndarray]) -> None:
        super().__init__()
        specs = table_specs(cfg, vocab)
        self.sparse = PooledEmbeddings(specs, make_transforms(cfg, specs, vocab))
        self.head = nn.Linear(sum(self.sparse.feature_dims), 1)

    def forward(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.sparse(features).values()
        return pooled, self.head(pooled)


def _sharding_worker(rank: int, port: int, out: str) -> None:
    with gloo_group(rank, WORLD, port):
        cfg, vocab = _cfg(), {"s_single": np.arange(0, 2**40, 2**33)}
        torch.manual_seed(0)
        reference = _Head(cfg, vocab)
        torch.manual_seed(1)
        model = shard_model(
            _Head(cfg, vocab), SHARDING, "sgd", 0.1, dist.group.WORLD, torch.device("cpu")
        )
        copy_full_state(model, reference.state_dict())
        optimizer = combined_optimizer(model, "sgd", 0.1, lambda ps: torch.optim.SGD(ps, lr=0.1))
        reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)

        batch = BatchConverter(cfg.features)(small_table(8, 2)).sparse
        local = BatchConverter(cfg.features)(small_table(8, 2).slice(4 * rank, 4)).sparse
        weights = torch.randn(
            8, sum(reference.sparse.feature_dims), generator=torch.Generator().manual_seed(0)
        )
        errors = []
        for step in range(3):
            pooled, logits = model(local)
            expected, expected_logits = reference(batch)
            for name, got, want in (
                ("pooled", pooled, expected),
                ("logits", logits, expected_logits),
            ):
                if not torch.allclose(got, want[4 * rank : 4 * rank + 4], atol=1e-5):
                    errors.append(f"rank {rank} step {step}: {name} differs")
            optimizer.zero_grad()
            ((pooled * weights[4 * rank : 4 * rank + 4]).sum() + logits.sum()).backward()
            optimizer.step()
            reference_optimizer.zero_grad()
            (((expected * weights).sum() + expected_logits.sum()) / WORLD).backward()
            reference_optimizer.step()
        plan = model.plan.plan["sparse.ebc"]
        ranks = sorted(s.placement.rank() for s in plan["mux"].sharding_spec.shards)
        if plan["mux"].sharding_type != "row_wise" or ranks != [0, 1]:
            errors.append(f"mux planned {plan['mux'].sharding_type} on ranks {ranks}")
        everyone: list = [None] * WORLD
        dist.all_gather_object(everyone, errors)
        if rank == 0:
            Path(out).write_text(json.dumps([e for part in everyone for e in part]))


def test_sharded_equals_unsharded(tmp_path: Path) -> None:
    out = tmp_path / "errors.json"
    spawn_ranks(_sharding_worker, WORLD, str(out))
    assert json.loads(out.read_text()) == []
