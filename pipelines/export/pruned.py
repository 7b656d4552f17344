"""Compact tables of an optembed retrain run, for `recsys export`.

Each feature gets its own table entry (its rows are pruned by its own mask and cut to its
own dim, even where features share a storage table): only the kept rows, only the first
`dim` columns, and an ID map from kept IDs to them (the `id` column). Any other ID reads
the entry's default embedding, which is what the retrained model reads for a pruned or
unknown ID: the out-of-vocabulary row cut to `dim` when that row is kept, else zeros; for
a collisionless table, the live admitted IDs the retrain kept, and its default embedding.
`input_dim` is the width the dense model takes; the serving loader pads with zeros.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tables.optembed.embeddings import OptEmbedEmbeddings
from tables.optembed.masks import Mode

DTYPE_BYTES = {"float32": 4, "float16": 2, "int8": 1}
ID_BYTES = 8  # int64 ID map entries

Writer = Callable[[Path, str, np.ndarray, np.ndarray, str], dict[str, Any]]


def compact_tables(
    sparse: OptEmbedEmbeddings, out: Path, dtype: str, write: Writer
) -> list[dict[str, Any]]:
    """Write one compact table per feature with `write`; returns the manifest entries."""
    if sparse.mode is not Mode.RETRAIN:
        raise ValueError(
            "export of an optembed supernet: export its retrain run (`recsys retrain CONF`), "
            "whose dims and row masks are fixed"
        )
    dims = sparse.pooling.dims.tolist()
    entries = []
    for spec in sparse.specs:
        weights = sparse.table_weight(spec.name).float()
        transform = sparse.transforms[spec.transform]
        for feature in spec.features:
            dim = int(dims[sparse.feature_names.index(feature)])
            keep = sparse.pooling.keep[feature].cpu()
            served = transform.served_rows(spec.name, weights)
            if transform.dynamic_ids:
                # Live admitted IDs; a retrain admits kept ones only, the check is cheap.
                kept = torch.isin(served.ids, sparse.kept_ids[feature])
            else:
                kept = keep[served.positions]
            ids, rows = served.ids[kept], served.rows[kept, :dim]
            default = torch.zeros(dim)
            if served.default is not None and (
                served.default_row is None or keep[served.default_row]
            ):
                default = served.default.detach()[:dim]
            lookup: dict[str, Any] = {"lookup": served.lookup}
            if served.lookup == "modulo":
                lookup["num_rows"] = spec.num_rows
            name = spec.name if len(spec.features) == 1 else f"{spec.name}@{feature}"
            ids_np, rows_np = ids.numpy(), rows.contiguous().numpy()
            entries.append(
                {
                    "name": name,
                    "variant": "optembed",
                    "storage": spec.variant,
                    "features": [feature],
                    "dim": dim,
                    "input_dim": spec.dim,
                    "pooling": spec.pooling,
                    "dtype": dtype,
                    **lookup,
                    "default_embedding": default.tolist(),
                    "rows": len(ids_np),
                    "full_rows": spec.num_rows,
                    "bytes": int(rows_np.size * DTYPE_BYTES[dtype]),
                    "id_bytes": int(len(ids_np) * ID_BYTES),
                    **write(out, name, ids_np, rows_np, dtype),
                }
            )
    return entries


def uncompacted_bytes(sparse: OptEmbedEmbeddings, dtype: str) -> int:
    """The storage tables' bytes at full width and every row (what a plain export holds)."""
    return sum(s.num_rows * s.dim * DTYPE_BYTES[dtype] for s in sparse.specs)
