"""The export format shared by `recsys export` (writer) and `recsys.serving.model` (reader).

A directory with `manifest.json`, Parquet tables of `id: int64` and
`embedding: fixed_size_list<float32 | float16 | int8>` (int8 rows carry `scale` and `bias`:
x = (q + 128) * scale + bias), and the dense model as a `torch.export` program.

Each table entry's `lookup` says how a raw ID finds its `id`: `"id"` (the raw ID itself),
`"modulo"` (raw ID mod `num_rows`) or, since version 2, `"hash"`: the entry's `probes` map
each feature to a list of {salt, hash_size, divisor}, and probe p reads
id = (`recsys.hashing.bucket`(raw ID, salt, hash_size) // divisor) mod `num_rows`.
A feature's embedding is the concatenation, in manifest table order, of its pooled
lookups (one per probe), each `dim` wide.

An incremental export (since version 3) names the export it updates in `base`, with the
SHA-256 of that export's manifest in `base_sha256` (since version 4); its tables marked
`delta` hold only the rows trained since that export (upserts) and list in `deleted_files`
the IDs that lost their rows (evicted or expired): they read the default embedding again.
Its other tables, and the dense program, are complete.

Version 4 records the SHA-256 of every file in `sha256` (path -> hex digest) and is the
only version read: older manifests have no checksums, so they are refused with a request
to re-export. Its schema and the checks a loader runs are in `recsys.serving.manifest`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

# 2 added the "hash" lookup, 3 incremental exports, 4 checksums (full and incremental alike)
FORMAT_VERSION = 4
OLD_VERSIONS = (1, 2, 3)  # readable once; refused now with "re-export"
DTYPES = ("float32", "float16", "int8")  # storage dtypes of the `embedding` column
HASH = "splitmix64"  # `hash` entries name the function, so that a reader can refuse another
MANIFEST = "manifest.json"
DENSE_PROGRAM = "dense.pt2"
ROWS_PER_FILE = 1_000_000


def quantize_int8(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row asymmetric 8-bit quantization: (codes, scale, bias)."""
    low = rows.min(axis=1)
    span = rows.max(axis=1) - low
    scale = np.where(span > 0, span / 255.0, 1.0).astype(np.float32)
    codes = np.rint((rows - low[:, None]) / scale[:, None]) - 128
    return codes.clip(-128, 127).astype(np.int8), scale, low.astype(np.float32)


FLOAT16_MAX = float(np.finfo(np.float16).max)


def storage_error(rows: np.ndarray, dtype: str) -> float:
    """The largest absolute change that storing `rows` in `dtype` makes to a value
    (0 for float32): what serving reads differs from the trained rows by at most this."""
    if dtype == "float32" or rows.size == 0:
        return 0.0
    if dtype == "float16":
        stored = rows.astype(np.float16).astype(np.float32)
    else:
        stored = dequantize_int8(*quantize_int8(rows))
    return float(np.abs(stored - rows).max())


def dequantize_int8(codes: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return (codes.astype(np.float32) + 128.0) * scale[:, None] + bias[:, None]


def embedding_table(ids: np.ndarray, rows: np.ndarray, dtype: str) -> pa.Table:
    """Arrow table of (id, embedding[, scale, bias]) in the export's storage dtype."""
    dim = rows.shape[1]
    columns: dict[str, pa.Array] = {"id": pa.array(ids, pa.int64())}
    if dtype == "int8":
        codes, scale, bias = quantize_int8(rows)
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(codes.ravel()), dim)
        columns["scale"] = pa.array(scale)
        columns["bias"] = pa.array(bias)
    else:
        flat = rows.astype(np.float16 if dtype == "float16" else np.float32).ravel()
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(flat), dim)
    return pa.table(columns)


def rows_of(table: pa.Table) -> np.ndarray:
    """float32 rows [n, dim] back from an exported Parquet table (any storage dtype)."""
    embedding = table.column("embedding").combine_chunks()
    dim = embedding.type.list_size
    flat = embedding.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    if "scale" in table.column_names:
        return dequantize_int8(
            flat, table.column("scale").to_numpy(), table.column("bias").to_numpy()
        )
    return flat.astype(np.float32)


def table_columns(dtype: str, dim: int) -> dict[str, pa.DataType]:
    """The columns, and their types, of a table file of this dtype and dim: what a reader
    checks a file against before it reads any row."""
    value = {"float32": pa.float32(), "float16": pa.float16(), "int8": pa.int8()}[dtype]
    columns = {"id": pa.int64(), "embedding": pa.list_(value, dim)}
    if dtype == "int8":
        columns.update(scale=pa.float32(), bias=pa.float32())
    return columns
