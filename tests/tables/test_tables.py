"""Plain table variants: ID transforms against dict references, vocabulary building."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.config import config_from_dict
from tables.pooled import PooledEmbeddings, make_transform, table_specs
from tables.transforms import ModuloHash, VocabularyLookup
from tables.vocab import build_vocabularies

INT64 = np.iinfo(np.int64)


def test_vocabulary_lookup_matches_dict() -> None:
    rng = np.random.default_rng(0)
    vocab = np.unique(rng.integers(INT64.min, INT64.max, 5000))
    vocab = np.concatenate([vocab, [INT64.min, INT64.max, 0]])
    vocab = np.unique(vocab)
    reference = {int(v): i + 1 for i, v in enumerate(vocab)}
    queries = np.concatenate(
        [rng.choice(vocab, 3000), rng.integers(INT64.min, INT64.max, 3000), [INT64.min, INT64.max]]
    )
    rows = VocabularyLookup(torch.from_numpy(vocab))(torch.from_numpy(queries))
    expected = [reference.get(int(q), 0) for q in queries]
    assert rows.tolist() == expected


def test_vocabulary_must_be_sorted_and_empty_maps_to_oov() -> None:
    with pytest.raises(ValueError, match="sorted"):
        VocabularyLookup(torch.tensor([3, 1]))
    empty = VocabularyLookup(torch.tensor([], dtype=torch.int64))
    assert empty(torch.tensor([5, -5])).tolist() == [0, 0]


def test_modulo_hash_is_non_negative_python_modulo() -> None:
    ids = torch.tensor([INT64.min, -1, 0, 7, INT64.max])
    assert ModuloHash(10)(ids).tolist() == [int(i) % 10 for i in ids.tolist()]


def _cfg(min_count: int, cap: int | None = None):
    return config_from_dict(
        {
            "name": "t",
            "features": {
                "sparse": ["a", {"name": "b", "multi_valued": True}],
                "sequences": [{"name": "h", "target": "a"}],
            },
            "tables": [
                {
                    "name": "ab",
                    "features": ["a", "b"],
                    "shared": True,
                    "min_count": min_count,
                    "num_embeddings": cap,
                    "embedding_dim": 4,
                },
            ],
            "model": {"name": "deepfm"},
        }
    )


def _log(tmp_path: Path) -> Path:
    table = pa.table(
        {
            "label": pa.array([0, 1, 0, 1], pa.int8()),
            "timestamp": pa.array([10, 20, 30, 40], pa.int64()),
            "user_id": pa.array([1, 1, 2, 2], pa.int64()),
            "a": pa.array([5, 5, 7, 9], pa.int64()),
            "b": pa.array([[5, 8], [], [8], [9]], pa.list_(pa.int64())),
            "h": pa.array([[1], [1, 5], [], [11]], pa.list_(pa.int64())),
        }
    )
    pq.write_table(table, tmp_path / "log.parquet")
    return tmp_path / "log.parquet"


def test_vocabulary_counts_every_column_of_a_shared_table(tmp_path: Path) -> None:
    log = _log(tmp_path)
    # counts over a, b and the history h: 5:4, 8:2, 9:2, 1:2, 7:1, 11:1
    assert build_vocabularies(_cfg(1), log)["ab"].tolist() == [1, 5, 7, 8, 9, 11]
    assert build_vocabularies(_cfg(2), log)["ab"].tolist() == [1, 5, 8, 9]
    # capped to the 2 most frequent (row 0 is OOV): 5 (4 times), then 1 (ties by smaller id)
    assert build_vocabularies(_cfg(1, cap=3), log)["ab"].tolist() == [1, 5]
    # validation rows (timestamp >= 30) never reach the vocabulary
    older = pl.scan_parquet(str(log)).filter(pl.col("timestamp") < 30)
    assert build_vocabularies(_cfg(1), older)["ab"].tolist() == [1, 5, 8]


def test_pooled_embeddings_equal_manual_lookup(tmp_path: Path) -> None:
    cfg = _cfg(1)
    vocab = build_vocabularies(cfg, _log(tmp_path))
    specs = table_specs(cfg, vocab)
    module = PooledEmbeddings(specs, {s.name: make_transform(s, vocab[s.name]) for s in specs})
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"],
        values=torch.tensor([5, 42, 8, 9, 5, 11]),
        lengths=torch.tensor([1, 1, 3, 1], dtype=torch.int32),
    )
    out = module(features).to_dict()
    weight = module.ebc.embedding_bags["ab"].weight
    row = {int(v): i + 1 for i, v in enumerate(vocab["ab"])}
    torch.testing.assert_close(out["a"][0], weight[row[5]])
    torch.testing.assert_close(out["a"][1], weight[0])  # 42 is out of vocabulary
    torch.testing.assert_close(out["b"][0], weight[row[8]] + weight[row[9]] + weight[row[5]])
    torch.testing.assert_close(out["b"][1], weight[row[11]])
    assert module.feature_names == ["a", "b"] and module.feature_dims == [4, 4]
