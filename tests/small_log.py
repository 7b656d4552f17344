"""A small log with every kind of column the contract has, built from a seed."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from recsys.config import FeaturesConfig


def small_features() -> FeaturesConfig:
    return FeaturesConfig.model_validate(
        {
            "dense": ["d0", {"name": "d1", "fill_null": -1.0}],
            "sparse": [
                "s_single",
                {"name": "s_multi", "multi_valued": True},
                {"name": "s_nullable", "allow_null": True, "allow_negative": True},
                {"name": "s_multi_null", "multi_valued": True, "allow_null": True},
            ],
            "sequences": [{"name": "hist", "target": "s_single"}],
            "sequence_timestamps": "hist_ts",
        }
    )


def small_table(rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    big = np.iinfo(np.int64).max

    def id_lists(max_len: int, null_share: float = 0.0) -> pa.Array:
        out = []
        for _ in range(rows):
            if rng.random() < null_share:
                out.append(None)
            else:
                out.append(rng.integers(0, big, rng.integers(0, max_len + 1)).tolist())
        return pa.array(out, pa.list_(pa.int64()))

    nullable = rng.integers(-big, big, rows)
    hist = id_lists(40)
    hist_ts = pa.array(
        [None if h is None else list(range(len(h))) for h in hist.to_pylist()],
        pa.list_(pa.int64()),
    )
    return pa.table(
        {
            "label": pa.array(rng.integers(0, 2, rows), pa.int8()),
            "timestamp": pa.array(rng.integers(0, 2**40, rows), pa.int64()),
            "user_id": pa.array(rng.integers(0, big, rows), pa.int64()),
            "d0": pa.array(rng.normal(size=rows), pa.float32()),
            "d1": pa.array(
                [None if rng.random() < 0.3 else float(x) for x in rng.normal(size=rows)],
                pa.float64(),
            ),
            "s_single": pa.array(rng.integers(0, big, rows), pa.int64()),
            "s_multi": id_lists(6),
            "s_nullable": pa.array(
                [None if rng.random() < 0.2 else int(x) for x in nullable], pa.int64()
            ),
            "s_multi_null": id_lists(3, null_share=0.25),
            "hist": hist,
            "hist_ts": hist_ts,
        }
    )
