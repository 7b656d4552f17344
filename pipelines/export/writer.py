"""`recsys export`: a trained run -> a directory a serving system loads without this code.

Tables are written row-sorted by `id` (vocabulary IDs for full tables, the live admitted
raw IDs for collisionless ones, row numbers for hashed ones), so a reader maps IDs with one
binary search; IDs without a row read the table's `default_embedding`; multiplexed and
quotient-remainder tables also write each feature's hash salts (see recsys.serving.format).
The dense architecture is a `torch.export` program with a dynamic batch dimension.

`since` makes an incremental export on top of an earlier one (Monolith's parameter sync):
collisionless tables, pooled or sequence, then hold only the rows trained after that
export plus the IDs that lost their rows since (pipelines.export.delta); the other tables
and the dense program are written whole.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from pipelines.build import load_trained
from pipelines.export.delta import Previous, collisionless_rows
from pipelines.export.pruned import compact_tables, uncompacted_bytes
from pipelines.export.sequence import sequence_program, sequence_tables
from recsys.serving.format import (
    DELTA_FORMAT_VERSION,
    DENSE_PROGRAM,
    FORMAT_VERSION,
    HASH,
    MANIFEST,
    ROWS_PER_FILE,
    embedding_table,
)
from recsys.serving.model import load_tables
from tables.collisionless.transform import CollisionlessTransform
from tables.multiplexed import VirtualFeatureTransform
from tables.optembed.embeddings import OptEmbedEmbeddings
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


def _pooled_export(
    cfg: Any, model: torch.nn.Module, out: Path, dtype: str, previous: Previous | None = None
) -> tuple[list[dict[str, Any]], torch.export.ExportedProgram, dict[str, Any]]:
    """Pooled tables, the dense program over (dense, embeddings) and its input spec.

    An optembed model writes its compact tables instead (pipelines.export.pruned);
    `previous` (the base export's manifest and tables) makes collisionless tables
    incremental."""
    compact = isinstance(model.sparse, OptEmbedEmbeddings)
    tables = compact_tables(model.sparse, out, dtype, _write_table) if compact else []
    for spec in [] if compact else model.sparse.specs:
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
            ids, live = collisionless_rows(transform, entry, out, previous)
            rows = weights[live]
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
    input_spec = {
        "dense": [d.name for d in f.dense],
        "sparse": model.sparse.feature_names,
        "feature_dims": model.sparse.feature_dims,
    }
    return tables, program, input_spec


def export(
    run: str | Path,
    out: str | Path,
    dtype: str | None = None,
    since: str | Path | None = None,
    newest: bool = False,
) -> dict[str, Any]:
    """Export the run's best checkpoint (its newest with `newest`, or the checkpoint
    folder `run` names) for serving; `since` makes it a delta over that earlier export."""
    cfg, model, progress = load_trained(run, newest)
    dtype = dtype or cfg.export.dtype
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    previous = None
    if since is not None:
        since = Path(since).resolve()
        previous = (json.loads((since / MANIFEST).read_text()), load_tables(since))
    if cfg.model.is_sequence:
        write = partial(_write_table, out, dtype=dtype)
        rows_of = partial(collisionless_rows, out=out, previous=previous)
        tables = sequence_tables(model, write, dtype, rows_of)
        program, input_spec = sequence_program(cfg, model)
    else:
        tables, program, input_spec = _pooled_export(cfg, model, out, dtype, previous)
    torch.export.save(program, out / DENSE_PROGRAM)
    manifest = {
        "format_version": FORMAT_VERSION if since is None else DELTA_FORMAT_VERSION,
        **({} if since is None else {"base": str(since)}),
        "features": cfg.features.model_dump(mode="json"),
        "input": input_spec,
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
    summary = {"out": str(out), "tables": len(tables), "bytes": sum(t["bytes"] for t in tables)}
    if isinstance(getattr(model, "sparse", None), OptEmbedEmbeddings):
        # optembed: the compact tables beside the tables they were cut from
        summary["id_bytes"] = sum(t["id_bytes"] for t in tables)
        summary["uncompacted_bytes"] = uncompacted_bytes(model.sparse, dtype)
    return summary
