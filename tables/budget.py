"""Table configs at a parameter budget: every variant re-tables the same features.

This is how the parameter-versus-quality frontier compares variants fairly (Unified
Embedding, Coleman et al. 2023): the budget is a number of embedding parameters, and
  * `full` is the upper bound, a vocabulary table per feature, whatever the budget;
  * `hash` gives each feature its own table, rows in proportion to its cardinality;
  * `qr` gives each feature the same rows as `hash`, over its quotient and remainder tables;
  * `multiplexed` gives each config entry one shared table with its share of the budget.
Per-feature settings (dim, pooling, sharding) and multiplexed probes are kept from the
config's entries.
"""

from __future__ import annotations

from collections.abc import Mapping

from recsys.config import TableConfig, table_config
from tables.multiplexed import hashed_table_rows, shared_table_rows

VARIANTS = ("full", "hash", "multiplexed", "qr")


def full_parameters(tables: list[TableConfig], rows: Mapping[str, int]) -> int:
    """Parameters of the full per-feature tables: the budget's 100%."""
    return sum(rows[f] * t.embedding_dim for t in tables for f in t.features)


def full_tables(tables: list[TableConfig]) -> list[TableConfig]:
    """A vocabulary table per feature (named after it), the entries' min_count and init
    kept."""
    return [
        table_config(
            features=t.features,
            variant="full",
            embedding_dim=t.embedding_dim,
            min_count=getattr(t, "min_count", 1),  # hashed entries count no IDs
            pooling=t.pooling,
            sharding=t.sharding,
            init=t.init,
        )
        for t in tables
    ]


def budget_tables(
    tables: list[TableConfig], variant: str, budget: int, rows: Mapping[str, int]
) -> list[TableConfig]:
    """`tables`' features as `variant` tables of at most `budget` parameters in all.

    `rows` is each feature's full-table rows (vocabulary + OOV), the cardinality by which
    the budget is split. `qr` needs two rows per feature, so a feature whose hashing share
    is one row costs one row more than the budget.
    """
    if variant == "full":
        return full_tables(tables)
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {list(VARIANTS)}")
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
                embedding_dim=t.embedding_dim,
                probes=getattr(t, "probes", None),
                pooling=t.pooling,
                sharding=t.sharding,
                init=t.init,
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
            embedding_dim=t.embedding_dim,
            pooling=t.pooling,
            sharding=t.sharding,
            init=t.init,
        )
        for t in tables
        for f in t.features
    ]
