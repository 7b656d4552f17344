"""Pooled embedding tables: per-table ID transform, then torchrec `EmbeddingBagCollection`.

The transforms (vocabulary, hashing) run on the raw IDs of the local batch before the
collection, so when `DistributedModelParallel` shards the collection, its input
distribution moves rows that are already table rows, and storage, fused optimizers and
checkpoints are torchrec's and fbgemm's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys.config import ExperimentConfig
from tables.transforms import ModuloHash, VocabularyLookup


@dataclass(frozen=True)
class TableSpec:
    """One physical table: its rows, width and the pooled features that read it."""

    name: str
    features: tuple[str, ...]
    variant: str
    num_rows: int
    dim: int
    pooling: str
    sharding: str

    @property
    def bytes(self) -> int:
        """float32 rows; optimizer state is accounted by the optimizer."""
        return self.num_rows * self.dim * 4


def table_specs(cfg: ExperimentConfig, vocabularies: dict[str, np.ndarray]) -> list[TableSpec]:
    """Physical tables in config order; full tables take their size from the vocabulary."""
    pooled = {f.name for f in cfg.features.sparse}
    specs: list[TableSpec] = []
    for table in cfg.tables:
        by_name: dict[str, list[str]] = {}
        for feature, name in table.table_names().items():
            if feature in pooled:
                by_name.setdefault(name, []).append(feature)
        for name, features in by_name.items():
            if table.variant == "full":
                if name not in vocabularies:
                    raise ValueError(f"table {name!r}: no vocabulary was built for it")
                rows = len(vocabularies[name]) + 1
            else:
                rows = int(table.num_embeddings)  # type: ignore[arg-type]
            specs.append(
                TableSpec(
                    name,
                    tuple(features),
                    table.variant,
                    rows,
                    table.embedding_dim,
                    table.pooling,
                    table.sharding,
                )
            )
    return specs


def make_transform(spec: TableSpec, vocabulary: np.ndarray | None) -> nn.Module:
    if spec.variant == "full":
        return VocabularyLookup(torch.from_numpy(np.asarray(vocabulary, dtype=np.int64)))
    if spec.variant == "hash":
        return ModuloHash(spec.num_rows)
    raise ValueError(f"table {spec.name!r}: unknown variant {spec.variant!r}")


class PooledEmbeddings(nn.Module):
    """`KeyedJaggedTensor` of raw IDs -> `KeyedTensor` of pooled embeddings."""

    def __init__(
        self,
        specs: list[TableSpec],
        transforms: dict[str, nn.Module],
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.specs = specs
        self.transforms = nn.ModuleDict(transforms)
        self.feature_table = {f: s.name for s in specs for f in s.features}
        self.mean_features = [f for s in specs if s.pooling == "mean" for f in s.features]
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=s.name,
                    embedding_dim=s.dim,
                    num_embeddings=s.num_rows,
                    feature_names=list(s.features),
                    # Mean pooling is applied after the lookup (see `forward`): torchrec
                    # mis-scales other tables of a collection that mixes a row-wise
                    # mean-pooled table with table-wise ones.
                    pooling=PoolingType.SUM,
                )
                for s in specs
            ],
            device=device,
        )

    @property
    def feature_names(self) -> list[str]:
        """Features in the order of the output's columns."""
        return [f for s in self.specs for f in s.features]

    @property
    def feature_dims(self) -> list[int]:
        return [s.dim for s in self.specs for _ in s.features]

    def remap(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Raw IDs -> rows of each feature's table, one tensor op per feature."""
        parts = torch.split(features.values(), features.length_per_key())
        rows = [
            self.transforms[self.feature_table[key]](part)
            for key, part in zip(features.keys(), parts, strict=True)
        ]
        return KeyedJaggedTensor(
            keys=features.keys(),
            values=torch.cat(rows) if rows else features.values(),
            lengths=features.lengths(),
            stride=features.stride(),
        )

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings with keys in `feature_names` order, whatever the sharding.

        A sharded collection orders its output by shard; regrouping restores config order
        so the dense model always sees the same columns.
        """
        pooled = self.ebc(self.remap(features)).to_dict()
        if self.mean_features:
            lengths = features.to_dict()
            for name in self.mean_features:
                n = lengths[name].lengths().clamp(min=1).unsqueeze(1).to(pooled[name].dtype)
                pooled[name] = pooled[name] / n
        return KeyedTensor.from_tensor_list(
            self.feature_names, [pooled[f] for f in self.feature_names]
        )
