"""Collisionless storage for decoupled sequence tables: one ID map, two role tables.

A decoupled feature over `storage: collisionless` has the tables `<name>@att` and
`<name>@rep`, each `capacity * workers` rows, sharded row-wise like a pooled collisionless
table. One `CollisionlessTransform` per feature owns the ID map (ownership by hash bucket,
admission filter, expiry, eviction), so an ID has the same row in both tables, and a row
given to an ID is reset in both, weights from a hash of the ID (salted per table, so the
two tables start unrelated) and zero optimizer state. Each role table has its own default
embedding, read by IDs without a row; unlike a pooled bag, an unpooled lookup keeps one
vector per ID, so rowless IDs are dropped from the torchrec lookup and get their default
back in their place (`fill_defaults`).

Event times: a target's and every behaviour's ID is seen at its impression's timestamp.
The map's last-seen time means "last read by the model", which drives expiry: an item that
keeps appearing in fresh histories stays alive even if its behaviours are old, and the
expiry clock (the newest time seen) moves with the log's impressions, as for pooled tables.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from tables.collisionless.ownership import hash64
from tables.collisionless.storage import table_storage
from tables.collisionless.transform import CollisionlessTransform

_TABLE_SALT = 0x5EC0  # per-table salt of the initial rows (table k of a map: salt + k)


class SharedRowsTransform(CollisionlessTransform):
    """A collisionless ID map whose rows live in several tables (`tables`: name -> dim),
    each with its own default embedding (`defaults[name]`)."""

    def __init__(
        self,
        name: str,
        features: tuple[str, ...],
        tables: dict[str, int],
        capacity: int,
        num_shards: int,
        **options: Any,
    ) -> None:
        super().__init__(name, features, capacity, num_shards, max(tables.values()), **options)
        del self.default  # one per table instead
        self.table_dims = dict(tables)
        self.defaults = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(d)) for t, d in tables.items()}
        )
        self._storages: dict[str, tuple[nn.Module, Any]] = {}

    @property
    def storage_tables(self) -> tuple[str, ...]:
        return tuple(self.table_dims)

    def default_of(self, table: str) -> torch.Tensor:
        return self.defaults[table]

    @torch.no_grad()
    def reset_new_rows(self, collection_of: Callable[[str], nn.Module]) -> None:  # type: ignore[override]
        """Initial weights and zero optimizer state for the rows given out since the last
        call, in every table; `collection_of(table)` is the collection holding it."""
        fresh = self.take_fresh()
        if fresh is None:
            return
        rows, ids = fresh
        for k, (table, dim) in enumerate(self.table_dims.items()):
            collection = collection_of(table)
            cached = self._storages.get(table)
            if cached is None or cached[0] is not collection:
                cached = self._storages[table] = (collection, table_storage(collection, table))
            weight, states, first_row = cached[1]
            local = (rows - first_row).to(weight.device)
            salted = ids if k == 0 else hash64(ids, _TABLE_SALT + k)
            init = self.row_init.rows_of(salted, dim)
            weight.index_copy_(0, local, init.to(weight.device, weight.dtype))
            for state in states:
                state.index_fill_(0, local, 0)

    def resume(self, bucket_width: int, last_pass: int | None, steps: int) -> None:
        super().resume(bucket_width, last_pass, steps)
        self._storages = {}


def drop_rowless(rows: Tensor, lengths: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
    """A key's rows and bag lengths without the IDs that have no row (`kept` false)."""
    bags = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=kept.device),
        lengths.to(torch.int64),
        output_size=kept.numel(),
    )
    dropped = torch.zeros_like(lengths).index_add_(0, bags, (~kept).to(lengths.dtype))
    return rows[kept], lengths - dropped


def fill_defaults(found: Tensor, kept: Tensor, default: Tensor) -> Tensor:
    """[N, d] vectors: the looked-up rows `found` [kept.sum(), d] where `kept` [N], the
    default elsewhere. The default is always in the graph (zero gradient when unread), so
    data-parallel training never sees it as unused."""
    full = found.new_zeros(kept.shape[0], found.shape[1]).index_copy(
        0, kept.nonzero().squeeze(1), found
    )
    return torch.where(kept.unsqueeze(1), full, default.to(found.dtype).unsqueeze(0))
