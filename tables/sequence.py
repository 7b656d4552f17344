"""Sequence tables: behaviour histories and their target items, looked up unpooled.

A sequence model reads, per impression, the target's vector and one vector per behaviour
of the user's history, each the concatenation of its fields' embeddings: item, category
(the two `features.sequences` columns, looked up in their target feature's table) and
time position (the reverse position in the history, 0 for the target; its own table). The
histories stay jagged all the way: the IDs of a batch go to torchrec `EmbeddingCollection`s
as one `KeyedJaggedTensor` (target keys of length 1, history keys of the history lengths)
and come back as [N, d] values, never padded to the longest history.

Storage is torchrec's (DMP shards these tables like the pooled ones, fused optimizers and
checkpoints included); one collection per embedding dim, as torchrec wants one width each.

Variants: a `full` or `hash` target table (one table serving attention and representation;
the history reads the target's table) or a `decoupled` one (DARE): two tables `<name>@att`
(attention_dim wide) and `<name>@rep` (embedding_dim), both keyed by the same row IDs from
one ID transform; the item's decoupled-ness also splits the time-position table. The output
always carries an attention and a representation set; for coupled tables they are the
same tensors, so the model reading them never knows the variant. A decoupled table may
also keep its rows `collisionless` (see `tables.collisionless.sequence`): its IDs then go
to one ID map with the batch's event times, and IDs without a row read each role table's
default embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torchrec import EmbeddingCollection, EmbeddingConfig
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from recsys.config import ExperimentConfig, TableConfig
from tables.collisionless.exchange import global_rows
from tables.collisionless.sequence import SharedRowsTransform, drop_rowless, fill_defaults
from tables.collisionless.transform import map_options
from tables.initializers import RowInit
from tables.transforms import ModuloHash, VocabularyLookup

ATTENTION, REPRESENTATION, BOTH = "att", "rep", "both"
TIME = "time"  # the time-position field


@dataclass(frozen=True)
class Field:
    """One part of a vector: its target and history lookup keys and the table it reads.

    `table` is the config table name (the time field: `<item table>@time`); `transform`
    names the ID transform of its raw IDs (None for positions)."""

    name: str
    target_key: str
    history_key: str
    table: str
    transform: str | None
    decoupled: bool


@dataclass(frozen=True)
class SequenceTableSpec:
    """One physical table of a sequence collection and the lookup keys that read it."""

    name: str
    variant: str  # full | hash | decoupled | position
    role: str  # att | rep | both
    num_rows: int
    dim: int
    sharding: str
    keys: tuple[str, ...]
    init: RowInit | None = None  # None: torchrec's default; collisionless: see its transform

    @property
    def bytes(self) -> int:
        """float32 rows; optimizer state is accounted by the optimizer."""
        return self.num_rows * self.dim * 4


@dataclass
class SequenceLookup:
    """Looked-up embeddings of a batch: the attention and representation sets (target
    [B, d], history [N, d], fields item | category | time) and history offsets [B + 1].
    Coupled tables give the same tensors in both sets."""

    attention_target: Tensor
    attention_history: Tensor
    representation_target: Tensor
    representation_history: Tensor
    offsets: Tensor


def _role_key(key: str, role: str) -> str:
    return key if role == BOTH else f"{key}@{role}"


def _roles(decoupled: bool) -> tuple[str, ...]:
    return (ATTENTION, REPRESENTATION) if decoupled else (BOTH,)


class SequenceEmbeddings(nn.Module):
    """(sparse targets, history KJTs) of raw IDs -> `SequenceLookup`.

    `fields` are item, category, time in that order; `dims[role]` their widths per set.
    """

    def __init__(
        self,
        fields: list[Field],
        specs: list[SequenceTableSpec],
        transforms: dict[str, nn.Module],
        time_positions: int,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.fields = fields
        self.specs = specs
        self.transforms = nn.ModuleDict(transforms)
        self.time_positions = time_positions
        by_key = {key: spec for spec in specs for key in spec.keys}
        self.dims = {
            role: [by_key[self._key(f, role, target=True)].dim for f in fields]
            for role in (ATTENTION, REPRESENTATION)
        }
        by_dim: dict[int, list[SequenceTableSpec]] = {}
        for spec in specs:
            by_dim.setdefault(spec.dim, []).append(spec)
        self.collections = nn.ModuleDict(
            {
                f"d{dim}": EmbeddingCollection(
                    tables=[
                        EmbeddingConfig(
                            name=s.name,
                            embedding_dim=s.dim,
                            num_embeddings=s.num_rows,
                            feature_names=list(s.keys),
                            init_fn=s.init,
                        )
                        for s in group
                    ],
                    device=device,
                )
                for dim, group in by_dim.items()
            }
        )
        self.collection_keys = {
            f"d{dim}": [key for s in group for key in s.keys] for dim, group in by_dim.items()
        }
        self._collection_of_table = {s.name: f"d{s.dim}" for s in specs}
        # collisionless fields: lookup key -> (its ID map, the role table it reads)
        self.routed_keys = {
            self._key(f, role, target=target): (f.transform, _role_key(f.table, role))
            for f in fields
            if f.transform is not None and isinstance(transforms[f.transform], SharedRowsTransform)
            for role in _roles(f.decoupled)
            for target in (True, False)
        }

    def collection_of(self, table: str) -> nn.Module:
        """The collection holding a physical table (sharded or not)."""
        return self.collections[self._collection_of_table[table]]

    def _key(self, field: Field, role: str, *, target: bool) -> str:
        """The lookup key of a field's target or history in the set `role`."""
        key = field.target_key if target else field.history_key
        return _role_key(key, role) if field.decoupled else key

    def rows(
        self,
        sparse: KeyedJaggedTensor,
        sequences: KeyedJaggedTensor,
        event_times: Tensor | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """Table rows of every lookup key (-1: a collisionless ID without a row), the
        lengths of every key, and history offsets. `event_times` [B] (the impressions'
        timestamps) are the times collisionless tables see the target and history IDs at."""
        targets, histories = sparse.to_dict(), sequences.to_dict()
        lengths = histories[self.fields[0].history_key].lengths().to(torch.int64)
        offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
        batch = lengths.shape[0]
        ones = torch.ones(batch, dtype=lengths.dtype, device=lengths.device)
        values: dict[str, Tensor] = {}
        key_lengths: dict[str, Tensor] = {}
        found = self._route(targets, histories, lengths, event_times)
        for field in self.fields:
            if field.transform is None:
                target = torch.zeros(batch, dtype=torch.int64, device=lengths.device)
                history = reverse_positions(offsets).clamp(max=self.time_positions - 1)
            elif field.transform in found:
                target, history = found[field.transform]
            else:
                transform = self.transforms[field.transform]
                target = transform(targets[field.target_key].values())
                history = transform(histories[field.history_key].values())
                for key, rows in ((field.target_key, target), (field.history_key, history)):
                    transform.count_unknown(key, rows)
            for role in _roles(field.decoupled):
                values[_role_key(field.target_key, role)] = target
                values[_role_key(field.history_key, role)] = history
                key_lengths[_role_key(field.target_key, role)] = ones
                key_lengths[_role_key(field.history_key, role)] = lengths
        return values, key_lengths, offsets

    def _route(
        self,
        targets: dict[str, JaggedTensor],
        histories: dict[str, JaggedTensor],
        lengths: Tensor,
        event_times: Tensor | None,
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """Collisionless fields' (target, history) global rows, all by one routing (one
        exchange between ranks); every ID is seen at its impression's event time."""
        fields = [
            f
            for f in self.fields
            if f.transform is not None
            and isinstance(self.transforms[f.transform], SharedRowsTransform)
        ]
        if not fields:
            return {}
        device = lengths.device
        batch = lengths.shape[0]
        times = event_times if event_times is not None else torch.zeros(batch, dtype=torch.int64)
        times = times.to("cpu", torch.int64)
        cpu_lengths = lengths.to("cpu")
        per_id = torch.cat([times, torch.repeat_interleave(times, cpu_lengths)])
        transforms: list[SharedRowsTransform] = []
        ids = []
        for f in fields:
            transform = self.transforms[f.transform]
            transform.steps += int(transform.training)
            transforms.append(transform)
            target = targets[f.target_key].values()
            ids.append(
                torch.cat([target, histories[f.history_key].values()]).to("cpu", torch.int64)
            )
        empty = event_times is None or not event_times.numel()
        now = torch.iinfo(torch.int64).min if empty else int(event_times.max())  # type: ignore[union-attr]
        rows = global_rows(transforms, ids, [per_id] * len(fields), now)  # type: ignore[arg-type]
        return {
            f.transform: tuple(r.to(device).split([batch, len(r) - batch]))  # type: ignore[misc]
            for f, r in zip(fields, rows, strict=True)
        }

    def forward(
        self,
        sparse: KeyedJaggedTensor,
        sequences: KeyedJaggedTensor,
        event_times: Tensor | None = None,
    ) -> SequenceLookup:
        values, lengths, offsets = self.rows(sparse, sequences, event_times)
        kept = {key: values[key] >= 0 for key in self.routed_keys}
        for key, mask in kept.items():  # rowless IDs leave the lookup, read the default
            values[key], lengths[key] = drop_rowless(values[key], lengths[key], mask)
        for name in dict.fromkeys(name for name, _ in self.routed_keys.values()):
            self.transforms[name].reset_new_rows(self.collection_of)
        looked_up: dict[str, JaggedTensor] = {}
        for name, collection in self.collections.items():
            keys = self.collection_keys[name]
            features = KeyedJaggedTensor(
                keys=keys,
                values=torch.cat([values[k] for k in keys]),
                lengths=torch.cat([lengths[k] for k in keys]),
            )
            looked_up.update(collection(features))
        for key, mask in kept.items():
            name, table = self.routed_keys[key]
            default = self.transforms[name].defaults[table]
            found = fill_defaults(looked_up[key].values(), mask, default)
            looked_up[key] = JaggedTensor(values=found, lengths=lengths[key])

        built: dict[tuple[str, ...], Tensor] = {}

        def vectors(role: str, target: bool) -> Tensor:
            """A set's vectors; coupled fields give both sets the very same tensor."""
            keys = tuple(self._key(f, role, target=target) for f in self.fields)
            if keys not in built:
                built[keys] = torch.cat([looked_up[k].values() for k in keys], dim=1)
            return built[keys]

        return SequenceLookup(
            attention_target=vectors(ATTENTION, True),
            attention_history=vectors(ATTENTION, False),
            representation_target=vectors(REPRESENTATION, True),
            representation_history=vectors(REPRESENTATION, False),
            offsets=offsets,
        )

    def table_of(self, field: Field, role: str) -> SequenceTableSpec:
        """The table serving `field` in the set `role` (att or rep)."""
        key = self._key(field, role, target=True)
        return next(spec for spec in self.specs if key in spec.keys)

    def sharding(self) -> dict[str, str]:
        return {s.name: s.sharding for s in self.specs}


def reverse_positions(offsets: Tensor) -> Tensor:
    """[N] reverse position of every behaviour: 1 for each user's most recent, counting back."""
    lengths = offsets[1:] - offsets[:-1]
    total = int(offsets[-1])
    ends = torch.repeat_interleave(offsets[1:], lengths, output_size=total)
    return ends - torch.arange(total, device=offsets.device)


# --------------------------------------------------------------------------- from config


def _table_of(cfg: ExperimentConfig, feature: str) -> tuple[TableConfig, str]:
    for table in cfg.tables:
        names = table.table_names()
        if feature in names:
            return table, names[feature]
    raise ValueError(f"sequence target {feature!r} has no table")


def _transform(
    cfg: ExperimentConfig,
    table: TableConfig,
    name: str,
    keys: list[str],
    vocabularies: dict[str, np.ndarray],
) -> nn.Module:
    if table.storage_variant == "collisionless":
        dims = {f"{name}@{ATTENTION}": table.attention_dim or table.embedding_dim}
        dims[f"{name}@{REPRESENTATION}"] = table.embedding_dim
        capacity = int(table.capacity)  # type: ignore[arg-type]
        return SharedRowsTransform(
            name,
            tuple(keys),
            dims,
            capacity=capacity,
            num_shards=cfg.train.workers,
            init=RowInit.of(table.init, capacity * cfg.train.workers, cfg.train.seed, name),
            **map_options(table),
        )
    if table.uses_vocabulary:
        if name not in vocabularies:
            raise ValueError(f"table {name!r}: no vocabulary was built for it")
        return VocabularyLookup(torch.from_numpy(np.asarray(vocabularies[name], np.int64)))
    return ModuloHash(int(table.num_embeddings))  # type: ignore[arg-type]


def build_sequence_embeddings(
    cfg: ExperimentConfig,
    vocabularies: dict[str, np.ndarray],
    device: torch.device | None = None,
) -> SequenceEmbeddings:
    """The sequence tables of a sequence-model experiment, as its config declares them.

    Fields: the two `features.sequences` (item, category) through their targets' tables,
    then time positions in a table named after the item's, as wide as it and decoupled
    with it.
    """
    fields: list[Field] = []
    tables: dict[str, tuple[TableConfig, list[str]]] = {}  # config name -> (table, keys)
    for seq in cfg.features.sequences:
        table, name = _table_of(cfg, seq.target)
        decoupled = table.variant == "decoupled"
        fields.append(Field(seq.target, seq.target, seq.name, name, name, decoupled))
        tables.setdefault(name, (table, []))[1].extend([seq.target, seq.name])
    item_table, item_name = tables[fields[0].table][0], fields[0].table
    time_name = f"{item_name}@{TIME}"
    time_keys = [f"{TIME}@target", f"{TIME}@history"]
    fields.append(Field(TIME, *time_keys, time_name, None, fields[0].decoupled))

    specs: list[SequenceTableSpec] = []
    transforms: dict[str, nn.Module] = {}

    def add(name: str, table: TableConfig, rows: int, keys: list[str], variant: str) -> None:
        decoupled = table.variant == "decoupled"
        # collisionless rows are owned by ID buckets: rank r's block holds its IDs' rows
        owned = variant != "position" and table.storage_variant == "collisionless"
        sharding = "row_wise" if owned else table.sharding
        for role in _roles(decoupled):
            dim = table.embedding_dim
            if role == ATTENTION:
                dim = table.attention_dim or table.embedding_dim
            physical = _role_key(name, role)
            specs.append(
                SequenceTableSpec(
                    name=physical,
                    variant=variant,
                    role=role,
                    num_rows=rows,
                    dim=dim,
                    sharding=sharding,
                    keys=tuple(_role_key(k, role) for k in keys),
                    init=None if owned else RowInit.of(table.init, rows, cfg.train.seed, physical),
                )
            )

    for name, (table, keys) in tables.items():
        transform = _transform(cfg, table, name, keys, vocabularies)
        transforms[name] = transform
        rows = int(transform.num_rows)
        add(name, table, rows, keys, table.variant)
    time_table = item_table.model_copy(update={"sharding": "auto"})
    add(time_name, time_table, cfg.model.time_positions, time_keys, "position")
    return SequenceEmbeddings(fields, specs, transforms, cfg.model.time_positions, device)
