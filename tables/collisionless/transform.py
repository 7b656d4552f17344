"""Collisionless tables (Monolith): the module that gives raw IDs their own rows of a
row-wise torchrec table, one `CollisionlessTransform` per ID map.

Layout. A table of `capacity` rows per shard and W shards (one per training rank) is one
torchrec table of W * capacity rows, sharded row-wise, so rank r's block is rows
[r * capacity, (r + 1) * capacity). Shard r owns the IDs whose bucket (`ownership`)
falls in rank r's bucket range and keeps their `IdMap` and `FrequencyFilter`; an ID it
admits gets a slot s of its map, that is global row r * capacity + s, inside its own block.

Training forward, per table: the owners of a batch's IDs (`exchange`) expire, filter, admit
and evict, and answer with global rows (-1 where an ID has no row); torchrec's row-wise input
dist then moves each row to its owner's block for the lookup. IDs without a row (filtered,
overflowed, unknown) are dropped from the lookup and read the table's default embedding, a
dense parameter, instead: they train the shared default, nothing of their own. Rows given
to IDs (new and recycled slots alike) are reset in the fbgemm TBE before the lookup:
weights from a hash of the ID, so an ID starts the same whatever the slot or world size,
and zero optimizer state.

Each row also keeps the training step that last touched it, so an incremental export can
write only the rows trained since the previous one (`touched_since`).

The maps are per-rank state, saved and restored one file per shard (`state`). Unsharded
(evaluation, export) the module holds every shard and routes locally, read-only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from tables.collisionless.admission import BucketSpan, FrequencyFilter
from tables.collisionless.idmap import IdMap, MapStats, Policy
from tables.collisionless.ownership import bucket_of, bucket_range, owner_of
from tables.collisionless.storage import table_storage
from tables.initializers import RowInit
from tables.transforms import IdTransform, ServedRows

if TYPE_CHECKING:
    from recsys.config import TableConfig

FILTER_DEPTH = 4
NO_TIME = torch.iinfo(torch.int64).min  # the newest event time of a batch without any


@dataclass
class TableCounters:
    """What a table did since the last report: `MapStats` plus rows freed by expiry."""

    map: MapStats = field(default_factory=MapStats)
    expired: int = 0

    def __iadd__(self, other: TableCounters) -> TableCounters:
        self.map += other.map
        self.expired += other.expired
        return self

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TableCounters:
        # Checkpoints from before the map lost its `grow` policy count `grown` (always 0).
        stats = {k: v for k, v in saved["map"].items() if k != "grown"}
        return cls(MapStats(**stats), saved["expired"])


@dataclass
class _Shard:
    """One rank's part of a table: the ID map of its buckets, their frequency filter and
    the training step that last touched each row (-1: never)."""

    idmap: IdMap
    filter: FrequencyFilter
    touched: torch.Tensor


def map_options(table: TableConfig) -> dict[str, Any]:
    """A collisionless table's (or storage's) map settings from config, as the keyword
    arguments of `CollisionlessTransform`."""
    return {
        "min_count": table.min_count,
        "ttl": table.ttl,
        "evict_every": table.evict_every,
        "policy": table.policy,
        "filter_width": table.filter_width,
        "buckets": table.buckets,
    }


class CollisionlessTransform(IdTransform):
    """Raw IDs of a table's features -> global rows, by the owners' ID maps.

    Args:
        name: the torchrec table it serves.
        features: the features that read the table (a shared table has several).
        capacity: rows per shard; num_shards: training ranks (the table has their product).
        min_count: sightings before an ID gets a row (count-min filter; 1 = admit all).
        ttl, evict_every: seconds of event time; rows unseen for `ttl` are freed by a pass
            each time the newest event time enters a new `evict_every` interval.
        policy: when a shard is full (`IdMap` policies evict_lru / evict_lfu).
        filter_width: count-min cells per row and shard (power of two); the filter keeps
            `filter_width * num_shards / buckets` cells per bucket and row (rounded up to a
            power of two), so its layout does not depend on the world size.
        buckets: ownership buckets, fixed for the life of the data.
        init: how a row given to an ID starts, a function of the ID (`RowInit.rows_of`);
            default torchrec's U(-sqrt(1/rows), sqrt(1/rows)) of the table's rows.
    """

    def __init__(
        self,
        name: str,
        features: tuple[str, ...],
        capacity: int,
        num_shards: int,
        dim: int,
        *,
        min_count: int = 1,
        ttl: int | None = None,
        evict_every: int = 3600,
        policy: Policy = "evict_lru",
        filter_width: int | None = None,
        buckets: int = 4096,
        init: RowInit | None = None,
    ) -> None:
        super().__init__()
        if policy not in ("evict_lru", "evict_lfu"):
            raise ValueError(f"table {name!r}: policy {policy!r}; use evict_lru or evict_lfu")
        self.name, self.features = name, tuple(features)
        self.capacity, self.num_shards, self.dim = capacity, num_shards, dim
        self.min_count, self.ttl, self.evict_every = min_count, ttl, evict_every
        self.policy, self.buckets = policy, buckets
        self.filter_width = filter_width or 1 << max(4, math.ceil(math.log2(2 * capacity)))
        per_bucket = self.filter_width * num_shards / buckets
        self.bucket_width = 1 << max(0, math.ceil(math.log2(per_bucket)))
        self.row_init = init or RowInit("uniform", math.sqrt(1.0 / (capacity * num_shards)))
        self.default = nn.Parameter(torch.zeros(dim))
        # Plain attributes, not submodules: per-rank state (see the module docstring).
        self.shards: dict[int, _Shard] = {s: self.new_shard(s) for s in range(num_shards)}
        self.rank: int | None = None
        self.group: dist.ProcessGroup | None = None
        self.last_pass: int | None = None  # index of the last expiry interval seen
        self.steps = 0  # training forwards so far, the same on every rank
        self.counters = TableCounters()
        self._fresh: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows, ids) to reset
        self._storage: tuple[nn.Module, Any] | None = None  # (collection, `table_storage`)

    def new_shard(self, shard: int) -> _Shard:
        span = BucketSpan(*bucket_range(shard, self.buckets, self.num_shards), self.buckets)
        admission = FrequencyFilter(
            self.min_count, width=self.bucket_width, depth=FILTER_DEPTH, span=span
        )
        return _Shard(
            IdMap(self.capacity, self.policy),
            admission,
            torch.full((self.capacity,), -1, dtype=torch.int64),
        )

    @property
    def num_rows(self) -> int:
        return self.capacity * self.num_shards

    @property
    def storage_tables(self) -> tuple[str, ...]:
        """The torchrec tables whose rows this map hands out (one; decoupled: two)."""
        return (self.name,)

    def bind(self, rank: int, group: dist.ProcessGroup) -> None:
        """Become rank `rank`'s part: keep only its shard, route IDs over `group`."""
        if group.size() != self.num_shards:
            raise ValueError(
                f"table {self.name!r} was built for {self.num_shards} workers, "
                f"the process group has {group.size()}"
            )
        self.rank, self.shards = rank, {rank: self.shards[rank]}
        self.group = group if group.size() > 1 else None  # one rank routes locally

    # ---- forward -----------------------------------------------------------------------

    def add_default(self, pooled: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
        """Pooled rows of one feature plus its bags' IDs without rows, each the default."""
        return pooled + missing.unsqueeze(1).to(pooled.dtype) * self.default

    def owner(self, ids: torch.Tensor) -> torch.Tensor:
        """The rank that owns each ID: the one whose bucket range holds the ID's bucket."""
        return owner_of(bucket_of(ids, self.buckets), self.buckets, self.num_shards)

    def rows_local(self, ids: torch.Tensor, times: torch.Tensor, now: int) -> torch.Tensor:
        """Global row per ID (-1: none) from the shards held here (no other ranks)."""
        self.advance_clock(now)
        if self.num_shards == 1:  # one shard owns every ID: no ownership hash to compute
            return self.serve(0, ids, times)
        owner = self.owner(ids)
        rows = torch.full_like(ids, -1)
        for s in self.shards:
            at = (owner == s).nonzero().squeeze(1)
            rows.index_copy_(0, at, self.serve(s, ids[at], times[at]))
        return rows

    def advance_clock(self, now: int) -> None:
        """Expiry passes, driven by the newest event time of all ranks (deterministic)."""
        if not self.training or self.ttl is None or now == NO_TIME:
            return
        interval = now // self.evict_every
        if self.last_pass is None:
            self.last_pass = interval
        elif interval > self.last_pass:
            self.last_pass = interval
            for shard in self.shards.values():
                self.counters.expired += shard.idmap.expire(now, self.ttl).slots.numel()

    def serve(self, shard: int, ids: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        """The owner's side: global rows of its IDs, admitting new ones when training."""
        part = self.shards[shard]
        if not ids.numel():
            return torch.empty(0, dtype=torch.int64)
        if self.training:
            admit = part.filter if self.min_count > 1 else None
            result = part.idmap.lookup_or_insert(ids, admit_mask=admit, now=times)
            self.counters.map += result.stats
            slots = result.slots
            part.touched.index_fill_(0, slots[slots >= 0], self.steps)
            if result.new_slots.numel():
                new_ids = part.idmap.row_ids.index_select(0, result.new_slots)
                self._fresh.append((result.new_slots + shard * self.capacity, new_ids))
        else:
            slots = part.idmap.lookup(ids)
        return torch.where(slots >= 0, slots + shard * self.capacity, -1)

    @torch.no_grad()
    def reset_new_rows(self, ebc: nn.Module) -> None:
        """Write initial weights and zero optimizer state into rows given out since the
        last call, in the table's storage (a sharded TBE or a plain `EmbeddingBag`)."""
        fresh = self.take_fresh()
        if fresh is None:
            return
        rows, ids = fresh
        if self._storage is None or self._storage[0] is not ebc:
            self._storage = (ebc, table_storage(ebc, self.name))
        weight, states, first_row = self._storage[1]
        local = (rows - first_row).to(weight.device)
        init = self.row_init.rows_of(ids, self.dim)
        weight.index_copy_(0, local, init.to(weight.device, weight.dtype))
        for state in states:
            state.index_fill_(0, local, 0)

    def take_fresh(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(global rows, IDs) given out since the last call, to be reset; None if none."""
        if not self._fresh:
            return None
        rows = torch.cat([r for r, _ in self._fresh])
        ids = torch.cat([i for _, i in self._fresh])
        self._fresh = []
        return rows, ids

    # ---- state, stats, export ----------------------------------------------------------

    dynamic_ids = True

    def served_rows(self, table: str, weights: torch.Tensor) -> ServedRows:
        """The live admitted IDs' rows; any other ID reads the default embedding."""
        ids, rows = self.live_rows()
        return ServedRows(ids, weights[rows], "id", rows, self.default_of(table).detach())

    def default_of(self, table: str) -> torch.Tensor:
        """The embedding of IDs without a row in `table`."""
        return self.default

    def live_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(IDs, global rows) of every live row held here, sorted by ID."""
        ids, rows = [], []
        for s, shard in self.shards.items():
            i, slots = shard.idmap.live_ids()
            ids.append(i)
            rows.append(slots + s * self.capacity)
        all_ids, all_rows = torch.cat(ids), torch.cat(rows)
        order = torch.argsort(all_ids)
        return all_ids[order], all_rows[order]

    def touched_since(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(IDs, global rows) of live rows trained in a step after `step`, sorted by ID."""
        ids, rows = self.live_rows()
        held = torch.stack([self.shards[s].touched for s in sorted(self.shards)])
        shard, slot = rows // self.capacity - min(self.shards), rows % self.capacity
        keep = held[shard, slot] > step
        return ids[keep], rows[keep]

    def take_counters(self) -> TableCounters:
        counters, self.counters = self.counters, TableCounters()
        return counters

    def memory(self) -> dict[str, int]:
        """Bytes held here: ID maps (keys, values, reverse map, times, counts) and filters."""
        return {
            "map_bytes": sum(
                sum(s.idmap.state_bytes().values()) + s.touched.numel() * 8
                for s in self.shards.values()
            ),
            "filter_bytes": sum(s.filter.state_bytes()["filter"] for s in self.shards.values()),
        }

    def resume(self, bucket_width: int, last_pass: int | None, steps: int) -> None:
        """Take a checkpoint's filter layout and clock; rows handed out (and storage found)
        before it are forgotten."""
        self.bucket_width = bucket_width
        self.last_pass, self.steps = last_pass, steps
        self._fresh, self._storage = [], None

    def extra_repr(self) -> str:
        return (
            f"table={self.name!r}, capacity={self.capacity} x {self.num_shards}, "
            f"min_count={self.min_count}, ttl={self.ttl}, policy={self.policy}"
        )


def collisionless_transforms(model: nn.Module) -> Iterator[CollisionlessTransform]:
    return (m for m in model.modules() if isinstance(m, CollisionlessTransform))


def bind_ownership(model: nn.Module, rank: int, group: dist.ProcessGroup) -> None:
    """Make every collisionless table of `model` rank `rank`'s part (before sharding)."""
    for transform in collisionless_transforms(model):
        transform.bind(rank, group)
