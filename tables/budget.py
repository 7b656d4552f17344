"""Table configs at a parameter budget: every variant re-tables the same features.

This is how the parameter-versus-quality frontier compares variants fairly (Unified
Embedding, Coleman et al. 2023): the budget is a number of embedding parameters, and
  * `full` is the upper bound, a vocabulary table per feature, whatever the budget;
  * `hash` gives each feature its own table, rows in proportion to its cardinality;
  * `qr` gives each feature the same rows as `hash`, over its quotient and remainder tables;
  * `multiplexed` gives each config entry one shared table with its share of the budget;
  * `collisionless` (Monolith) gives each feature an ID map with room for every ID of its
    vocabulary, so that its size follows the live IDs, not a budget; `collisionless_filtered`
    is the same behind a frequency filter (`min_count`, default 2);
  * `optembed` learns its own size: vocabulary tables whose rows are pruned and whose dims
    are searched (supernet, search, retrain, compact export).
The last three are one point each (`Variant.budgeted` is false). Per-feature settings (dim,
pooling, sharding, init) and multiplexed probes are kept from the config's entries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from recsys.config import TableConfig, table_config
from tables.multiplexed import hashed_table_rows, shared_table_rows

# Room an ID map keeps above the vocabulary's rows: IDs of the validation days that training
# admits are not in the vocabulary, and a map's owners split IDs by hash bucket unevenly.
CAPACITY_SLACK = 1.5
DEFAULT_MIN_COUNT = 2  # collisionless_filtered: Monolith's "seen twice" filter


@dataclass(frozen=True)
class Variant:
    """A sweep arm: its name and whether a budget sizes it (else one point per seed)."""

    name: str
    budgeted: bool


VARIANTS = {
    v.name: v
    for v in (
        Variant("full", budgeted=False),
        Variant("hash", budgeted=True),
        Variant("multiplexed", budgeted=True),
        Variant("qr", budgeted=True),
        Variant("collisionless", budgeted=False),
        Variant("collisionless_filtered", budgeted=False),
        Variant("optembed", budgeted=False),
    )
}


def full_parameters(tables: list[TableConfig], rows: Mapping[str, int]) -> int:
    """Parameters of the full per-feature tables: the budget's 100%."""
    return sum(rows[f] * t.embedding_dim for t in tables for f in t.features)


def _common(t: TableConfig) -> dict[str, Any]:
    return {"embedding_dim": t.embedding_dim, "pooling": t.pooling, "init": t.init}


def full_tables(tables: list[TableConfig], variant: str = "full") -> list[TableConfig]:
    """A vocabulary table per feature (named after it), the entries' min_count, sharding and
    init kept; `variant: optembed` keeps them as its full storage."""
    extra = {"storage": "full"} if variant == "optembed" else {}
    return [
        table_config(
            features=t.features,
            variant=variant,
            min_count=getattr(t, "min_count", 1),  # hashed entries count no IDs
            sharding=t.sharding,
            **_common(t),
            **extra,
        )
        for t in tables
    ]


def collisionless_tables(
    tables: list[TableConfig], rows: Mapping[str, int], workers: int, min_count: int = 1
) -> list[TableConfig]:
    """An ID map per feature with room for its vocabulary (`CAPACITY_SLACK` over it, split
    over `workers`), IDs admitted at their `min_count`-th sighting."""
    return [
        table_config(
            features=[f],
            variant="collisionless",
            capacity=max(64, int(rows[f] * CAPACITY_SLACK / workers) + 1),
            min_count=min_count,
            **_common(t),
        )
        for t in tables
        for f in t.features
    ]


def budget_tables(
    tables: list[TableConfig],
    variant: str,
    budget: int,
    rows: Mapping[str, int],
    workers: int = 1,
    min_count: int = DEFAULT_MIN_COUNT,
) -> list[TableConfig]:
    """`tables`' features as `variant` tables of at most `budget` parameters in all (a
    budget the variant does not take is ignored).

    `rows` is each feature's full-table rows (vocabulary + OOV), the cardinality by which
    the budget is split. `qr` needs two rows per feature, so a feature whose hashing share
    is one row costs one row more than the budget. `workers` and `min_count` size and filter
    the collisionless ID maps.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {list(VARIANTS)}")
    if variant in ("full", "optembed"):
        return full_tables(tables, variant)
    if variant == "collisionless":
        return collisionless_tables(tables, rows, workers)
    if variant == "collisionless_filtered":
        return collisionless_tables(tables, rows, workers, min_count)
    if variant == "multiplexed":
        total = full_parameters(tables, rows)
        return [
            table_config(
                name=f"multiplexed{i}",
                features=t.features,
                variant="multiplexed",
                num_embeddings=shared_table_rows(
                    budget * full_parameters([t], rows) // total, t.embedding_dim
                ),
                probes=getattr(t, "probes", None),
                sharding=t.sharding,
                **_common(t),
            )
            for i, t in enumerate(tables)
        ]
    dims = {f: t.embedding_dim for t in tables for f in t.features}
    split = hashed_table_rows(budget, {f: rows[f] for f in dims}, dims)
    least = 2 if variant == "qr" else 1
    return [
        table_config(
            features=[f],
            variant=variant,
            num_embeddings=max(split[f], least),
            sharding=t.sharding,
            **_common(t),
        )
        for t in tables
        for f in t.features
    ]
