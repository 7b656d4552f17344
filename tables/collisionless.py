"""Collisionless tables (Monolith): raw IDs -> their own rows of a row-wise torchrec table.

Layout. A table of `capacity` rows per shard and W shards (one per training rank) is one
torchrec table of W * capacity rows, sharded row-wise, so rank r's block is rows
[r * capacity, (r + 1) * capacity). Shard r owns the IDs whose bucket (`tables.ownership`)
falls in rank r's bucket range and keeps their `IdMap` and `FrequencyFilter`; an ID it
admits gets a slot s of its map, that is global row r * capacity + s, inside its own block.

Training forward, per table: every rank sends its batch's IDs (and event times) to their
owners with one gloo `all_to_all`; owners expire, filter, admit and evict, and answer with
global rows (-1 where an ID has no row); the rows come back, and torchrec's row-wise input
dist then moves each row to its owner's block for the lookup. IDs without a row (filtered,
overflowed, unknown) are dropped from the lookup and read the table's default embedding, a
dense parameter, instead: they train the shared default, nothing of their own. Rows given
to IDs (new and recycled slots alike) are reset in the fbgemm TBE before the lookup:
weights from a hash of the ID, so an ID starts the same whatever the slot or world size,
and zero optimizer state.

Each row also keeps the training step that last touched it, so an incremental export can
write only the rows trained since the previous one (`touched_since`).

The maps are per-rank state: they are kept out of the module's parameters and buffers, so
DDP never broadcasts them and DCP never deduplicates them across ranks; `save_id_maps` /
`load_id_maps` write and read one file per shard. Unsharded (evaluation, export) the module
holds every shard and routes locally, read-only.

Restoring onto another number of workers (or another capacity) moves whole buckets: each
live ID goes to the rank that now owns its bucket, with its last-seen time, count and
touched step, into the next free slot of that rank's new map (in the order of the old
global rows); `load_id_maps` returns the (old row, new row) pairs so the checkpoint loader
can move the table rows and their optimizer state (`pipelines.checkpoint`). The frequency
filter counts per bucket (`BucketedCountMinSketch`), so the ranks' sketches are slices of
one global sketch and are re-sliced exactly. A rank that cannot hold the live rows of its
new buckets stops the restore with an error; nothing is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tables.admission import BucketSpan, FrequencyFilter
from tables.idmap import IdMap, MapStats, Policy
from tables.ownership import bucket_of, bucket_range, hash64, owner_of

if TYPE_CHECKING:
    from recsys.config import TableConfig

INIT_SEED = 0x1717
FILTER_DEPTH = 4
ID_MAP_DIR = "id_maps"
STATE_FORMAT = 2  # of the per-shard files: 2 = filter counted per bucket, counters kept
_I64_MIN = torch.iinfo(torch.int64).min


def initial_rows(ids: torch.Tensor, dim: int, bound: float) -> torch.Tensor:
    """Uniform(-bound, bound) rows, a pure function of each ID: the same on any rank."""
    per_id = hash64(ids.reshape(-1), INIT_SEED).unsqueeze(1)
    bits = hash64(per_id + torch.arange(dim), INIT_SEED + 1)
    unit = ((bits >> 11) & ((1 << 53) - 1)).to(torch.float64) / float(1 << 53)
    return ((2.0 * unit - 1.0) * bound).to(torch.float32)


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
        return cls(MapStats(**saved["map"]), saved["expired"])


class RowMoves(NamedTuple):
    """A table restored onto another layout: per live ID held here, its global row in the
    checkpoint's table (`old`) and in this one (`new`)."""

    old: torch.Tensor
    new: torch.Tensor


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


class CollisionlessTransform(nn.Module):
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
        self.init_bound = math.sqrt(1.0 / (capacity * num_shards))  # torchrec's EBC default
        self.default = nn.Parameter(torch.zeros(dim))
        # Plain attributes, not submodules: per-rank state (see the module docstring).
        self.shards: dict[int, _Shard] = {s: self._new_shard(s) for s in range(num_shards)}
        self.rank: int | None = None
        self.group: dist.ProcessGroup | None = None
        self.last_pass: int | None = None  # index of the last expiry interval seen
        self.steps = 0  # training forwards so far, the same on every rank
        self.counters = TableCounters()
        self._fresh: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows, ids) to reset
        self._storage: tuple[nn.Module, Any] | None = None  # (collection, `table_storage`)

    def _new_shard(self, shard: int) -> _Shard:
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

    def route(
        self, features: KeyedJaggedTensor, event_times: torch.Tensor | None
    ) -> tuple[KeyedJaggedTensor, torch.Tensor]:
        """Raw IDs -> (the lookup's input, per bag the number of IDs reading the default).

        `event_times` holds one time per sample (the batch's timestamps). The output keeps
        the features as keys; IDs without a row are left out of their bags. Counts are
        key-major, `[len(keys) * stride]`, like the lengths. `route_tables` does the same
        for several tables with one exchange.
        """
        return route_tables([(self, features)], event_times)[0]

    def add_default(self, pooled: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
        """Pooled rows of one feature plus its bags' IDs without rows, each the default."""
        return pooled + missing.unsqueeze(1).to(pooled.dtype) * self.default

    def _owner(self, ids: torch.Tensor) -> torch.Tensor:
        return owner_of(bucket_of(ids, self.buckets), self.buckets, self.num_shards)

    def _rows_local(self, ids: torch.Tensor, times: torch.Tensor, now: int) -> torch.Tensor:
        """Global row per ID (-1: none) from the shards held here (no other ranks)."""
        self._advance_clock(now)
        if self.num_shards == 1:  # one shard owns every ID: no ownership hash to compute
            return self._serve(0, ids, times)
        owner = self._owner(ids)
        rows = torch.full_like(ids, -1)
        for s in self.shards:
            at = (owner == s).nonzero().squeeze(1)
            rows.index_copy_(0, at, self._serve(s, ids[at], times[at]))
        return rows

    def _advance_clock(self, now: int) -> None:
        """Expiry passes, driven by the newest event time of all ranks (deterministic)."""
        if not self.training or self.ttl is None or now == _I64_MIN:
            return
        interval = now // self.evict_every
        if self.last_pass is None:
            self.last_pass = interval
        elif interval > self.last_pass:
            self.last_pass = interval
            for shard in self.shards.values():
                self.counters.expired += shard.idmap.expire(now, self.ttl).slots.numel()

    def _serve(self, shard: int, ids: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
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
        init = initial_rows(ids, self.dim, self.init_bound)
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

    def shard_state(self, shard: int) -> dict[str, Any]:
        """What a checkpoint keeps of one shard; the counters since the last report go with
        the lowest shard held here, so summing all files counts them once."""
        part = self.shards[shard]
        counters = self.counters if shard == min(self.shards) else TableCounters()
        return {
            "format": STATE_FORMAT,
            "num_shards": self.num_shards,
            "capacity": self.capacity,
            "buckets": self.buckets,
            "bucket_width": self.bucket_width,
            "idmap": part.idmap.state_dict(),
            "filter": part.filter.state_dict(),
            "touched": part.touched,
            "last_pass": self.last_pass,
            "steps": self.steps,
            "counters": asdict(counters),
        }

    def _adopt(self, state: dict[str, Any], source: Path) -> None:
        """Take the saved clock and filter layout; refuse files this code cannot read."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"{source}: ID map format {state.get('format', 1)}, this code reads "
                f"{STATE_FORMAT} (filter counted per bucket); retrain or use that version"
            )
        if state["buckets"] != self.buckets:
            raise ValueError(
                f"{source}: table {self.name!r} was trained with {state['buckets']} buckets, "
                f"the config has {self.buckets}; buckets are fixed for the life of the data"
            )
        self.bucket_width = state["bucket_width"]
        self.last_pass, self.steps = state["last_pass"], state["steps"]
        self._fresh, self._storage = [], None

    def load_shards(self, states: dict[int, tuple[dict[str, Any], Path]]) -> None:
        """Restore the shards held here from a checkpoint of the same layout:
        {shard: (its saved state, its file)}."""
        self.counters = TableCounters()
        for shard, (state, source) in states.items():
            self._adopt(state, source)
            part = self._new_shard(shard)
            part.idmap.load_state_dict(state["idmap"])
            part.filter.load_state_dict(state["filter"])
            part.touched = state["touched"]
            self.shards[shard] = part
            self.counters += TableCounters.from_dict(state["counters"])

    def reshard(self, states: Iterator[tuple[dict[str, Any], Path]]) -> RowMoves:
        """Restore the shards held here from a checkpoint of another layout (every saved
        shard, in shard order; read one at a time). Each live ID goes to the owner of its
        bucket here, in the order of its old global row; the filter's global sketch is
        re-sliced; each saved shard's counters go to the owner of its first bucket.

        Raises ValueError, on every rank alike, if any rank here cannot hold the live rows
        of its buckets.
        """
        ids, old_rows, seen, counts, touched, sketches = [], [], [], [], [], []
        self.counters = TableCounters()
        clocks, saved_shards = set(), 0
        for shard, (state, source) in enumerate(states):
            self._adopt(state, source)
            clocks.add((state["last_pass"], state["steps"]))
            saved_shards = state["num_shards"]
            idmap = IdMap(state["capacity"])
            idmap.load_state_dict(state["idmap"])
            live, slots = idmap.live_ids()
            ids.append(live)
            old_rows.append(slots + shard * state["capacity"])
            seen.append(idmap.last_seen[slots])
            counts.append(idmap.counts[slots])
            touched.append(state["touched"][slots])
            if "sketch.counters" in state["filter"]:
                sketches.append(state["filter"]["sketch.counters"])
            first = torch.tensor([bucket_range(shard, self.buckets, saved_shards)[0]])
            if int(owner_of(first, self.buckets, self.num_shards)) in self.shards:
                self.counters += TableCounters.from_dict(state["counters"])
        if len(clocks) != 1:
            raise ValueError(f"table {self.name!r}: the saved shards disagree on the clock")
        all_ids, all_rows = torch.cat(ids), torch.cat(old_rows)
        all_seen, all_counts, all_touched = torch.cat(seen), torch.cat(counts), torch.cat(touched)
        owner = self._owner(all_ids)
        needed = torch.bincount(owner, minlength=self.num_shards)
        for rank in (needed > self.capacity).nonzero().flatten().tolist():
            raise ValueError(
                f"table {self.name!r}: restoring {saved_shards} workers' checkpoint onto "
                f"{self.num_shards}, rank {rank} needs {int(needed[rank])} rows for the live "
                f"IDs of its buckets but its capacity is {self.capacity}; raise capacity to "
                f"at least {int(needed.max())} or use more workers"
            )
        sketch = torch.cat(sketches, 1) if sketches else None
        old, new = [], []
        for rank in sorted(self.shards):
            part = self._new_shard(rank)
            at = (owner == rank).nonzero().squeeze(1)
            slots = part.idmap.restore_rows(all_ids[at], all_seen[at], all_counts[at])
            part.touched.index_copy_(0, slots, all_touched[at])
            if sketch is not None and part.filter.sketch is not None:
                first, end = bucket_range(rank, self.buckets, self.num_shards)
                width = self.bucket_width
                part.filter.sketch.counters.copy_(sketch[:, first * width : end * width])
            self.shards[rank] = part
            old.append(all_rows[at])
            new.append(slots + rank * self.capacity)
        return RowMoves(torch.cat(old), torch.cat(new))

    def extra_repr(self) -> str:
        return (
            f"table={self.name!r}, capacity={self.capacity} x {self.num_shards}, "
            f"min_count={self.min_count}, ttl={self.ttl}, policy={self.policy}"
        )


def _owners(transforms: list[CollisionlessTransform], ids: list[torch.Tensor]) -> torch.Tensor:
    """The owning rank of every table's IDs, concatenated: one ownership hash over all
    tables when they share their bucket and shard counts (the usual case), else one per
    table."""
    if len({(t.buckets, t.num_shards) for t in transforms}) == 1:
        return transforms[0]._owner(torch.cat(ids))
    return torch.cat([t._owner(i) for t, i in zip(transforms, ids, strict=True)])


def _exchange(
    transforms: list[CollisionlessTransform],
    ids: list[torch.Tensor],
    times: list[torch.Tensor],
    local_now: int,
) -> list[torch.Tensor]:
    """Global rows for every table's IDs, one all_to_all round trip for all tables.

    Each (table, ID, time) goes to the ID's owner; owners advance their clocks to the
    newest time of all ranks, serve table by table and send the rows back.
    """
    first = transforms[0]
    group, world = first.group, first.num_shards
    sizes = [len(i) for i in ids]
    table = torch.repeat_interleave(torch.arange(len(ids)), torch.tensor(sizes))
    flat_ids, flat_times = torch.cat(ids), torch.cat(times)
    owner = _owners(transforms, ids)
    order = torch.argsort(owner, stable=True)
    sent = torch.bincount(owner, minlength=world)
    header = torch.stack([sent, torch.full_like(sent, local_now)], 1)
    heard = torch.empty_like(header)
    dist.all_to_all_single(heard, header, group=group)
    received = heard[:, 0]
    now = max(local_now, int(heard[:, 1].max()))
    payload = torch.stack([table, flat_ids, flat_times], 1).index_select(0, order)
    inbox = torch.empty(int(received.sum()), 3, dtype=torch.int64)
    dist.all_to_all_single(inbox, payload, received.tolist(), sent.tolist(), group=group)
    answer = torch.empty(len(inbox), dtype=torch.int64)
    for k, transform in enumerate(transforms):
        transform._advance_clock(now)
        at = (inbox[:, 0] == k).nonzero().squeeze(1)
        rows = transform._serve(transform.rank, inbox[at, 1], inbox[at, 2])  # type: ignore[arg-type]
        answer.index_copy_(0, at, rows)
    back = torch.empty_like(flat_ids)
    dist.all_to_all_single(back, answer, sent.tolist(), received.tolist(), group=group)
    return list(torch.empty_like(back).index_copy_(0, order, back).split(sizes))


def global_rows(
    transforms: list[CollisionlessTransform],
    ids: list[torch.Tensor],
    times: list[torch.Tensor],
    now: int,
) -> list[torch.Tensor]:
    """Global row per ID (-1: none) of each table's CPU int64 IDs, by their owners: held
    here, or one exchange between ranks for all tables. `now` is the newest event time
    of the local batch (`torch.iinfo(torch.int64).min` for none)."""
    if all(t.group is None for t in transforms):
        triples = zip(transforms, ids, times, strict=True)
        return [t._rows_local(i, ts, now) for t, i, ts in triples]
    return _exchange(transforms, ids, times, now)


def route_tables(
    tables: list[tuple[CollisionlessTransform, KeyedJaggedTensor]],
    event_times: torch.Tensor | None,
) -> list[tuple[KeyedJaggedTensor, torch.Tensor]]:
    """`CollisionlessTransform.route` for several tables: one exchange between ranks for
    all of them (bound tables share one group), not one per table."""
    device = tables[0][1].values().device  # maps and gloo work on the CPU
    ids, times, lengths = [], [], []
    for transform, features in tables:
        values = features.values().to("cpu", torch.int64)
        bags = features.lengths().to("cpu", torch.int64)
        if event_times is None:
            times.append(torch.zeros_like(values))
        else:
            per_bag = event_times.to("cpu", torch.int64).repeat(len(features.keys()))
            times.append(torch.repeat_interleave(per_bag, bags, output_size=len(values)))
        ids.append(values)
        lengths.append(bags)
        transform.steps += int(transform.training)
    transforms = [t for t, _ in tables]
    # The batch's newest event time drives every table's expiry clock alike.
    now = int(event_times.max()) if event_times is not None and event_times.numel() else _I64_MIN
    rows = global_rows(transforms, ids, times, now)
    out = []
    for (_, features), found, bags in zip(tables, rows, lengths, strict=True):
        kept = found >= 0
        bag = torch.repeat_interleave(torch.arange(bags.numel()), bags, output_size=len(found))
        missing = torch.zeros(bags.numel(), dtype=torch.int64).index_add_(
            0, bag, (~kept).to(torch.int64)
        )
        routed = KeyedJaggedTensor(
            keys=features.keys(),
            values=found[kept].to(device),
            lengths=(bags - missing).to(device, features.lengths().dtype),
            stride=features.stride(),
        )
        out.append((routed, missing.to(device)))
    return out


def table_storage(ebc: nn.Module, table: str) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """(weight rows, optimizer state tensors, first global row) of this rank's block.

    A sharded collection exposes its local shard as views of the fbgemm TBE's weights and
    of its fused optimizer's state, so writing them writes the kernel's own storage.
    """
    state = ebc.state_dict()
    key = f"embedding_bags.{table}.weight"  # an `EmbeddingCollection` names it `embeddings`
    weight = state[key if key in state else f"embeddings.{table}.weight"]
    if not hasattr(weight, "local_shards"):
        return weight, [], 0
    (shard,) = weight.local_shards()
    first_row = shard.metadata.shard_offsets[0]
    states = []
    for per_param in ebc.fused_optimizer.state.values():  # type: ignore[union-attr]
        for key, value in per_param.items():
            if key.startswith(f"{table}."):
                states += [s.tensor for s in value.local_shards()]
    return shard.tensor, states, first_row


def collisionless_transforms(model: nn.Module) -> Iterator[CollisionlessTransform]:
    return (m for m in model.modules() if isinstance(m, CollisionlessTransform))


def bind_ownership(model: nn.Module, rank: int, group: dist.ProcessGroup) -> None:
    """Make every collisionless table of `model` rank `rank`'s part (before sharding)."""
    for transform in collisionless_transforms(model):
        transform.bind(rank, group)


def table_report(sparse: nn.Module, group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """Per collisionless table, summed over ranks (a collective when `group` is given):
    counters since the last report, live rows, load factor, bytes of rows / ID map /
    optimizer state / filter."""
    report: dict[str, Any] = {}
    for transform in collisionless_transforms(sparse):
        counters = transform.take_counters()
        weights, states = [], []
        for table in transform.storage_tables:
            weight, table_states, _ = table_storage(_collection(sparse, table), table)
            weights.append(weight)
            states += table_states
        values = {
            **asdict(counters.map),
            "expired": counters.expired,
            "live_rows": sum(s.idmap.num_live for s in transform.shards.values()),
            "row_bytes": sum(w.numel() * w.element_size() for w in weights),
            **transform.memory(),
            "optimizer_bytes": sum(s.numel() * s.element_size() for s in states),
        }
        if group is not None:
            summed = torch.tensor(list(values.values()), dtype=torch.int64)
            dist.all_reduce(summed, group=group)
            values = dict(zip(values, summed.tolist(), strict=True))
        values["load_factor"] = values["live_rows"] / transform.num_rows
        report[transform.name] = values
    return report


def _collection(sparse: nn.Module, table: str) -> nn.Module:
    """The torchrec collection holding `table`: `sparse.ebc`, or `sparse.collection_of`
    where a layer has several (optembed's)."""
    of = getattr(sparse, "collection_of", None)
    return of(table) if of is not None else sparse.ebc  # type: ignore[return-value]


def format_report(report: dict[str, Any]) -> str:
    """One line per table for the training log."""
    mib = 1 << 20
    return "\n".join(
        f"table {name}: live={t['live_rows']} load={t['load_factor']:.3f} "
        f"admitted={t['admitted']} filtered={t['filtered']} overflowed={t['overflowed']} "
        f"evicted_lru={t['evicted_lru']} evicted_lfu={t['evicted_lfu']} expired={t['expired']} "
        f"MiB rows={t['row_bytes'] / mib:.2f} map={t['map_bytes'] / mib:.2f} "
        f"optimizer={t['optimizer_bytes'] / mib:.2f} filter={t['filter_bytes'] / mib:.2f}"
        for name, t in report.items()
    )


def save_id_maps(model: nn.Module, directory: Path) -> None:
    """One file per table and shard held here, next to the DCP files of the checkpoint."""
    for transform in collisionless_transforms(model):
        folder = directory / ID_MAP_DIR
        folder.mkdir(parents=True, exist_ok=True)
        for s in transform.shards:
            torch.save(transform.shard_state(s), folder / f"{transform.name}.{s}.pt")


def _shard_files(directory: Path, table: str) -> list[Path]:
    """The checkpoint's files of `table`, one per saved shard, in shard order."""
    files = sorted((directory / ID_MAP_DIR).glob(f"{table}.*.pt"))
    shard_of = {p: p.name[len(table) + 1 : -3] for p in files}
    number = {int(n): p for p, n in shard_of.items() if n.isdigit()}  # not table "a.b"'s
    if not number or sorted(number) != list(range(len(number))):
        raise FileNotFoundError(
            f"{directory / ID_MAP_DIR}: table {table!r} needs files {table}.0.pt .. "
            f"{table}.N.pt, found {[p.name for p in files]}"
        )
    return [number[s] for s in range(len(number))]


def _read(path: Path) -> tuple[dict[str, Any], Path]:
    return torch.load(path, weights_only=True), path


def load_id_maps(model: nn.Module, directory: Path) -> dict[str, RowMoves]:
    """Restore the shards each table holds here (all of them in an unsharded model).

    A table saved with another number of shards or capacity is resharded: the result
    names each torchrec table of its rows with the moves its rows and optimizer state need
    (rows held here only).
    Resharding reads every saved shard's file, one at a time.
    """
    moves = {}
    for transform in collisionless_transforms(model):
        files = _shard_files(directory, transform.name)
        first = _read(files[0])
        layout = (len(files), first[0].get("capacity"))
        if layout == (transform.num_shards, transform.capacity):
            held = {s: first if s == 0 else _read(files[s]) for s in transform.shards}
            transform.load_shards(held)
        else:
            saved = (first if s == 0 else _read(f) for s, f in enumerate(files))
            moved = transform.reshard(saved)
            moves |= dict.fromkeys(transform.storage_tables, moved)
    return moves


def table_weight_key(state_dict: dict[str, Any], table: str) -> str:
    """The model state-dict key of a collisionless table's rows (found next to its
    transform's default embedding, so any wrapping prefix is kept)."""
    suffix = f"transforms.{table}.default"
    (key,) = (k for k in state_dict if k.endswith(suffix))
    return f"{key[: -len(suffix)]}ebc.embedding_bags.{table}.weight"
