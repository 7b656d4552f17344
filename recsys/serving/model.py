"""Scoring a Parquet log from an export directory alone (`recsys predict`).

Needs only torch, pyarrow and this package's contract code: tables come from Parquet,
the dense model from its `torch.export` program. Lookups are whole-batch tensor ops: one
`searchsorted` per feature and probe against the table's sorted IDs, one `embedding_bag`
to pool. Unknown IDs read the table's default embedding (the OOV row, or zeros for hashed
tables). Hashed lookups (multiplexed, quotient-remainder) first recompute each probe's row
from the raw IDs with the salts in the manifest and `recsys.hashing`, as training did.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import JaggedTensor

from recsys.batch import BatchConverter
from recsys.config import FeaturesConfig
from recsys.hashing import bucket
from recsys.logs import read_validated
from recsys.serving.format import HASH, MANIFEST, READABLE_VERSIONS, rows_of
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


def _load_table(root: Path, entry: dict) -> ServedTable:
    if entry["lookup"] == "hash" and entry.get("hash") != HASH:
        raise ValueError(f"table {entry['name']!r}: unknown hash {entry.get('hash')!r}")
    data = pa.concat_tables([pq.read_table(root / f) for f in entry["files"]])
    rows = rows_of(data)
    default = np.asarray(entry.get("default_embedding") or np.zeros(entry["dim"]), np.float32)
    probes = {
        feature: [(p["salt"], p["hash_size"], p["divisor"]) for p in chunks]
        for feature, chunks in entry.get("probes", {}).items()
    }
    return ServedTable(
        ids=torch.from_numpy(np.array(data.column("id").to_numpy(), dtype=np.int64)),
        weights=torch.from_numpy(np.vstack([rows, default[None, :]])),
        lookup=entry["lookup"],
        num_rows=entry.get("num_rows", len(rows)),
        pooling=entry["pooling"],
        probes=probes,
        input_dim=entry.get("input_dim", entry["dim"]),
    )


def _read_manifest(root: Path) -> dict:
    manifest_path = root / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(f"{root}: no {MANIFEST}; is this an export directory?")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{manifest_path}: format_version {manifest.get('format_version')} "
            f"is not one of {READABLE_VERSIONS}"
        )
    return manifest


def _apply_delta(base: ServedTable, upserts: ServedTable, deleted: torch.Tensor) -> ServedTable:
    """The base table with the delta's rows upserted and its deleted IDs removed."""
    keep = ~torch.isin(base.ids, torch.cat([upserts.ids, deleted]))
    ids = torch.cat([base.ids[keep], upserts.ids])
    rows = torch.cat([base.weights[:-1][keep], upserts.weights[:-1]])
    order = torch.argsort(ids)
    return replace(upserts, ids=ids[order], weights=torch.cat([rows[order], upserts.weights[-1:]]))


def load_tables(root: Path) -> dict[str, ServedTable]:
    """Every table of an export by name; an incremental export is applied to its base."""
    manifest = _read_manifest(root)
    base = load_tables(Path(manifest["base"])) if "base" in manifest else {}
    tables = {}
    for entry in manifest["tables"]:
        table = _load_table(root, entry)
        if entry.get("delta"):
            if entry["name"] not in base:
                raise ValueError(f"{root}: delta table {entry['name']!r} is not in its base")
            files = entry["deleted_files"]
            deleted = pa.concat_tables([pq.read_table(root / f) for f in files]).column("id")
            ids = torch.from_numpy(np.array(deleted.to_numpy(), dtype=np.int64))
            table = _apply_delta(base[entry["name"]], table, ids)
        tables[entry["name"]] = table
    return tables


class ServingModel:
    """An exported model: pooled lookups in plain torch, then the exported dense program."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        manifest = _read_manifest(root)
        self.manifest = manifest
        self.features = FeaturesConfig.model_validate(manifest["features"])
        self.convert = BatchConverter(self.features)
        self.sequence: SequenceServing | None = None
        if manifest["input"].get("kind") == "sequence":
            self.sequence = SequenceServing(root, manifest, load_tables(root))
            return
        self.sparse_order: list[str] = manifest["input"]["sparse"]
        # A feature reads its tables in manifest order (a qr feature reads two).
        self.feature_tables: dict[str, list[ServedTable]] = {}
        tables = load_tables(root)
        for entry in manifest["tables"]:
            table = tables[entry["name"]]
            for feature in entry["features"]:
                self.feature_tables.setdefault(feature, []).append(table)
        self.dense = torch.export.load(root / manifest["dense_program"]).module()

    def predict_table(self, data: pa.Table) -> np.ndarray:
        """Click probabilities for the rows of a validated Arrow table."""
        batch = self.convert(data)
        if self.sequence is not None:
            return torch.sigmoid(self.sequence.logits(batch)).numpy()
        per_feature = batch.sparse.to_dict()
        pooled = [
            table.pool(name, per_feature[name])
            for name in self.sparse_order
            for table in self.feature_tables[name]
        ]
        with torch.no_grad():
            logits = self.dense(batch.dense, torch.cat(pooled, dim=1))
        return torch.sigmoid(logits).numpy()

    def predict(self, path: str | Path, batch_size: int = 65_536) -> pa.Table:
        """(prob, label) for every row of a Parquet log, in file order."""
        parts = [
            pa.table({"prob": self.predict_table(t), "label": t.column(self.features.label)})
            for t in read_validated(path, self.features, batch_size)
        ]
        if not parts:
            raise ValueError(f"{path}: no rows to score")
        return pa.concat_tables(parts)
