"""`recsys export`: a trained run -> a directory a serving system loads without this code.

Tables are written row-sorted by `id` (vocabulary IDs for full tables, the live admitted
raw IDs for collisionless ones, row numbers for hashed ones), so a reader maps IDs with one
binary search; IDs without a row read the table's `default_embedding`; multiplexed and
quotient-remainder tables also write each feature's hash salts (see recsys.export_format).
The dense architecture is a `torch.export` program with a dynamic batch dimension.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from pipelines.build import load_trained
from recsys.export_format import (
    DENSE_PROGRAM,
    FORMAT_VERSION,
    HASH,
    MANIFEST,
    ROWS_PER_FILE,
    embedding_table,
)
from tables.collisionless import CollisionlessTransform
from tables.multiplexed import VirtualFeatureTransform
from tables.pooled import TableSpec
from tables.transforms import VocabularyLookup


def _table_rows(model: torch.nn.Module, name: str) -> np.ndarray:
    return model.sparse.ebc.embedding_bags[name].weight.detach().float().numpy()


def _write_table(out: Path, name: str, ids: np.ndarray, rows: np.ndarray, dtype: str) -> list[str]:
    files = []
    folder = out / "tables" / name
    folder.mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, max(len(ids), 1), ROWS_PER_FILE)):
        path = folder / f"part-{part:05d}.parquet"
        stop = start + ROWS_PER_FILE
        pq.write_table(embedding_table(ids[start:stop], rows[start:stop], dtype), path)
        files.append(str(path.relative_to(out)))
    return files


def _hash_lookup(spec: TableSpec, transform: VirtualFeatureTransform) -> dict[str, Any]:
    """The manifest fields that let serving recompute each feature's rows from raw IDs."""
    probes = transform.hash_probes()
    return {
        "lookup": "hash",
        "hash": HASH,
        "num_rows": spec.num_rows,
        "probes": {
            feature: [probes[key]._asdict() for key in keys]
            for feature, keys in zip(spec.features, spec.lookups, strict=True)
        },
    }


def export(run: str | Path, out: str | Path, dtype: str | None = None) -> dict[str, Any]:
    cfg, model, progress = load_trained(run)
    dtype = dtype or cfg.export.dtype
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables = []
    for spec in model.sparse.specs:
        weights = _table_rows(model, spec.name)
        transform = model.sparse.transforms[spec.transform]
        entry: dict[str, Any] = {
            "name": spec.name,
            "variant": spec.variant,
            "features": list(spec.features),
            "dim": spec.dim,
            "pooling": spec.pooling,
            "dtype": dtype,
        }
        if isinstance(transform, VocabularyLookup):
            ids = transform.ids.numpy()
            rows = weights[1:]
            entry["lookup"] = "id"
            entry["default_embedding"] = weights[VocabularyLookup.OOV_ROW].tolist()
        elif isinstance(transform, CollisionlessTransform):
            live_ids, live_rows = transform.live_rows()
            ids, rows = live_ids.numpy(), weights[live_rows.numpy()]
            entry["lookup"] = "id"
            entry["default_embedding"] = transform.default.detach().tolist()
        elif isinstance(transform, VirtualFeatureTransform):
            ids = np.arange(spec.num_rows, dtype=np.int64)
            rows = weights
            entry.update(_hash_lookup(spec, transform))
        else:
            ids = np.arange(spec.num_rows, dtype=np.int64)
            rows = weights
            entry["lookup"] = "modulo"
            entry["num_rows"] = spec.num_rows
        entry["rows"] = len(ids)
        entry["bytes"] = int(rows.size * {"float32": 4, "float16": 2, "int8": 1}[dtype])
        entry["files"] = _write_table(out, spec.name, ids, rows, dtype)
        tables.append(entry)

    f = cfg.features
    example_dense = torch.zeros(2, len(f.dense))
    example_emb = torch.zeros(2, sum(model.sparse.feature_dims))
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(
        model.dense, (example_dense, example_emb), dynamic_shapes=({0: batch}, {0: batch})
    )
    torch.export.save(program, out / DENSE_PROGRAM)
    manifest = {
        "format_version": FORMAT_VERSION,
        "features": f.model_dump(mode="json"),
        "input": {
            "dense": [d.name for d in f.dense],
            "sparse": model.sparse.feature_names,
            "feature_dims": model.sparse.feature_dims,
        },
        "tables": tables,
        "dense_program": DENSE_PROGRAM,
        "training": {
            "experiment": cfg.name,
            "model": cfg.model.name,
            "checkpoint": progress["checkpoint"],
            "step": progress["step"],
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return {"out": str(out), "tables": len(tables), "bytes": sum(t["bytes"] for t in tables)}
