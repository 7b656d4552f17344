"""The `tables:` section: one entry per group of features, its options those of its variant.

Each variant is its own model and `TableConfig` is their union, told apart by `variant`
(default `full`), so a key of another variant cannot be written down: it is refused with
the variants it belongs to. YAML stays flat (`variant: hash` next to `num_embeddings`).

Variants: `full` (a vocabulary row per ID), `hash` (the hashing trick), `multiplexed`
(Unified Embedding: all the group's features read one table called `name`, each with its
own hash functions, `probes` lookups per feature concatenated into a `probes * dim`
embedding), `qr` (the quotient-remainder trick: each feature reads two tables, `<table>@q`
and `<table>@r`, of `num_embeddings` rows together, concatenated to 2 * dim) and
`collisionless` (Monolith: every admitted raw ID owns a row through a dynamic ID map,
`capacity` rows per training worker, IDs sharded over workers by hash bucket, a frequency
filter `min_count`, expiry `ttl` and an eviction policy when full). `decoupled` (DARE,
sequence models' item features: `<table>@att` of `attention_dim` columns for attention and
`<table>@rep` of `embedding_dim` for representations) and `optembed` (learned row pruning
and searched dims, see `OptEmbedConfig`) keep their rows as a `storage` table, `full`,
`hash` or `collisionless`, which they read as that variant does.

Every variant takes `init`, how its rows start (`recsys.config.table_init`).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Discriminator, Field, Tag, TypeAdapter, field_validator, model_validator

from recsys.config.base import PositiveInt, Strict
from recsys.config.table_init import InitConfig, NormalInit, init_keys

Sharding = Literal[
    "auto", "table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel"
]
Storage = Literal["full", "hash", "collisionless"]

# What a variant's rows need to be found, in its "needs num_embeddings (...)" error.
_ROWS_MEANING = {
    "hash": "the number of buckets",
    "multiplexed": "the rows of the shared table",
    "qr": "the rows per feature over its two tables",
}


class _Table(Strict):
    """What every variant has: its features, their width, pooling and sharding."""

    variant: str
    name: str | None = None
    features: list[str]
    # false: each feature its own table, named after it; true: one table called `name`.
    shared: bool = False
    embedding_dim: PositiveInt = 64
    pooling: Literal["sum", "mean"] = "sum"
    sharding: Sharding = "auto"
    # How the rows start (see NormalInit); every table of the group, its ID map's new rows.
    init: InitConfig = Field(default_factory=NormalInit)

    one_table_per_group: ClassVar[bool] = False  # multiplexed: the group's one table

    @field_validator("init", mode="before")
    @classmethod
    def _init_name(cls, value: Any) -> Any:
        return init_keys(value)

    @model_validator(mode="before")
    @classmethod
    def _keys_of_other_variants(cls, value: Any) -> Any:
        """Refuse another variant's key by name; one left null is as good as absent."""
        if not isinstance(value, dict):
            return value
        variant = value.get("variant", "full")
        foreign = [k for k in value if k not in cls.model_fields and k in _KEY_OWNERS]
        for key in foreign:
            given = value[key]
            if given is None:
                continue
            if key == "storage":
                shown = f"storage {given!r}" if given == "collisionless" else "storage"
                raise ValueError(f"{shown} is only for variants {_STORED}, not {variant!r}")
            if key in COLLISIONLESS_KEYS:
                raise ValueError(
                    f"{key} is only for variant 'collisionless' or storage 'collisionless'"
                )
            owners = _KEY_OWNERS[key]
            which = f"variant {owners[0]!r}" if len(owners) == 1 else f"variants {owners}"
            raise ValueError(f"{key} is only for {which}, not {variant!r}")
        return {k: v for k, v in value.items() if k not in foreign}

    @model_validator(mode="after")
    def _grouping(self) -> _Table:
        if not self.features:
            raise ValueError("a table needs at least one feature")
        if self.shared and not self.name:
            raise ValueError("shared: true needs a table name")
        grouped = self.shared or self.one_table_per_group
        if self.name and len(self.features) > 1 and not grouped:
            raise ValueError(
                "name is only for shared tables or single-feature tables; "
                "unshared tables are named after their features"
            )
        return self

    @property
    def storage_variant(self) -> str:
        """How the rows are stored and found (the variant itself, or its `storage`)."""
        return self.variant

    @property
    def uses_vocabulary(self) -> bool:
        """Whether its IDs go through a vocabulary built from the training log."""
        return self.storage_variant == "full"

    def table_names(self) -> dict[str, str]:
        """Feature name -> table name for the features of this group.

        A `qr` feature's two tables are `<name>@q` and `<name>@r` of the name given here.
        """
        if self.shared or self.one_table_per_group:
            return {f: self.name for f in self.features}  # type: ignore[misc]
        if self.name:
            return {self.features[0]: self.name}
        return {f: f for f in self.features}

    def probes_of(self, feature: str) -> int:
        """Lookups `feature` makes into its table (more than 1 only when multiplexed)."""
        return 1

    def _needs_rows(self, num_embeddings: int | None) -> None:
        if self.storage_variant in _ROWS_MEANING and num_embeddings is None:
            stored = f" with storage {self.storage_variant!r}" if self.variant in _STORED else ""
            raise ValueError(
                f"variant {self.variant!r}{stored} needs num_embeddings "
                f"({_ROWS_MEANING[self.storage_variant]})"
            )


class _MappedIds(_Table):
    """The ID map's options, for `collisionless` tables and `collisionless` storage."""

    num_embeddings: PositiveInt | None = None  # refused with an ID map: capacity sizes it
    # rows per training worker (the table has capacity * train.workers rows).
    capacity: PositiveInt | None = None
    # An ID gets a row at its min_count-th sighting (count-min filter) and reads the table's
    # default embedding until then; for vocabulary storage, rarer IDs share the OOV row.
    min_count: PositiveInt = 1
    # Rows unseen for `ttl` seconds of event time (the log's timestamp column) are freed,
    # checked every `evict_every` seconds of event time; None never expires.
    ttl: PositiveInt | None = None
    evict_every: PositiveInt = 3600
    # When no row is free, evict the least recently / least often seen rows. (A sharded
    # torchrec table has a fixed number of rows per worker: to grow, resume with a larger
    # capacity, and live rows move exactly.)
    policy: Literal["evict_lru", "evict_lfu"] = "evict_lru"

    @field_validator("policy", mode="before")
    @classmethod
    def _fixed_rows(cls, policy: Any) -> Any:
        if policy in ("grow", "fallback"):
            raise ValueError(
                f"cannot use policy {policy!r}: a sharded torchrec table has a fixed "
                "number of rows per worker and serving reads unknown IDs as the default "
                "embedding; use evict_lru or evict_lfu, and to grow, resume with a larger "
                "capacity (live rows move exactly)"
            )
        return policy

    # Count-min filter cells per row of its 4 and worker (a power of two; default the
    # smallest >= 2 * capacity), spread over the worker's buckets so that a checkpoint
    # restores onto any number of workers; only used when min_count > 1.
    filter_width: PositiveInt | None = None
    # Hash buckets that own IDs; each worker owns a contiguous range of them.
    buckets: PositiveInt = 4096

    def _check_map(self, kind: str) -> None:
        if self.capacity is None:
            raise ValueError(f"{kind} needs capacity (rows per worker)")
        if self.num_embeddings is not None:
            raise ValueError(
                f"{kind} sizes its table by capacity (rows per worker), not num_embeddings"
            )
        if self.sharding not in ("auto", "row_wise"):
            raise ValueError(
                f"{kind} is sharded row-wise by ID ownership; "
                f"sharding {self.sharding!r} is not possible (use auto or row_wise)"
            )
        width = self.filter_width
        if width is not None and width & (width - 1):
            raise ValueError(f"filter_width must be a power of two, got {width}")


COLLISIONLESS_KEYS = ("capacity", "ttl", "evict_every", "policy", "filter_width", "buckets")


class FullTable(_Table):
    variant: Literal["full"] = "full"
    num_embeddings: PositiveInt | None = None  # an optional cap on vocabulary rows
    min_count: PositiveInt = 1  # IDs seen fewer times in the training logs read the OOV row


class HashTable(_Table):
    variant: Literal["hash"]
    num_embeddings: PositiveInt | None = None  # buckets per table

    @model_validator(mode="after")
    def _rows(self) -> HashTable:
        self._needs_rows(self.num_embeddings)
        return self


class QRTable(_Table):
    variant: Literal["qr"]
    num_embeddings: PositiveInt | None = None  # rows per feature over its two tables

    @model_validator(mode="after")
    def _rows(self) -> QRTable:
        if self.shared:
            raise ValueError("variant 'qr' gives every feature its own tables: not shared")
        self._needs_rows(self.num_embeddings)
        if self.num_embeddings is not None and self.num_embeddings < 2:
            raise ValueError("variant 'qr' needs num_embeddings >= 2 (one row per table)")
        return self


class MultiplexedTable(_Table):
    variant: Literal["multiplexed"]
    num_embeddings: PositiveInt | None = None  # rows of the shared table
    # Lookups per feature, one number for all or per feature (others get 1).
    probes: PositiveInt | dict[str, PositiveInt] | None = None

    one_table_per_group: ClassVar[bool] = True

    @model_validator(mode="after")
    def _rows(self) -> MultiplexedTable:
        self._needs_rows(self.num_embeddings)
        if not self.name:
            raise ValueError("variant 'multiplexed' needs a name for its shared table")
        if isinstance(self.probes, dict):
            unknown = sorted(self.probes.keys() - set(self.features))
            if unknown:
                raise ValueError(f"probes names features not in this table: {unknown}")
        return self

    def probes_of(self, feature: str) -> int:
        if isinstance(self.probes, dict):
            return self.probes.get(feature, 1)
        return self.probes or 1


class CollisionlessTable(_MappedIds):
    variant: Literal["collisionless"]

    @model_validator(mode="after")
    def _map(self) -> CollisionlessTable:
        self._check_map("variant 'collisionless'")
        return self


class _Stored(_MappedIds):
    """A variant layered over a `storage` table, whose keys it takes (`num_embeddings`:
    buckets of hash storage, an optional cap on full storage's vocabulary rows)."""

    storage: Storage | None = None

    @property
    def storage_variant(self) -> str:
        return self.storage or "full"

    def _check_storage(self) -> None:
        kind = f"variant {self.variant!r} with storage {self.storage_variant!r}"
        if self.storage_variant == "collisionless":
            self._check_map(kind)
            return
        self._needs_rows(self.num_embeddings)
        for key in COLLISIONLESS_KEYS:  # a saved config holds them at their defaults
            if getattr(self, key) == _MappedIds.model_fields[key].default:
                continue
            raise ValueError(
                f"{key} is only for variant 'collisionless' or storage 'collisionless'"
            )


class DecoupledTable(_Stored):
    variant: Literal["decoupled"]
    attention_dim: PositiveInt | None = None  # width of the attention table (embedding_dim)

    @model_validator(mode="after")
    def _storage(self) -> DecoupledTable:
        self._check_storage()
        return self


class OptEmbedTable(_Stored):
    variant: Literal["optembed"]

    @model_validator(mode="after")
    def _storage(self) -> OptEmbedTable:
        if self.storage is None:
            raise ValueError("variant 'optembed' needs storage: full, hash or collisionless")
        if self.storage == "collisionless" and self.pooling != "sum":
            # Pruned and unadmitted IDs read the default outside the masked pooling,
            # which would have to count them for a mean.
            raise ValueError(
                "variant 'optembed' with storage 'collisionless' pools by sum; "
                f"pooling {self.pooling!r} is not supported"
            )
        self._check_storage()
        return self


_VARIANTS: tuple[type[_Table], ...] = (
    FullTable,
    HashTable,
    MultiplexedTable,
    QRTable,
    CollisionlessTable,
    DecoupledTable,
    OptEmbedTable,
)
VARIANTS = tuple(v.model_fields["variant"].annotation.__args__[0] for v in _VARIANTS)  # type: ignore[union-attr]
_STORED = ["decoupled", "optembed"]
_KEY_OWNERS: dict[str, list[str]] = {}
for _variant, _cls in zip(VARIANTS, _VARIANTS, strict=True):
    for _key in _cls.model_fields:
        _KEY_OWNERS.setdefault(_key, []).append(_variant)


def _variant_of(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("variant", "full"))
    return str(getattr(value, "variant", "full"))


TableConfig = Annotated[
    Annotated[FullTable, Tag("full")]
    | Annotated[HashTable, Tag("hash")]
    | Annotated[QRTable, Tag("qr")]
    | Annotated[MultiplexedTable, Tag("multiplexed")]
    | Annotated[CollisionlessTable, Tag("collisionless")]
    | Annotated[DecoupledTable, Tag("decoupled")]
    | Annotated[OptEmbedTable, Tag("optembed")],
    Discriminator(_variant_of),
    Field(description="a group of features with one table variant"),
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(TableConfig)


def table_config(**keys: Any) -> Any:
    """The table entry of `variant` (default `full`) with these keys, validated as YAML's."""
    return _ADAPTER.validate_python(keys)
