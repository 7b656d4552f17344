"""Collisionless ID map: raw int64 ID -> embedding row, one map per table per rank.

A cuckoo hash table (as Monolith's parameter servers use) maps each admitted ID to its own
row slot. Rows are a separate array of `capacity` slots, so the hash array can stay sparse
while the embedding table stays dense. Every ID lives in one of `kernels.CHOICES` (3) hash slots, so
a lookup is at most three gathers for a whole batch, with no probe chains to follow: this is
what makes pure torch ops fast here, since each extra round of a loop costs a fixed set of
ops however few IDs are left in it. Inserts displace occupants to another of their slots,
in vectorized rounds over the new IDs only.

Any int64 is a valid ID (INT64_MIN and -1 included), so emptiness is never encoded in the
key: `vals` holds the row slot of each hash slot, EMPTY (-1) when free. A lookup reads
`vals` where the key matches, so a stale key in a freed slot reads as absent.

When no row is free the policy decides: `evict_lru` / `evict_lfu` free the least recently /
least frequently seen rows not used by the current batch; new IDs that still find no row
overflow (they get none and read the default embedding). Every outcome is counted in
`MapStats`.

The per-ID loops of every batch (probe, insert of new IDs, last-seen/count stamp) and the
choice of rows to evict are in `kernels`: native where built, else torch ops.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Literal, NamedTuple

import torch
from torch import nn

from tables.collisionless import hugepages, kernels
from tables.collisionless.kernels import EMPTY, NATIVE

Policy = Literal["evict_lru", "evict_lfu"]
POLICIES: tuple[str, ...] = ("evict_lru", "evict_lfu")
AdmitMask = torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None

MAP_SEED = 0x51AB
REBUILDS_PER_SIZE = 4
_I64 = torch.iinfo(torch.int64)


@dataclass
class MapStats:
    """Outcomes of one or more calls; `hits + new_lookups + filtered + overflowed == lookups`.

    Occurrence counts (`lookups`, `hits`, `new_lookups`, `filtered`, `overflowed`) count
    IDs as they appear in the batch; `admitted` and the eviction counts count distinct IDs.
    Expiry is its own call and returns what it freed.
    """

    lookups: int = 0
    hits: int = 0
    admitted: int = 0
    new_lookups: int = 0
    filtered: int = 0
    overflowed: int = 0
    evicted_lru: int = 0
    evicted_lfu: int = 0

    def __iadd__(self, other: MapStats) -> MapStats:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self


class Freed(NamedTuple):
    """Rows taken from IDs (by eviction or expiry): reset their weights and optimizer state."""

    slots: torch.Tensor
    ids: torch.Tensor


@dataclass
class InsertResult:
    """What `lookup_or_insert` did to a batch.

    `slots` is the row per ID, -1 where the ID has none (filtered or overflowed: it reads
    the default embedding). `new_slots` are rows given to new IDs in this call (initialise
    them); `evicted` are the rows and IDs evicted to make room (export them as deletions).
    """

    slots: torch.Tensor
    new_slots: torch.Tensor
    evicted: Freed
    stats: MapStats = field(default_factory=MapStats)


def _empty_ids() -> torch.Tensor:
    return torch.empty(0, dtype=torch.int64)


class IdMap(nn.Module):
    """Collisionless map from raw IDs to `capacity` row slots with a full-table policy.

    Args:
        capacity: rows of the embedding table this map serves.
        policy: which rows to free when none is free (see module docstring).
        max_load: the hash array is the smallest power of two holding `capacity / max_load`
            keys; lower means fewer displacements on insert and more bytes (at most 0.8).
        evict_chunk: fraction of capacity an eviction pass frees beyond what the batch
            needs. A pass costs O(capacity), so freeing ahead amortises it over batches;
            0 evicts exactly what is needed.
        native: use the native kernels (default: where built); False runs the torch-op
            reference path, which gives the same rows and row state (IDs may sit in other
            hash slots: the inserts walk differently).
    """

    def __init__(
        self,
        capacity: int,
        policy: Policy = "evict_lru",
        *,
        max_load: float = 0.4,
        evict_chunk: float = 0.0,
        native: bool = NATIVE,
    ) -> None:
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
        if capacity <= 0 or not 0 < max_load <= 0.8:
            raise ValueError("capacity must be positive and max_load in (0, 0.8]")
        if native and not NATIVE:
            raise ValueError("the native ID map kernels are not built")
        self.native = native
        self.policy = policy
        self.max_load = max_load
        self.evict_chunk = evict_chunk
        num_keys = 1 << max(4, math.ceil(math.log2(capacity / max_load)))
        # The arrays read at random per ID sit on huge pages where the OS allows it.
        self.register_buffer("keys", hugepages.full(num_keys, 0, torch.int64))
        self.register_buffer("vals", hugepages.full(num_keys, EMPTY, torch.int32))
        self.register_buffer("row_ids", hugepages.full(capacity, 0, torch.int64))
        self.register_buffer("row_pos", hugepages.full(capacity, 0, torch.int64))
        self.register_buffer("last_seen", hugepages.full(capacity, 0, torch.int64))
        self.register_buffer("counts", hugepages.full(capacity, 0, torch.int64))
        self.register_buffer("live", hugepages.full(capacity, False, torch.bool))
        self.register_buffer("free", torch.arange(capacity - 1, -1, -1, dtype=torch.int32))
        self.register_buffer("num_free", torch.tensor(capacity))
        self.register_buffer("seed", torch.tensor(MAP_SEED))

    # ---- sizes -------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.live.numel()

    @property
    def num_live(self) -> int:
        return self.capacity - int(self.num_free)

    def state_bytes(self) -> dict[str, int]:
        """Bytes per component; `rows` is the reverse map (ID and hash slot of each row),
        live flags and free list."""

        def nbytes(*ts: torch.Tensor) -> int:
            return sum(t.numel() * t.element_size() for t in ts)

        return {
            "keys": nbytes(self.keys),
            "values": nbytes(self.vals),
            "rows": nbytes(self.row_ids, self.row_pos, self.live, self.free),
            "timestamps": nbytes(self.last_seen),
            "counts": nbytes(self.counts),
        }

    # ---- the hash array ----------------------------------------------------------------

    def _probe(self, ids: torch.Tensor) -> torch.Tensor:
        """Row slot per ID, -1 if absent."""
        return kernels.probe(self.keys, self.vals, ids, int(self.seed), self.native)

    def _place(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """Insert distinct absent IDs; if the cuckoo rounds do not settle, rebuild."""
        if not self._cuckoo(ids, slots):
            self._rehash()

    def _cuckoo(self, ids: torch.Tensor, slots: torch.Tensor) -> bool:
        """Cuckoo insert (`kernels.insert`); False if some ID is still homeless."""
        seed = int(self.seed)
        return kernels.insert(self.keys, self.vals, self.row_pos, ids, slots, seed, self.native)

    def _rehash(self) -> None:
        """Rebuild the hash array from the live rows with a new seed, when inserts did not
        settle (the rows keep every ID, so none is lost). After `REBUILDS_PER_SIZE` failed
        seeds the array doubles, so rebuilding always ends.
        """
        rows = self.live.nonzero().squeeze(1)
        ids = self.row_ids.index_select(0, rows)
        num_keys = self.keys.numel()
        for attempt in itertools.count():
            self.seed += 1
            size = num_keys << (attempt // REBUILDS_PER_SIZE)
            self.keys = hugepages.full(size, 0, torch.int64)
            self.vals = hugepages.full(size, EMPTY, torch.int32)
            if self._cuckoo(ids, rows):
                return

    # ---- public operations -------------------------------------------------------------

    @torch.no_grad()
    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Row slot of each ID, -1 where absent; read-only (serving)."""
        flat = ids.reshape(-1).to(torch.int64)
        return self._probe(flat).view(ids.shape)

    @torch.no_grad()
    def lookup_or_insert(
        self, ids: torch.Tensor, admit_mask: AdmitMask = None, now: int | torch.Tensor = 0
    ) -> InsertResult:
        """Rows for a batch of IDs, creating rows for admitted new IDs.

        Args:
            ids: raw IDs, any shape.
            admit_mask: None admits every new ID; a bool tensor shaped like `ids`; or a
                callable given the missing IDs (one entry per occurrence) returning their
                mask, so a frequency filter counts only IDs that are not in the table. A new
                ID is admitted if any of its occurrences is.
            now: event time of the batch (scalar), or per ID (then a row keeps the latest).
        """
        flat = ids.reshape(-1).to(torch.int64)
        stats = MapStats(lookups=flat.numel())
        slots = self._probe(flat)
        miss = (slots < 0).nonzero().squeeze(1)
        stats.hits = flat.numel() - miss.numel()
        new_slots, evicted = _empty_ids(), Freed(_empty_ids(), _empty_ids())
        if miss.numel():
            miss_ids = flat.index_select(0, miss)
            uniq, inverse = torch.unique(miss_ids, return_inverse=True)
            wanted = self._wanted(admit_mask, miss, miss_ids, inverse, uniq.numel())
            new_ids = uniq if wanted is None else uniq[wanted]
            new_slots, evicted = self._make_room(new_ids.numel(), slots, stats)
            got = new_slots.numel()
            self._occupy(new_ids[:got], new_slots)
            uniq_slot = torch.full_like(uniq, EMPTY)
            placed = torch.arange(got) if wanted is None else wanted.nonzero().squeeze(1)[:got]
            miss_slot = uniq_slot.index_copy_(0, placed, new_slots).index_select(0, inverse)
            slots.index_copy_(0, miss, miss_slot)
            refused = None if wanted is None else ~wanted.index_select(0, inverse)
            stats.admitted = got
            stats.filtered = 0 if refused is None else int(refused.sum())
            stats.new_lookups = int((miss_slot >= 0).sum()) if got else 0
            stats.overflowed = miss.numel() - stats.new_lookups - stats.filtered
        served = flat.numel() - stats.filtered - stats.overflowed
        kernels.touch(self.last_seen, self.counts, slots, now, served, self.native)
        return InsertResult(slots.view(ids.shape), new_slots, evicted, stats)

    @torch.no_grad()
    def expire(self, now: int, ttl: int) -> Freed:
        """Free every row with `now - last_seen >= ttl`; returns the freed rows and IDs."""
        cutoff = min(max(now - ttl, _I64.min), _I64.max)
        rows = (self.live & (self.last_seen <= cutoff)).nonzero().squeeze(1)
        return self._free_rows(rows)

    @torch.no_grad()
    def restore_rows(
        self, ids: torch.Tensor, last_seen: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        """Give distinct IDs absent from the map the next free rows, with their saved
        last-seen times and counts (a checkpoint moved to another layout); their slots."""
        if ids.numel() > int(self.num_free):
            raise ValueError(f"{ids.numel()} rows to restore, {int(self.num_free)} free")
        slots = self._pop_free(ids.numel())
        self._occupy(ids, slots)
        self.last_seen.index_copy_(0, slots, last_seen)
        self.counts.index_copy_(0, slots, counts)
        return slots

    def live_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, slots) of every live row, slots ascending: what an export writes."""
        rows = self.live.nonzero().squeeze(1)
        return self.row_ids.index_select(0, rows), rows

    # ---- internals ---------------------------------------------------------------------

    @staticmethod
    def _wanted(
        admit_mask: AdmitMask,
        miss: torch.Tensor,
        miss_ids: torch.Tensor,
        inverse: torch.Tensor,
        num_uniq: int,
    ) -> torch.Tensor | None:
        """Which distinct missing IDs are admitted (any occurrence admitted); None = all."""
        if admit_mask is None:
            return None
        if callable(admit_mask):
            admit = admit_mask(miss_ids).to(torch.bool)
        else:
            admit = admit_mask.reshape(-1).to(torch.bool).index_select(0, miss)
        return torch.zeros(num_uniq, dtype=torch.bool).index_fill_(0, inverse[admit], True)

    def _occupy(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        self.row_ids.index_copy_(0, rows, ids)
        self.live.index_fill_(0, rows, True)
        self.last_seen.index_fill_(0, rows, _I64.min)
        self.counts.index_fill_(0, rows, 0)
        self._place(ids, rows)

    def _pop_free(self, n: int) -> torch.Tensor:
        top = int(self.num_free)
        self.num_free -= n
        return self.free[top - n : top].flip(0).to(torch.int64)

    def _make_room(
        self, wanted: int, batch_slots: torch.Tensor, stats: MapStats
    ) -> tuple[torch.Tensor, Freed]:
        """Rows for `wanted` new IDs, evicting by policy; may return fewer."""
        evicted = Freed(_empty_ids(), _empty_ids())
        short = wanted - int(self.num_free)
        if short > 0:
            extra = math.ceil(self.evict_chunk * self.capacity)
            evicted = self._evict(short + extra, batch_slots)
            if self.policy == "evict_lru":
                stats.evicted_lru = evicted.slots.numel()
            else:
                stats.evicted_lfu = evicted.slots.numel()
        return self._pop_free(min(wanted, int(self.num_free))), evicted

    def _evict(self, target: int, batch_slots: torch.Tensor) -> Freed:
        """Free up to `target` rows: least recently seen first (LRU), or least often seen,
        then least recently (LFU); ties go to the lower slot.

        Rows the current batch reads are never candidates, so a batch never sees its own
        rows taken away.
        """
        scores = [self.last_seen] if self.policy == "evict_lru" else [self.counts, self.last_seen]
        rows = kernels.lowest(
            self.live, batch_slots, scores, target, self.num_live, native=self.native
        )
        return self._free_rows(rows)

    def _free_rows(self, rows: torch.Tensor) -> Freed:
        ids = self.row_ids.index_select(0, rows)
        if rows.numel():
            self.vals.index_fill_(0, self.row_pos.index_select(0, rows), EMPTY)
            self.live.index_fill_(0, rows, False)
            top = int(self.num_free)
            self.free[top : top + rows.numel()] = rows.flip(0).to(torch.int32)
            self.num_free += rows.numel()
        return Freed(rows, ids)

    def _load_from_state_dict(
        self, state_dict: dict[str, torch.Tensor], prefix: str, *args: object, **kwargs: object
    ) -> None:
        """Take the checkpoint's sizes, so a map whose hash array doubled on rebuilds
        restores into a fresh one."""
        for name, buf in self._buffers.items():
            incoming = state_dict.get(prefix + name)
            if buf is not None and incoming is not None and incoming.shape != buf.shape:
                self._buffers[name] = hugepages.full(incoming.numel(), 0, incoming.dtype).view(
                    incoming.shape
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"capacity={self.capacity}, policy={self.policy}, key_slots={self.keys.numel()}, "
            f"live={self.num_live}"
        )
