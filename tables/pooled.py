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
Routing ones (`CollisionlessTransform`) ask the owners of the IDs for rows, by event time,
and add the table's default embedding for the IDs that have none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys.config import ExperimentConfig, TableConfig
from tables.collisionless.exchange import route_tables
from tables.collisionless.transform import CollisionlessTransform, map_options
from tables.initializers import RowInit
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
    table's own); a `qr` feature's two tables share one. `init` draws its first rows (None:
    torchrec's default; a collisionless table's rows start when given out, see its ID
    transform).
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
    init: RowInit | None = None

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
    table: TableConfig,
    name: str,
    features: tuple[str, ...],
    vocabularies: dict[str, np.ndarray],
    workers: int,
    seed: int,
) -> list[TableSpec]:
    """The physical tables behind one table name of a config entry."""
    common = {
        "variant": table.storage_variant,
        "dim": table.embedding_dim,
        "pooling": table.pooling,
        "sharding": table.sharding,
    }

    def spec(physical: str, rows: int, **keys: Any) -> TableSpec:
        init = RowInit.of(table.init, rows, seed, physical)
        return TableSpec(physical, features, num_rows=rows, init=init, **{**common, **keys})

    if table.storage_variant == "full":
        if name not in vocabularies:
            raise ValueError(f"table {name!r}: no vocabulary was built for it")
        return [spec(name, len(vocabularies[name]) + 1)]
    if table.storage_variant == "collisionless":
        rows = int(table.capacity) * workers  # type: ignore[arg-type]
        return [TableSpec(name, features, num_rows=rows, **{**common, "sharding": "row_wise"})]
    rows = int(table.num_embeddings)  # type: ignore[arg-type]
    if table.storage_variant == "hash":
        return [spec(name, rows)]
    if table.variant == "multiplexed":
        lookups = tuple(tuple(f"{f}@{j}" for j in range(table.probes_of(f))) for f in features)
        return [spec(name, rows, lookups=lookups)]
    # qr: one feature per name; the quotient table has V / m rows, the remainder table m.
    (feature,) = features
    size, remainder = quotient_remainder_sizes(rows)
    return [
        spec(f"{name}@{part}", n, lookups=((f"{feature}@{part}",),), transform=name)
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
            specs += _specs_of(
                table, name, tuple(features), vocabularies, cfg.train.workers, cfg.train.seed
            )
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
    table_of = {f: t for t in cfg.tables for f in t.features}
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
        elif spec.variant == "collisionless":
            table = table_of[spec.features[0]]
            transform = CollisionlessTransform(
                spec.name,
                spec.features,
                capacity=int(table.capacity),  # type: ignore[arg-type]
                num_shards=cfg.train.workers,
                dim=spec.dim,
                init=RowInit.of(table.init, spec.num_rows, cfg.train.seed, spec.name),
                **map_options(table),
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

    prunes_rows: ClassVar[bool] = False  # an export writes every row (see OptEmbed's)

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
        self.routing = {
            name for name, t in transforms.items() if isinstance(t, CollisionlessTransform)
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
                    init_fn=s.init,
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
        rows = []
        for key, part in zip(features.keys(), parts, strict=True):
            transform = self.transforms[self.feature_transform[key]]
            rows.append(transform(part))
            transform.count_unknown(key, rows[-1])
        return KeyedJaggedTensor(
            keys=features.keys(),
            values=torch.cat(rows) if rows else features.values(),
            lengths=features.lengths(),
            stride=features.stride(),
        )

    def remap(
        self, features: KeyedJaggedTensor, event_times: torch.Tensor | None = None
    ) -> KeyedJaggedTensor:
        """Raw IDs -> the collection's input: rows, keyed by lookup."""
        return self._route(features, event_times)[0]

    def _route(
        self, features: KeyedJaggedTensor, event_times: torch.Tensor | None
    ) -> tuple[KeyedJaggedTensor, dict[str, torch.Tensor]]:
        """`remap`, plus per feature of a routing transform the number of IDs per bag
        that have no row and read the table's default embedding.

        Consecutive keys served the same way (per-value, or by one virtual-feature or
        routing transform) are remapped together; the common case of one kind is a single
        pass. A routing transform runs once per batch (it inserts), so its keys must be
        adjacent.
        """
        keys = features.keys()
        kinds: list[str | None] = []  # per run: its virtual-feature / routing transform
        sizes: list[int] = []  # per run: its number of keys
        for key in keys:
            owner = self.feature_transform[key]
            kind = owner if owner in self.expanding | self.routing else None
            if kinds and kinds[-1] == kind:
                sizes[-1] += 1
            else:
                kinds.append(kind)
                sizes.append(1)
        routed = [k for k in kinds if k in self.routing]
        if len(routed) != len(set(routed)):
            raise ValueError(
                f"features of a collisionless table must be adjacent in features.sparse: "
                f"{sorted(k for k in routed if routed.count(k) > 1)}"
            )
        parts = [features] if len(kinds) == 1 else features.split(sizes)
        pending = [
            (self.transforms[k], p) for k, p in zip(kinds, parts, strict=True) if k in self.routing
        ]
        routed = iter(route_tables(pending, event_times) if pending else [])
        out, missing = [], {}
        for kind, part in zip(kinds, parts, strict=True):
            if kind is None:
                out.append(self._remap_values(part))
            elif kind in self.routing:
                rows, counts = next(routed)
                out.append(rows)
                missing.update(zip(part.keys(), counts.view(len(part.keys()), -1), strict=True))
            else:
                out.append(self.transforms[kind].expand(part))
        return (out[0] if len(out) == 1 else KeyedJaggedTensor.concat(out)), missing

    def sharding(self) -> dict[str, str]:
        """Every physical table -> its configured sharding choice."""
        return {s.name: s.sharding for s in self.specs}

    def forward(
        self, features: KeyedJaggedTensor, event_times: torch.Tensor | None = None
    ) -> KeyedTensor:
        """Pooled embeddings with keys in `feature_names` order, whatever the sharding.

        `event_times` (one per sample) drive collisionless tables' last-seen times and
        expiry. A sharded collection orders its output by shard; regrouping restores
        config order so the dense model always sees the same columns.
        """
        rows, missing = self._route(features, event_times)
        for name in self.routing:
            self.transforms[name].reset_new_rows(self.ebc)
        pooled = self.ebc(rows).to_dict()
        for name, counts in missing.items():
            transform = self.transforms[self.feature_transform[name]]
            pooled[name] = transform.add_default(pooled[name], counts)
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
