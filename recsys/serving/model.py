"""Scoring a Parquet log from an export directory alone (`recsys predict`).

The export is checked before anything is read (`recsys.serving.manifest`: schema, paths
inside the folder, checksums), and each Parquet file's columns against its entry's dim and
dtype before its rows are; a broken rule is an `ExportError` naming the file and field.

Needs only torch, pyarrow and this package's contract code: tables come from Parquet,
the dense model from its `torch.export` program. Lookups are whole-batch tensor ops: one
`searchsorted` per feature and probe against the table's sorted IDs, one `embedding_bag`
to pool. Unknown IDs read the table's default embedding (the OOV row, or zeros for hashed
tables). Hashed lookups (multiplexed, quotient-remainder) first recompute each probe's row
from the raw IDs with the salts in the manifest and `recsys.hashing`, as training did.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from recsys.batch import BatchConverter
from recsys.contract import traffic_optional
from recsys.hashing import bucket
from recsys.logs import read_validated
from recsys.serving.format import rows_of, table_columns
from recsys.serving.manifest import Export, ExportError, read_export
from recsys.serving.schema import SequenceInput, TableEntry
from recsys.serving.sequence import SequenceServing


@dataclass
class ServedTable:
    ids: torch.Tensor  # sorted int64
    weights: torch.Tensor  # [rows + 1, dim]; the last row is the default embedding
    lookup: str  # "id": raw IDs; "modulo": raw ID mod num_rows; "hash": see `probes`
    num_rows: int
    pooling: str
    # "hash" lookups: feature -> one (salt, hash_size, divisor) per probe
    probes: dict[str, list[tuple[int, int, int]]]
    # The width the dense model reads; narrower rows (optembed's compact tables) are
    # padded with zeros, as the trained model's dimension mask zeroes those columns.
    input_dim: int

    def keys(self, feature: str, raw_ids: torch.Tensor) -> list[torch.Tensor]:
        """The table `id`s each of the feature's lookups reads (one for id/modulo)."""
        if self.lookup == "id":
            return [raw_ids]
        if self.lookup == "modulo":
            return [torch.remainder(raw_ids, self.num_rows)]
        return [
            bucket(raw_ids, salt, size)
            .div_(divisor, rounding_mode="floor")
            .remainder_(self.num_rows)
            for salt, size, divisor in self.probes[feature]
        ]

    def rows(self, keys: torch.Tensor) -> torch.Tensor:
        if self.ids.numel() == 0:
            return torch.full_like(keys, len(self.weights) - 1)
        pos = torch.searchsorted(self.ids, keys).clamp_(max=self.ids.numel() - 1)
        return torch.where(self.ids[pos] == keys, pos, len(self.weights) - 1)

    def pool(self, feature: str, jagged: JaggedTensor) -> torch.Tensor:
        """[batch, lookups * dim]: each lookup pooled over the bag, concatenated."""
        offsets = jagged.offsets()[:-1].long()
        pad = self.input_dim - self.weights.size(1)
        return torch.cat(
            [
                F.pad(
                    F.embedding_bag(self.rows(keys), self.weights, offsets, mode=self.pooling),
                    (0, pad),
                )
                for keys in self.keys(feature, jagged.values())
            ],
            dim=1,
        )


def _same_type(got: pa.DataType, want: pa.DataType) -> bool:
    """Type equality that ignores the name Parquet gives a list's item field."""
    if pa.types.is_fixed_size_list(want):
        return (
            pa.types.is_fixed_size_list(got)
            and got.list_size == want.list_size
            and got.value_type == want.value_type
        )
    return got == want


def _read_files(
    export: Export, files: list[str], columns: dict[str, pa.DataType], field: str
) -> pa.Table:
    """The Parquet files a table entry names, each checked against `columns` (names and
    types, from the entry's dim and dtype) before its rows are read."""
    parts = []
    for rel in files:
        where = f"{export.root}/{rel}"
        try:
            parquet = pq.ParquetFile(export.path(rel))
            schema = parquet.schema_arrow
        except (pa.ArrowException, OSError) as err:
            raise ExportError(f"{where}: not a readable Parquet file ({err})") from None
        if sorted(schema.names) != sorted(columns):
            raise ExportError(f"{where}: columns {schema.names}, but {field} needs {list(columns)}")
        for name, want in columns.items():
            got = schema.field(name).type
            if not _same_type(got, want):
                raise ExportError(f"{where}: {name}: {got}, but {field} needs {want}")
        try:
            data = parquet.read()
        except (pa.ArrowException, OSError) as err:
            raise ExportError(f"{where}: not a readable Parquet file ({err})") from None
        for name in columns:
            column = data.column(name)
            nulls = column.null_count
            if pa.types.is_fixed_size_list(column.type):
                nulls += column.combine_chunks().flatten().null_count
            if nulls:
                raise ExportError(f"{where}: {name}: {nulls} null cells; {field} serves none")
        parts.append(data)
    return pa.concat_tables(parts)


def _ids(export: Export, entry: TableEntry, data: pa.Table) -> np.ndarray:
    """The table's IDs, which a reader finds by binary search: sorted, unique, in range."""
    ids = np.array(data.column("id").to_numpy(), dtype=np.int64)
    field = f"tables.{entry.name}.files"
    if len(ids) > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise export.fail(field, "the files' ids are not sorted and unique")
    if entry.lookup != "id" and len(ids) and (ids[0] < 0 or ids[-1] >= (entry.num_rows or 0)):
        raise export.fail(field, f"ids outside [0, num_rows {entry.num_rows})")
    return ids


def _load_table(export: Export, entry: TableEntry) -> ServedTable:
    field = f"tables.{entry.name} (dim {entry.dim}, dtype {entry.dtype})"
    data = _read_files(export, entry.files, table_columns(entry.dtype, entry.dim), field)
    if data.num_rows != entry.rows:
        raise export.fail(
            f"tables.{entry.name}.rows", f"{entry.rows}, but its files hold {data.num_rows} rows"
        )
    ids = _ids(export, entry, data)
    rows = rows_of(data)
    default = np.zeros(entry.dim, np.float32)
    if entry.default_embedding is not None:
        default = np.asarray(entry.default_embedding, np.float32)
    probes = {
        feature: [(p.salt, p.hash_size, p.divisor) for p in chunks]
        for feature, chunks in (entry.probes or {}).items()
    }
    return ServedTable(
        ids=torch.from_numpy(ids),
        weights=torch.from_numpy(np.vstack([rows, default[None, :]])),
        lookup=entry.lookup,
        num_rows=entry.num_rows or len(rows),
        pooling=entry.pooling,
        probes=probes,
        input_dim=entry.input_dim or entry.dim,
    )


def _apply_delta(base: ServedTable, upserts: ServedTable, deleted: torch.Tensor) -> ServedTable:
    """The base table with the delta's rows upserted and its deleted IDs removed."""
    keep = ~torch.isin(base.ids, torch.cat([upserts.ids, deleted]))
    ids = torch.cat([base.ids[keep], upserts.ids])
    rows = torch.cat([base.weights[:-1][keep], upserts.weights[:-1]])
    order = torch.argsort(ids)
    return replace(upserts, ids=ids[order], weights=torch.cat([rows[order], upserts.weights[-1:]]))


def load_tables(source: str | Path | Export) -> dict[str, ServedTable]:
    """Every table of an export (a folder, or one already read) by name, checked first
    (`recsys.serving.manifest`); an incremental export is applied to its base."""
    return _tables(source if isinstance(source, Export) else read_export(source), ())


def _base_tables(export: Export, chain: tuple[Path, ...]) -> dict[str, ServedTable]:
    """The tables of the export a delta was written on (none for a full export), which
    must still be that export."""
    base = export.manifest.base
    if base is None:
        return {}
    if Path(base).resolve() in (*chain, export.real_root):
        raise export.fail("base", f"{base!r} is this export or one it is built on")
    try:
        previous = read_export(base)
    except ExportError as err:
        raise export.fail("base", str(err)) from None
    if previous.manifest_sha256 != export.manifest.base_sha256:
        raise export.fail(
            "base",
            f"the export at {base!r} is not the one this delta was written on (its "
            f"manifest's SHA-256 is {previous.manifest_sha256}, base_sha256 records "
            f"{export.manifest.base_sha256}); export the delta again with --since",
        )
    return _tables(previous, (*chain, export.real_root))


def _tables(export: Export, chain: tuple[Path, ...]) -> dict[str, ServedTable]:
    base = _base_tables(export, chain)
    tables = {}
    for entry in export.manifest.tables:
        table = _load_table(export, entry)
        if entry.delta:
            field = f"tables.{entry.name}"
            if entry.name not in base:
                raise export.fail(f"{field}.delta", f"table {entry.name!r} is not in its base")
            if base[entry.name].weights.shape[1] != table.weights.shape[1]:
                raise export.fail(f"{field}.dim", f"{entry.dim}, not its base table's dim")
            files = entry.deleted_files or []
            deleted = _read_files(export, files, {"id": pa.int64()}, f"{field}.deleted_files")
            ids = torch.from_numpy(np.array(deleted.column("id").to_numpy(), dtype=np.int64))
            table = _apply_delta(base[entry.name], table, ids)
        tables[entry.name] = table
    return tables


def _program(export: Export) -> torch.nn.Module:
    path = export.manifest.dense_program
    try:
        return torch.export.load(export.path(path)).module()
    except Exception as err:  # whatever the file holds, the message names it
        raise ExportError(
            f"{export.root}/{path}: not a torch.export program ({type(err).__name__}: {err})"
        ) from None


class PooledLookup:
    """The pooled embeddings of the input's sparse features, in its order, each feature's
    tables (a qr feature reads two) in manifest order: [batch, sum(feature_dims)]."""

    def __init__(self, export: Export, tables: dict[str, ServedTable]) -> None:
        self.order: list[str] = export.manifest.input.sparse
        self.feature_tables: dict[str, list[ServedTable]] = {}
        for entry in export.manifest.tables:
            if entry.kind is None:
                for feature in entry.features:
                    self.feature_tables.setdefault(feature, []).append(tables[entry.name])

    def __call__(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        per_feature = sparse.to_dict()
        pooled = [
            table.pool(name, per_feature[name])
            for name in self.order
            for table in self.feature_tables[name]
        ]
        return torch.cat(pooled, dim=1)


class ServingModel:
    """An exported model: pooled lookups in plain torch, then the exported dense program."""

    def __init__(self, root: str | Path) -> None:
        export = read_export(root)
        manifest = export.manifest
        self.manifest = manifest
        self.manifest_sha256 = export.manifest_sha256  # names exactly what was loaded
        self.features = manifest.features
        self.convert = BatchConverter(self.features)
        tables = _tables(export, ())
        program = _program(export)
        self.pooled = PooledLookup(export, tables)
        self.sequence: SequenceServing | None = None
        if isinstance(manifest.input, SequenceInput):
            pooled = self.pooled if manifest.input.sparse else None
            self.sequence = SequenceServing(manifest.input, tables, program, pooled)
        self.dense = program

    def predict_table(self, data: pa.Table) -> np.ndarray:
        """Click probabilities for the rows of a validated Arrow table (any number of rows
        from one: the program is in eval mode, BatchNorm reads its running statistics)."""
        batch = self.convert(data)
        if self.sequence is not None:
            return torch.sigmoid(self.sequence.logits(batch)).numpy()
        with torch.no_grad():
            logits = self.dense(batch.dense, self.pooled(batch.sparse))
        return torch.sigmoid(logits).numpy()

    def predict(self, path: str | Path, batch_size: int = 65_536) -> pa.Table:
        """`prob` for every row of a Parquet log, in file order, with `label` and `group`
        (the user, for GAUC) where the log has those columns: traffic needs only the
        columns the model reads (`recsys.contract.traffic_optional`)."""
        f = self.features
        passed = {"label": f.label, "group": f.user_id}
        parts = []
        for t in read_validated(path, f, batch_size, optional=traffic_optional(f)):
            columns = {"prob": self.predict_table(t)}
            columns.update({k: t.column(c) for k, c in passed.items() if c in t.column_names})
            parts.append(pa.table(columns))
        if not parts:
            raise ValueError(f"{path}: no rows to score")
        return pa.concat_tables(parts)
