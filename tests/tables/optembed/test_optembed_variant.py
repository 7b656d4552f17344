"""The `optembed` table variant: config, the embedding layer over full/hash storage,
thresholds through checkpoints. (The Ray pipeline end to end:
tests/pipelines/test_optembed_pipeline.py.)"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml

from pipelines.build import build_model, load_model_weights
from pipelines.export.writer import export
from pipelines.optembed import column_mask, resume_or_start
from pipelines.train.checkpoint import write_manifest
from recsys.batch import BatchConverter
from recsys.config import ConfigError, load_config
from recsys.serving.model import ServingModel
from tables.collisionless.state import save_id_maps
from tables.collisionless.transform import collisionless_transforms
from tables.optembed.masks import Mode, kept_rows
from tables.optembed.search import EvolutionarySearch, SearchConfig
from tests.small_log import small_features, small_table

MINIMAL = {
    "name": "t",
    "features": {"dense": ["d0"], "sparse": ["a", {"name": "b", "multi_valued": True}]},
    "tables": [
        {
            "features": ["a", "b"],
            "variant": "optembed",
            "storage": "hash",
            "num_embeddings": 50,
            "embedding_dim": 8,
        }
    ],
    "model": {"dense_arch": [16, 8]},
}


def _write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_defaults_are_the_papers(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, MINIMAL))
    o = cfg.optembed
    assert (o.alpha, o.threshold_lr, o.norm, o.stage) == (1e-5, 1e-4, 1, "supernet")
    s = o.search
    assert (s.rounds, s.mutations, s.crossovers, s.parents, s.mutate_prob) == (30, 10, 10, 10, 0.1)
    assert cfg.uses_optembed and cfg.tables[0].storage_variant == "hash"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["tables.0.storage=null"],
            "tables[0]: variant 'optembed' needs storage: full, hash or collisionless",
        ),
        (
            ["tables.0.variant=hash"],
            "storage is only for variants ['decoupled', 'optembed'], not 'hash'",
        ),
        (
            ["tables.0.storage=qr"],
            "tables[0].storage: Input should be 'full', 'hash' or 'collisionless'",
        ),
        (
            ["tables.0.num_embeddings=null"],
            "variant 'optembed' with storage 'hash' needs num_embeddings",
        ),
        (["optembed.alpha=-1"], "optembed.alpha: Input should be greater than or equal to 0"),
        (["optembed.search.parents=30"], "parents (30) cannot exceed the population (20)"),
        (["optembed.stage=retrain"], "optembed.dims: retrain needs a dim for features ['a', 'b']"),
        (
            ["optembed.stage=retrain", "optembed.dims={a: 9, b: 2}", "optembed.supernet_run=r"],
            "optembed.dims.a: 9 exceeds its embedding_dim 8",
        ),
        (
            ["optembed.stage=retrain", "optembed.dims={a: 3, b: 2}"],
            "optembed.supernet_run: retrain needs the supernet run's directory",
        ),
        (
            [
                "tables=[{features: [a], variant: optembed, storage: full, embedding_dim: 8},"
                " {features: [b], embedding_dim: 8}]"
            ],
            "variant 'optembed' must be used by every table or none",
        ),
    ],
)
def test_bad_optembed_config_names_the_key(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, MINIMAL), overrides)
    assert message in str(err.value)


def _small_cfg(tmp_path: Path, storage: str, *extra: str):
    doc = {
        "name": "small",
        "features": small_features().model_dump(mode="json"),
        "tables": [
            {
                "features": ["s_single", "s_multi", "s_nullable", "s_multi_null"],
                "variant": "optembed",
                "storage": storage,
                "embedding_dim": 4,
                **({"num_embeddings": 13} if storage == "hash" else {}),
            }
        ],
        "model": {"dense_arch": [8, 4], "over_arch": [8]},
    }
    doc["features"]["sequences"] = []
    doc["features"]["sequence_timestamps"] = None
    return load_config(_write(tmp_path, doc), list(extra))


def _vocabularies(table, features) -> dict[str, np.ndarray]:
    ids = [table.column(f).combine_chunks() for f in features]
    flat = [a.flatten() if hasattr(a, "flatten") else a for a in ids]
    values = np.concatenate([a.drop_null().to_numpy() for a in flat])
    return {f: np.unique(values)[::2].copy() for f in features}  # half the IDs known


@pytest.mark.parametrize("storage", ["full", "hash"])
def test_layer_masks_rows_and_dims_over_its_storage(tmp_path: Path, storage: str) -> None:
    """Thresholds prune rows by norm; search dims cut columns; retrain with the kept rows
    scores what search scores (a pruned full-table row reads the OOV row, itself pruned)."""
    cfg = _small_cfg(tmp_path, storage)
    features = [f.name for f in cfg.features.sparse]
    table = small_table(64, seed=3)
    vocab = _vocabularies(table, features) if storage == "full" else {}
    torch.manual_seed(0)
    model = build_model(cfg, vocab)
    sparse = model.sparse
    with torch.no_grad():  # L1 norms of 4 N(0, 1) entries: about half above 3
        for s in sparse.specs:
            sparse_weight(sparse, s.name).copy_(torch.randn(s.num_rows, 4))
            if storage == "full":  # an OOV row of norm 0: pruned, so it reads zeros as pruned
                sparse_weight(sparse, s.name)[0] = 0.0  # rows do in search mode
    assert sparse.single_features == ["s_single", "s_nullable"]
    assert sparse.multi_features == ["s_multi", "s_multi_null"]
    batch = BatchConverter(cfg.features)(table)
    model.train()
    assert sparse.mode is Mode.SUPERNET
    loss = model(batch).sum() + sparse.regularizer()
    loss.backward()
    assert sparse.pooling.thresholds.threshold.grad is not None

    model.eval()
    assert sparse.mode is Mode.SEARCH
    with torch.no_grad():
        full = sparse(batch.sparse).values()
        sparse.pooling.thresholds.threshold.fill_(3.0)
        dims = [1, 2, 3, 4]
        sparse.use_search(dims)
        searched = sparse(batch.sparse).values()
    assert searched.abs().sum() < full.abs().sum()
    for i, d in enumerate(dims):  # columns beyond the dim read zeros
        assert searched[:, i * 4 + d : (i + 1) * 4].abs().sum() == 0

    weights = {s.name: sparse_weight(sparse, s.name).clone() for s in sparse.specs}
    keep = {f: kept_rows(weights[sparse.feature_transform[f]], 3.0) for f in features}
    assert all(0 < int(k.sum()) < len(k) for k in keep.values())
    sparse.use_retrain(dims, keep)
    with torch.no_grad():
        retrained = sparse(batch.sparse).values()
    torch.testing.assert_close(retrained, searched)
    assert sparse.regularizer() is None
    assert not sparse.pooling.thresholds.threshold.requires_grad


def sparse_weight(sparse, name: str) -> torch.Tensor:
    for ebc in (sparse.ebc_single, sparse.ebc_multi):
        if ebc is not None and name in ebc.embedding_bags:
            return ebc.embedding_bags[name].weight
    raise KeyError(name)


def test_thresholds_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    cfg = _small_cfg(tmp_path, "hash")
    model = build_model(cfg, {})
    with torch.no_grad():
        model.sparse.pooling.thresholds.threshold.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    (tmp_path / "ckpt" / "progress.json").write_text('{"step": 1}')
    fresh = build_model(cfg, {})
    assert fresh.sparse.pooling.thresholds.threshold.abs().sum() == 0
    load_model_weights(tmp_path / "ckpt", fresh)
    torch.testing.assert_close(
        fresh.sparse.pooling.thresholds.threshold, torch.tensor([0.1, 0.2, 0.3, 0.4])
    )


def test_search_scores_candidates_from_cached_full_width_embeddings(tmp_path: Path) -> None:
    """What `recsys search` relies on: masking the full-width output's columns equals the
    layer in search mode with those dims, bit for bit."""
    # U(+-sqrt(1/13)) rows: L1 norms of 4 entries about 0.55, so 0.3 prunes some, not all
    cfg = _small_cfg(tmp_path, "hash", "tables.0.init=uniform")
    model = build_model(cfg, {})
    batch = BatchConverter(cfg.features)(small_table(48, seed=4))
    model.eval()
    with torch.no_grad():
        model.sparse.pooling.thresholds.threshold.fill_(0.3)
        full = model.sparse(batch.sparse).values()
        assert full.abs().sum() > 0  # not every row pruned
        for dims in ([1, 4, 2, 3], [4, 4, 4, 4], [2, 1, 1, 1]):
            model.sparse.use_search(dims)
            expected = model.sparse(batch.sparse).values()
            assert torch.equal(full * column_mask(model.sparse.feature_dims, dims), expected)


@pytest.mark.parametrize(("storage", "pooling"), [("full", "sum"), ("hash", "mean")])
def test_compact_export_scores_exactly_what_the_masked_model_scores(
    tmp_path: Path, storage: str, pooling: str
) -> None:
    """A retrain run written by hand (config, vocabularies, row masks, checkpoint), exported:
    the serving loader on the compact tables reproduces the model's probabilities."""
    dims = {"s_single": 1, "s_multi": 3, "s_nullable": 4, "s_multi_null": 2}
    cfg = _small_cfg(
        tmp_path,
        storage,
        f"tables.0.pooling={pooling}",
        "optembed.stage=retrain",
        f"optembed.dims={json.dumps(dims)}",
        "optembed.supernet_run=supernet",
    )
    table = small_table(256, seed=5)
    features = [f.name for f in cfg.features.sparse]
    vocab = _vocabularies(table, features) if storage == "full" else {}
    gen = torch.Generator().manual_seed(0)
    rows = {s: len(vocab[s]) + 1 if vocab else 13 for s in features}
    keep = {f: (torch.rand(rows[f], generator=gen) < 0.6).numpy() for f in features}
    model = build_model(cfg, vocab, keep=keep)
    with torch.no_grad():
        for s in model.sparse.specs:
            sparse_weight(model.sparse, s.name).normal_(generator=gen)
    model.eval()

    run = tmp_path / "run"
    (run / "checkpoint_step00000001").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    np.savez(run / "vocabularies.npz", **vocab)
    np.savez(run / "optembed_keep.npz", **keep)
    checkpoint = run / "checkpoint_step00000001"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(checkpoint), no_dist=True)
    (checkpoint / "progress.json").write_text('{"step": 1}')
    write_manifest(checkpoint, set(checkpoint.rglob("*")))

    summary = export(run, tmp_path / "export")
    kept = sum(int(k[1:].sum()) if storage == "full" else int(k.sum()) for k in keep.values())
    assert summary["bytes"] == 4 * sum(
        (int(k[1:].sum()) if storage == "full" else int(k.sum())) * dims[f] for f, k in keep.items()
    )
    assert summary["id_bytes"] == 8 * kept
    assert summary["uncompacted_bytes"] == 4 * 4 * sum(rows.values())
    served = ServingModel(tmp_path / "export").predict_table(table)
    with torch.no_grad():
        expected = torch.sigmoid(model(BatchConverter(cfg.features)(table))).numpy()
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-6)


def test_search_state_resumes_only_its_own_search(tmp_path: Path) -> None:
    config = SearchConfig(rounds=2, mutations=2, crossovers=2, parents=2)
    evo = EvolutionarySearch([4, 4], config)
    evo.step(lambda cands: [float(sum(c)) for c in cands])
    path = tmp_path / "state.json"
    path.write_text(json.dumps({**evo.state_dict(), "supernet": "ckpt_1"}))

    more = replace(config, rounds=5)
    resumed = resume_or_start(path, [4, 4], more, "ckpt_1")
    assert resumed.round == 1 and resumed.config.rounds == 5
    assert resumed.population == evo.population and resumed.best == evo.best
    with pytest.raises(ConfigError, match="a search with other settings"):
        resume_or_start(path, [4, 4], more, "ckpt_2")  # another supernet checkpoint
    with pytest.raises(ConfigError, match="delete the file"):
        resume_or_start(path, [4, 4], replace(config, mutate_prob=0.5), "ckpt_1")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["tables.0.capacity=null"],
            "variant 'optembed' with storage 'collisionless' needs capacity (rows per worker)",
        ),
        (
            ["tables.0.pooling=mean"],
            "storage 'collisionless' pools by sum; pooling 'mean' is not supported",
        ),
        (
            ["tables.0.num_embeddings=10"],
            "storage 'collisionless' sizes its table by capacity (rows per worker), "
            "not num_embeddings",
        ),
        (
            ["tables.0.storage=hash", "tables.0.num_embeddings=10"],
            "tables[0]: capacity is only for variant 'collisionless' or storage 'collisionless'",
        ),
        (["tables.0.sharding=table_wise"], "sharding 'table_wise' is not possible"),
        (["tables.0.buckets=1", "train.workers=2"], "tables[0].buckets: 1 buckets cannot be"),
    ],
)
def test_bad_collisionless_storage_config_names_the_key(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    doc = {**MINIMAL, "tables": [{**MINIMAL["tables"][0], "storage": "collisionless"}]}
    del doc["tables"][0]["num_embeddings"]
    doc["tables"][0]["capacity"] = 64
    assert load_config(_write(tmp_path, doc)).tables[0].storage_variant == "collisionless"
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, doc), overrides)
    assert message in str(err.value)


def test_collisionless_storage_only_under_layered_variants(tmp_path: Path) -> None:
    doc = {
        **MINIMAL,
        "tables": [{"features": ["a", "b"], "variant": "hash", "storage": "collisionless"}],
    }
    with pytest.raises(ConfigError, match="storage 'collisionless' is only for variants"):
        load_config(_write(tmp_path, doc))


def _train_a_little(model, batch, steps: int = 3) -> torch.Tensor:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels)
        penalty = model.sparse.regularizer()
        optimizer.zero_grad()
        (loss if penalty is None else loss + penalty).backward()
        optimizer.step()
    return loss.detach()


def test_optembed_over_collisionless_prunes_admitted_rows_and_exports_them(
    tmp_path: Path,
) -> None:
    """Supernet on collisionless storage (min_count 2: first sightings read the default)
    trains; its kept IDs (live, above the threshold) fix a retrain, which admits only them;
    the compact export serves exactly what the retrained model scores."""
    storage = ["tables.0.capacity=4096", "tables.0.min_count=2"]
    cfg = _small_cfg(tmp_path, "collisionless", *storage)
    features = [f.name for f in cfg.features.sparse]
    batch = BatchConverter(cfg.features)(small_table(128, seed=6))
    torch.manual_seed(0)
    model = build_model(cfg, {})
    sparse = model.sparse
    assert torch.isfinite(_train_a_little(model, batch))  # the second pass admits
    transforms = {t.name: t for t in collisionless_transforms(model)}
    assert sorted(transforms) == sorted(features)  # unshared: a table per feature
    assert all(t.default.abs().sum() > 0 for t in transforms.values())  # first sightings
    assert sparse.pooling.thresholds.threshold.abs().sum() > 0
    live = {f: transforms[f].live_rows()[0] for f in features}
    assert all(len(ids) > 50 for ids in live.values())

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # prune about half the live rows (L1 norms of 4 N(0, 1) entries)
        for s in sparse.specs:
            sparse_weight(sparse, s.name).normal_(generator=gen)
        sparse.pooling.thresholds.threshold.fill_(3.0)
    keep = {f: sparse.keep_mask(f).numpy() for f in features}
    for f in features:
        assert set(keep[f]) < set(live[f].tolist()) and len(keep[f]) > 10

    dims = {"s_single": 1, "s_multi": 3, "s_nullable": 4, "s_multi_null": 2}
    retrain = _small_cfg(
        tmp_path,
        "collisionless",
        *storage,
        "optembed.stage=retrain",
        f"optembed.dims={json.dumps(dims)}",
        "optembed.supernet_run=supernet",
    )
    model = build_model(retrain, {}, keep=keep)
    _train_a_little(model, batch)
    admitted = {t.name: t.live_rows()[0].numpy() for t in collisionless_transforms(model)}
    for f in features:  # pruned IDs are never admitted: they read the default
        assert len(admitted[f]) > 0 and np.isin(admitted[f], keep[f]).all()
    model.eval()

    run = tmp_path / "run"
    checkpoint = run / "checkpoint_step00000001"
    checkpoint.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(retrain.model_dump(mode="json")))
    np.savez(run / "optembed_keep.npz", **keep)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(checkpoint), no_dist=True)
    save_id_maps(model, checkpoint)
    (checkpoint / "progress.json").write_text('{"step": 1}')
    write_manifest(checkpoint, set(checkpoint.rglob("*")))

    summary = export(run, tmp_path / "export")
    assert summary["bytes"] == 4 * sum(len(admitted[f]) * dims[f] for f in features)
    served = ServingModel(tmp_path / "export").predict_table(small_table(128, seed=6))
    with torch.no_grad():
        expected = torch.sigmoid(model(batch)).numpy()
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-6)
