"""Scoring a Parquet log from an export directory alone (`recsys predict`).

Needs only torch, pyarrow and this package's contract code: tables come from Parquet,
the dense model from its `torch.export` program. Lookups are whole-batch tensor ops: one
`searchsorted` per feature against the table's sorted IDs, one `embedding_bag` to pool.
Unknown IDs read the table's default embedding (the OOV row, or zeros for hashed tables).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from recsys.batch import BatchConverter
from recsys.config import FeaturesConfig
from recsys.export_format import FORMAT_VERSION, MANIFEST, rows_of
from recsys.logs import read_validated


@dataclass
class ServedTable:
    ids: torch.Tensor  # sorted int64
    weights: torch.Tensor  # [rows + 1, dim]; the last row is the default embedding
    lookup: str  # "id": raw IDs; "modulo": raw ID mod num_rows
    num_rows: int
    pooling: str

    def rows(self, raw_ids: torch.Tensor) -> torch.Tensor:
        keys = torch.remainder(raw_ids, self.num_rows) if self.lookup == "modulo" else raw_ids
        if self.ids.numel() == 0:
            return torch.full_like(keys, len(self.weights) - 1)
        pos = torch.searchsorted(self.ids, keys).clamp_(max=self.ids.numel() - 1)
        return torch.where(self.ids[pos] == keys, pos, len(self.weights) - 1)


def _load_table(root: Path, entry: dict) -> ServedTable:
    data = pa.concat_tables([pq.read_table(root / f) for f in entry["files"]])
    rows = rows_of(data)
    default = np.asarray(entry.get("default_embedding") or np.zeros(entry["dim"]), np.float32)
    return ServedTable(
        ids=torch.from_numpy(np.array(data.column("id").to_numpy(), dtype=np.int64)),
        weights=torch.from_numpy(np.vstack([rows, default[None, :]])),
        lookup=entry["lookup"],
        num_rows=entry.get("num_rows", len(rows)),
        pooling=entry["pooling"],
    )


class ServingModel:
    """An exported model: pooled lookups in plain torch, then the exported dense program."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        manifest_path = root / MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(f"{root}: no {MANIFEST}; is this an export directory?")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{manifest_path}: format_version {manifest.get('format_version')} "
                f"is not {FORMAT_VERSION}"
            )
        self.manifest = manifest
        self.features = FeaturesConfig.model_validate(manifest["features"])
        self.sparse_order: list[str] = manifest["input"]["sparse"]
        self.tables: dict[str, ServedTable] = {}
        self.feature_table: dict[str, str] = {}
        for entry in manifest["tables"]:
            self.tables[entry["name"]] = _load_table(root, entry)
            self.feature_table.update({f: entry["name"] for f in entry["features"]})
        self.dense = torch.export.load(root / manifest["dense_program"]).module()
        self.convert = BatchConverter(self.features)

    def predict_table(self, data: pa.Table) -> np.ndarray:
        """Click probabilities for the rows of a validated Arrow table."""
        batch = self.convert(data)
        per_feature = batch.sparse.to_dict()
        pooled = []
        for name in self.sparse_order:
            table = self.tables[self.feature_table[name]]
            jagged = per_feature[name]
            pooled.append(
                F.embedding_bag(
                    table.rows(jagged.values()),
                    table.weights,
                    jagged.offsets()[:-1].long(),
                    mode=table.pooling,
                    include_last_offset=False,
                )
            )
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
