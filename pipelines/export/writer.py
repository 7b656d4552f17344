"""`recsys export`: a trained run -> a directory a serving system loads without this code.

Tables are written row-sorted by `id` (vocabulary IDs for full tables, the live admitted
raw IDs for collisionless ones, row numbers for hashed ones), so a reader maps IDs with one
binary search; IDs without a row read the table's `default_embedding`; multiplexed and
quotient-remainder tables also write each feature's hash salts (see recsys.serving.format).
The dense architecture is a `torch.export` program with a dynamic batch dimension.

`since` makes an incremental export on top of an earlier one (Monolith's parameter sync):
collisionless tables, pooled or sequence, then hold only the rows trained after that
export plus the IDs that lost their rows since (pipelines.export.delta); the other tables
and the dense program are written whole. The base is checked as a reader checks it, and
the delta records its manifest's SHA-256, so it is never applied to another export.

Every export is written into a temporary sibling folder, the SHA-256 of each file into
its manifest, and renamed into place whole (`staged`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from pipelines.build import load_trained
from pipelines.export.delta import Previous, served_entry
from pipelines.export.pruned import compact_tables, uncompacted_bytes
from pipelines.export.sequence import sequence_program, sequence_tables
from recsys.serving.format import (
    DENSE_PROGRAM,
    DTYPES,
    FLOAT16_MAX,
    FORMAT_VERSION,
    HASH,
    MANIFEST,
    ROWS_PER_FILE,
    embedding_table,
    storage_error,
)
from recsys.serving.manifest import ExportError, read_export, sha256_file
from recsys.serving.model import load_tables
from tables.multiplexed import VirtualFeatureTransform
from tables.pooled import PooledEmbeddings, TableSpec


def _write_table(
    out: Path, name: str, ids: np.ndarray, rows: np.ndarray, dtype: str
) -> dict[str, Any]:
    """Store a table's rows in `dtype`: its manifest fields `files` and `storage_error`
    (the largest change storage made to a value). Rows that are not finite, or beyond
    float16's range in a float16 export (they would read as infinity), are refused."""
    finite = np.isfinite(rows)
    if not finite.all():
        raise ExportError(
            f"table {name!r}: {int((~finite).sum())} NaN or infinite values in its rows "
            "(training diverged); nothing was exported"
        )
    if dtype == "float16" and rows.size and np.abs(rows).max() > FLOAT16_MAX:
        beyond = int((np.abs(rows) > FLOAT16_MAX).sum())
        raise ExportError(
            f"table {name!r}: {beyond} values beyond float16's range ±{FLOAT16_MAX:g} "
            f"(largest {np.abs(rows).max():g}); export it as float32 or int8"
        )
    files = []
    folder = out / "tables" / name
    folder.mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, max(len(ids), 1), ROWS_PER_FILE)):
        path = folder / f"part-{part:05d}.parquet"
        stop = start + ROWS_PER_FILE
        pq.write_table(embedding_table(ids[start:stop], rows[start:stop], dtype), path)
        files.append(str(path.relative_to(out)))
    return {"files": files, "storage_error": storage_error(rows, dtype)}


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


def pooled_tables(
    sparse: PooledEmbeddings, out: Path, dtype: str, previous: Previous | None = None
) -> list[dict[str, Any]]:
    """Manifest entries of pooled tables (a CTR model's, or a sequence model's other
    sparse features), their rows written under `out`; `previous` (the base export's
    manifest and tables) makes collisionless tables incremental."""
    tables = []
    for spec in sparse.specs:
        weights = sparse.ebc.embedding_bags[spec.name].weight.detach().float()
        transform = sparse.transforms[spec.transform]
        entry: dict[str, Any] = {
            "name": spec.name,
            "variant": spec.variant,
            "features": list(spec.features),
            "dim": spec.dim,
            "pooling": spec.pooling,
            "dtype": dtype,
        }
        ids, rows = served_entry(transform, spec.name, weights, entry, previous, out)
        if entry["lookup"] == "hash":
            entry.update(_hash_lookup(spec, transform))
        entry["rows"] = len(ids)
        entry["bytes"] = int(rows.size * {"float32": 4, "float16": 2, "int8": 1}[dtype])
        entry.update(_write_table(out, spec.name, ids, rows, dtype))
        tables.append(entry)
    return tables


def _pooled_export(
    cfg: Any, model: torch.nn.Module, out: Path, dtype: str, previous: Previous | None = None
) -> tuple[list[dict[str, Any]], torch.export.ExportedProgram, dict[str, Any]]:
    """Pooled tables, the dense program over (dense, embeddings) and its input spec.

    An optembed model writes its compact tables instead (pipelines.export.pruned)."""
    if model.sparse.prunes_rows:
        tables = compact_tables(model.sparse, out, dtype, _write_table)
    else:
        tables = pooled_tables(model.sparse, out, dtype, previous)
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


def _is_export(folder: Path) -> bool:
    """Whether `folder` holds an export (of any version): the only non-empty folder an
    export may replace, so that a mistyped `--out` never deletes a run or a log."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and {"format_version", "tables"} <= manifest.keys()


def _check_target(target: Path) -> None:
    if target.is_symlink():
        raise ExportError(f"{target}: a symlink; name the export folder itself")
    if target.exists() and not target.is_dir():
        raise ExportError(f"{target}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not _is_export(target):
        raise ExportError(
            f"{target}: a folder that is neither empty nor an export; an export replaces "
            "only an earlier export or an empty folder"
        )


def _replace(stage: Path, target: Path) -> None:
    """Move the complete export at `stage` to `target`, an earlier export there aside
    first and removed after, so that `target` is at every moment one whole export."""
    _check_target(target)  # again: it may have changed while the export was written
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.rename(stage, target)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if old.exists():
        shutil.rmtree(old)
    os.rename(target, old)
    try:
        os.rename(stage, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old)


@contextmanager
def staged(target: Path) -> Iterator[Path]:
    """A sibling folder to write an export into (`.<name>.partial-<pid>`), renamed to
    `target` when the block completes and removed when it raises: a failed export leaves
    nothing that looks like one, and a reader never sees half of one."""
    stage = target.parent / f".{target.name}.partial-{os.getpid()}"
    if stage.exists():  # left by a killed export of an earlier process with this pid
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    try:
        yield stage
        _replace(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _checksums(folder: Path) -> dict[str, str]:
    """SHA-256 of every file written so far, by path relative to the export."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}


def export(
    run: str | Path,
    out: str | Path,
    dtype: str | None = None,
    since: str | Path | None = None,
    newest: bool = False,
) -> dict[str, Any]:
    """Export the run's best checkpoint (its newest with `newest`, or the checkpoint
    folder `run` names) for serving; `since` makes it a delta over that earlier export.

    Written into a temporary sibling folder and renamed to `out` once complete (an earlier
    export there is replaced), with the SHA-256 of every file in the manifest."""
    target = Path(os.path.abspath(out))
    _check_target(target)
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {DTYPES}")
    previous = base = None
    if since is not None:
        since = Path(since).resolve()
        if since == target.resolve():
            raise ExportError(f"{since}: --since names the export this one would replace")
        base = read_export(since)  # checked as a reader checks it, before it is built on
        previous = (base.manifest, load_tables(base))
    cfg, model, progress = load_trained(run, newest)
    dtype = dtype or cfg.export.dtype
    with staged(target) as stage:
        if cfg.model.is_sequence:
            write = partial(_write_table, stage, dtype=dtype)
            served = partial(served_entry, previous=previous, out=stage)
            tables = sequence_tables(model, write, dtype, served)
            if model.pooled is not None:
                tables += pooled_tables(model.pooled, stage, dtype, previous)
            program, input_spec = sequence_program(cfg, model)
        else:
            tables, program, input_spec = _pooled_export(cfg, model, stage, dtype, previous)
        torch.export.save(program, stage / DENSE_PROGRAM)
        base_fields = {}
        if base is not None:
            base_fields = {"base": str(since), "base_sha256": base.manifest_sha256}
        manifest = {
            "format_version": FORMAT_VERSION,
            **base_fields,
            "features": cfg.features.model_dump(mode="json"),
            "input": input_spec,
            "tables": tables,
            "dense_program": DENSE_PROGRAM,
            "sha256": _checksums(stage),
            "training": {
                "experiment": cfg.name,
                "model": cfg.model.name,
                "checkpoint": progress["checkpoint"],
                "step": progress["step"],
                "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        }
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2))
        read_export(stage)  # what a reader would refuse is never put in place
    summary = {
        "out": str(out),
        "tables": len(tables),
        "bytes": sum(t["bytes"] for t in tables),
        "storage_error": {t["name"]: t["storage_error"] for t in tables},
    }
    if getattr(getattr(model, "sparse", None), "prunes_rows", False):
        # optembed: the compact tables beside the tables they were cut from
        summary["id_bytes"] = sum(t["id_bytes"] for t in tables)
        summary["uncompacted_bytes"] = uncompacted_bytes(model.sparse, dtype)
    return summary
