"""Pooled embedding tables: per-table ID transform, then torchrec `EmbeddingBagCollection`.

The transforms (vocabulary, hashing, multiplexing) run on the raw IDs of the local batch
before the collection, so when `DistributedModelParallel` shards the collection, its input
distribution moves rows that are already table rows, and storage, fused optimizers and
checkpoints are torchrec's and fbgemm's.

Transforms come in two kinds. Per-value ones (`VocabularyLookup`, `ModuloHash`) map a
feature's IDs to rows of its table and keep the feature as the lookup key. Virtual-feature
ones (`MultiplexedTransform`, `QuotientRemainderTransform`) turn a feature into several
lookups (`f@0`, `f@1`, ... or `f@q`, `f@r`), pooled by the collection like any feature and
concatenated back into the feature's embedding, which is then that many chunks wide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys.config import ExperimentConfig, TableConfig
from tables.multiplexed import (
    MultiplexedTransform,
    QuotientRemainderTransform,
    VirtualFeatureTransform,
    quotient_remainder_sizes,
)
from tables.transforms import ModuloHash, VocabularyLookup


@dataclass(frozen=True)
class TableSpec:
    """One physical (torchrec) table: its rows, width and the pooled features that read it.

    `lookups[i]` are the collection's features through which `features[i]` reads the table:
    the feature itself by default, or its virtual features, whose pooled rows are
    concatenated. `transform` names the ID transform serving the table (by default the
    table's own); a `qr` feature's two tables share one.
    """

    name: str
    features: tuple[str, ...]
    variant: str
    num_rows: int
    dim: int
    pooling: str
    sharding: str
    lookups: tuple[tuple[str, ...], ...] = ()
    transform: str = ""

    def __post_init__(self) -> None:
        if not self.lookups:
            object.__setattr__(self, "lookups", tuple((f,) for f in self.features))
        if not self.transform:
            object.__setattr__(self, "transform", self.name)

    @property
    def parameters(self) -> int:
        return self.num_rows * self.dim

    @property
    def bytes(self) -> int:
        """float32 rows; optimizer state is accounted by the optimizer."""
        return self.parameters * 4


def _specs_of(
    table: TableConfig, name: str, features: tuple[str, ...], vocabularies: dict[str, np.ndarray]
) -> list[TableSpec]:
    """The physical tables behind one table name of a config entry."""
    common = {
        "variant": table.storage_variant,
        "dim": table.embedding_dim,
        "pooling": table.pooling,
        "sharding": table.sharding,
    }
    if table.storage_variant == "full":
        if name not in vocabularies:
            raise ValueError(f"table {name!r}: no vocabulary was built for it")
        return [TableSpec(name, features, num_rows=len(vocabularies[name]) + 1, **common)]
    rows = int(table.num_embeddings)  # type: ignore[arg-type]
    if table.storage_variant == "hash":
        return [TableSpec(name, features, num_rows=rows, **common)]
    if table.variant == "multiplexed":
        lookups = tuple(tuple(f"{f}@{j}" for j in range(table.probes_of(f))) for f in features)
        return [TableSpec(name, features, num_rows=rows, lookups=lookups, **common)]
    # qr: one feature per name; the quotient table has V / m rows, the remainder table m.
    (feature,) = features
    size, remainder = quotient_remainder_sizes(rows)
    return [
        TableSpec(
            f"{name}@{part}",
            features,
            num_rows=n,
            lookups=((f"{feature}@{part}",),),
            transform=name,
            **common,
        )
        for part, n in (("q", size // remainder), ("r", remainder))
    ]


def table_specs(
    cfg: ExperimentConfig,
    vocabularies: dict[str, np.ndarray],
    exclude: frozenset[str] = frozenset(),
) -> list[TableSpec]:
    """Physical tables in config order; full tables take their size from the vocabulary.

    `exclude`: sparse features read elsewhere (a sequence model's targets)."""
    pooled = {f.name for f in cfg.features.sparse} - exclude
    specs: list[TableSpec] = []
    for table in cfg.tables:
        by_name: dict[str, list[str]] = {}
        for feature, name in table.table_names().items():
            if feature in pooled:
                by_name.setdefault(name, []).append(feature)
        for name, features in by_name.items():
            specs += _specs_of(table, name, tuple(features), vocabularies)
    return specs


def make_transform(spec: TableSpec, vocabulary: np.ndarray | None) -> nn.Module:
    """The per-value transform of a `full` or `hash` table."""
    if spec.variant == "full":
        return VocabularyLookup(torch.from_numpy(np.asarray(vocabulary, dtype=np.int64)))
    if spec.variant == "hash":
        return ModuloHash(spec.num_rows)
    raise ValueError(f"table {spec.name!r}: variant {spec.variant!r} has no per-value transform")


def make_transforms(
    cfg: ExperimentConfig, specs: list[TableSpec], vocabularies: dict[str, np.ndarray]
) -> dict[str, nn.Module]:
    """Every table's ID transform, keyed by `TableSpec.transform`.

    Hash salts derive from a feature's position in `features.sparse`; they are buffers, so
    a checkpoint keeps the rows a model was trained with even if that list changes later.
    """
    index = {f.name: i for i, f in enumerate(cfg.features.sparse)}
    transforms: dict[str, nn.Module] = {}
    for spec in specs:
        if spec.transform in transforms:
            continue
        indices = [index[f] for f in spec.features]
        if spec.variant == "multiplexed":
            probes = [len(keys) for keys in spec.lookups]
            transform: nn.Module = MultiplexedTransform(
                spec.features, probes, indices, spec.num_rows
            )
        elif spec.variant == "qr":
            quotient, remainder = [s for s in specs if s.transform == spec.transform]
            transform = QuotientRemainderTransform(
                spec.features,
                indices,
                hash_sizes=[quotient.num_rows * remainder.num_rows],
                remainder_rows=[remainder.num_rows],
            )
        else:
            transform = make_transform(spec, vocabularies.get(spec.name))
        transforms[spec.transform] = transform
    return transforms


class PooledEmbeddings(nn.Module):
    """`KeyedJaggedTensor` of raw IDs -> `KeyedTensor` of pooled embeddings.

    `feature_names` lists the output's features in config order, `feature_dims` their
    widths: the table's dim, times the number of lookups for virtual-feature variants.
    """

    def __init__(
        self,
        specs: list[TableSpec],
        transforms: dict[str, nn.Module],
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.specs = specs
        self.transforms = nn.ModuleDict(transforms)
        self.feature_transform = {f: s.transform for s in specs for f in s.features}
        self.expanding = {
            name for name, t in transforms.items() if isinstance(t, VirtualFeatureTransform)
        }
        widths: dict[str, int] = {}
        for s in specs:
            for feature, keys in zip(s.features, s.lookups, strict=True):
                widths[feature] = widths.get(feature, 0) + len(keys) * s.dim
        self.feature_names = list(widths)
        self.feature_dims = list(widths.values())
        self.mean_features = list(
            dict.fromkeys(f for s in specs if s.pooling == "mean" for f in s.features)
        )
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=s.name,
                    embedding_dim=s.dim,
                    num_embeddings=s.num_rows,
                    feature_names=[key for keys in s.lookups for key in keys],
                    # Mean pooling is applied after the lookup (see `forward`): torchrec
                    # mis-scales other tables of a collection that mixes a row-wise
                    # mean-pooled table with table-wise ones.
                    pooling=PoolingType.SUM,
                )
                for s in specs
            ],
            device=device,
        )

    def _remap_values(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Per-value transforms: raw IDs -> rows, keys kept, one tensor op per feature."""
        parts = torch.split(features.values(), features.length_per_key())
        rows = [
            self.transforms[self.feature_transform[key]](part)
            for key, part in zip(features.keys(), parts, strict=True)
        ]
        return KeyedJaggedTensor(
            keys=features.keys(),
            values=torch.cat(rows) if rows else features.values(),
            lengths=features.lengths(),
            stride=features.stride(),
        )

    def remap(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Raw IDs -> the collection's input: rows, keyed by lookup.

        Consecutive keys served the same way (per-value, or by one virtual-feature
        transform) are remapped together; the common case of one kind is a single pass.
        """
        keys = features.keys()
        kinds: list[str | None] = []  # per run: its virtual-feature transform, or None
        sizes: list[int] = []  # per run: its number of keys
        for key in keys:
            owner = self.feature_transform[key]
            kind = owner if owner in self.expanding else None
            if kinds and kinds[-1] == kind:
                sizes[-1] += 1
            else:
                kinds.append(kind)
                sizes.append(1)
        parts = [features] if len(kinds) == 1 else features.split(sizes)
        out = [
            self._remap_values(part) if kind is None else self.transforms[kind].expand(part)
            for kind, part in zip(kinds, parts, strict=True)
        ]
        return out[0] if len(out) == 1 else KeyedJaggedTensor.concat(out)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings with keys in `feature_names` order, whatever the sharding.

        A sharded collection orders its output by shard; regrouping restores config order
        so the dense model always sees the same columns.
        """
        pooled = self.ebc(self.remap(features)).to_dict()
        for name in self.expanding:
            pooled.update(self.transforms[name].combine(pooled))
        if self.mean_features:
            lengths = features.to_dict()
            for name in self.mean_features:
                n = lengths[name].lengths().clamp(min=1).unsqueeze(1).to(pooled[name].dtype)
                pooled[name] = pooled[name] / n
        return KeyedTensor.from_tensor_list(
            self.feature_names, [pooled[f] for f in self.feature_names]
        )
