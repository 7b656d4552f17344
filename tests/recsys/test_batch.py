"""Arrow -> Batch against a slow, obviously correct per-row reference."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from recsys.batch import BatchConverter
from recsys.config import FeaturesConfig
from tests.small_log import small_features as _features
from tests.small_log import small_table as _table


def _reference(table: pa.Table, features: FeaturesConfig) -> dict[str, object]:
    """Row by row in plain Python: what the vectorized converter must produce."""
    rows = table.to_pylist()
    out: dict[str, object] = {}
    out["dense"] = [
        [(r[f.name] if r[f.name] is not None else f.fill_null) for f in features.dense]
        for r in rows
    ]

    def as_list(v: object) -> list[int]:
        if v is None:
            return []
        return v if isinstance(v, list) else [v]

    for group, keys in (
        ("sparse", [f.name for f in features.sparse]),
        ("sequences", [s.name for s in features.sequences]),
    ):
        values, lengths = [], []
        for key in keys:
            for r in rows:
                ids = as_list(r[key])
                values += ids
                lengths.append(len(ids))
        out[group] = (values, lengths)
    out["labels"] = [float(r["label"]) for r in rows]
    out["group"] = [r["user_id"] for r in rows]
    out["seq_ts"] = [t for r in rows for t in as_list(r["hist_ts"])]
    return out


@pytest.mark.parametrize("shape", ["whole", "sliced", "chunked", "record_batch"])
def test_converter_matches_per_row_reference(shape: str) -> None:
    features = _features()
    table = _table(300, seed=1)
    if shape == "sliced":
        table = table.slice(37, 200)
    elif shape == "chunked":
        table = pa.concat_tables([table.slice(0, 120), table.slice(120)])
    elif shape == "record_batch":
        table = table.combine_chunks().to_batches()[0].slice(11, 250)
    batch = BatchConverter(features)(table)
    ref = _reference(pa.Table.from_batches([table]) if shape == "record_batch" else table, features)

    assert batch.batch_size == table.num_rows
    np.testing.assert_array_equal(batch.dense.numpy(), np.array(ref["dense"], dtype=np.float32))
    values, lengths = ref["sparse"]
    assert batch.sparse.keys() == [f.name for f in features.sparse]
    assert batch.sparse.values().tolist() == values
    assert batch.sparse.lengths().tolist() == lengths
    assert batch.sparse.stride() == table.num_rows
    seq_values, seq_lengths = ref["sequences"]
    assert batch.sequences is not None
    assert batch.sequences.values().tolist() == seq_values
    assert batch.sequences.lengths().tolist() == seq_lengths
    assert batch.sequence_timestamps is not None
    assert batch.sequence_timestamps.values().tolist() == ref["seq_ts"]
    assert batch.labels.tolist() == ref["labels"]
    assert batch.group is not None and batch.group.tolist() == ref["group"]
    assert batch.labels.dtype == torch.float32 and batch.sparse.values().dtype == torch.int64


def test_per_feature_view_of_keyed_jagged_tensor() -> None:
    """torchrec's own per-key view gives back each column's IDs: the layout is key-major."""
    features = _features()
    table = _table(50, seed=2)
    jagged = BatchConverter(features)(table).sparse.to_dict()
    per_row = [t.tolist() for t in jagged["s_multi"].to_dense()]
    assert per_row == table.column("s_multi").to_pylist()
    assert jagged["s_single"].values().tolist() == table.column("s_single").to_pylist()


def test_batch_moves_between_devices_unchanged() -> None:
    batch = BatchConverter(_features())(_table(20, seed=3))
    moved = batch.to("cpu")
    assert torch.equal(moved.dense, batch.dense)
    assert torch.equal(moved.sparse.values(), batch.sparse.values())


def test_log_dense_and_user_id_as_a_sparse_feature() -> None:
    """`log: true` maps x > 0 to log(1 + x) and keeps the rest; the user_id column may also
    be read as an ID feature, and then it is validated and converted once per role."""
    features = FeaturesConfig.model_validate(
        {"dense": [{"name": "d0", "log": True}], "sparse": ["user_id"]}
    )
    assert features.column_names().count("user_id") == 1
    table = pa.table(
        {
            "label": pa.array([0, 1, 0], pa.int8()),
            "timestamp": pa.array([1, 2, 3], pa.int64()),
            "user_id": pa.array([7, 8, 7], pa.int64()),
            "d0": pa.array([-2.0, 0.0, np.e - 1], pa.float32()),
        }
    )
    batch = BatchConverter(features)(table)
    np.testing.assert_allclose(batch.dense[:, 0].numpy(), [-2.0, 0.0, 1.0], rtol=1e-6)
    assert batch.sparse.values().tolist() == [7, 8, 7] == batch.group.tolist()
    with pytest.raises(ValueError, match="user_id column: single-valued"):
        FeaturesConfig.model_validate({"sparse": [{"name": "user_id", "multi_valued": True}]})
