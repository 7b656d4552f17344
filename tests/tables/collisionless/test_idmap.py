"""Collisionless ID map, frequency filter and bucket ownership against Python references.

`Reference` is a plain-dict model of the map: it predicts hits, which IDs each policy evicts
(with `evict_chunk=0` the map must free exactly what the batch needs, by the documented
order), which new IDs overflow, and the stats; slot numbers of new rows are taken from the
map but checked to be free, in range and never shared.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from tables.collisionless import idmap as idmap_module
from tables.collisionless import kernels
from tables.collisionless.admission import CountMinSketch, FrequencyFilter
from tables.collisionless.idmap import IdMap, InsertResult, MapStats
from tables.collisionless.ownership import bucket_of, bucket_range, hash64, owner_of

I64_MIN, I64_MAX = -(2**63), 2**63 - 1
EDGE_IDS = [I64_MIN, I64_MIN + 1, I64_MAX, I64_MAX - 1, -1, 0, 1, 2**32, -(2**32), 2**62]


def splitmix64(x: int, seed: int = 0) -> int:
    """Pure-Python splitmix64 finalizer of x XOR the seed's own splitmix64, signed result."""
    mask = (1 << 64) - 1
    z = (seed + 1) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z = (x ^ z ^ (z >> 31)) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return z - (1 << 64) if z >= 1 << 63 else z


class Reference:
    """Dict model of `IdMap` (policy, LRU/LFU order, overflow), checked batch by batch."""

    def __init__(self, capacity: int, policy: str) -> None:
        self.capacity, self.policy = capacity, policy
        self.slot: dict[int, int] = {}
        self.last: dict[int, int] = {}
        self.count: dict[int, int] = {}

    def check(
        self, ids: list[int], result: InsertResult, now: int, admit: list[bool] | None = None
    ) -> None:
        slots, stats = result.slots.tolist(), result.stats
        admit = admit or [True] * len(ids)
        hits = [i for i in ids if i in self.slot]
        wanted = sorted({i for i, a in zip(ids, admit, strict=True) if a and i not in self.slot})
        free = self.capacity - len(self.slot)
        expected_evicted: list[int] = []
        if len(wanted) > free:
            expected_evicted = self._victims(len(wanted) - free, set(hits))
        assert sorted(result.evicted.ids.tolist()) == sorted(expected_evicted)
        assert result.evicted.slots.tolist() == [self.slot[i] for i in result.evicted.ids.tolist()]
        for i in expected_evicted:
            del self.slot[i], self.last[i], self.count[i]
        room = self.capacity - len(self.slot)
        placed, overflow = wanted[:room], set(wanted[room:])
        taken = set(self.slot.values())
        for i in placed:
            new = slots[ids.index(i)]
            assert 0 <= new < self.capacity and new not in taken, "a row is shared"
            taken.add(new)
            self.slot[i], self.last[i], self.count[i] = new, now, 0
        assert sorted(result.new_slots.tolist()) == sorted(self.slot[i] for i in placed)
        for i, s in zip(ids, slots, strict=True):
            assert s == self.slot.get(i, -1)
            if s >= 0:
                self.last[i] = now
                self.count[i] += 1
        assert stats == MapStats(
            lookups=len(ids),
            hits=len(hits),
            admitted=len(placed),
            new_lookups=sum(i in placed for i in ids) if placed else 0,
            filtered=sum(i not in self.slot and i not in overflow for i in ids),
            overflowed=sum(i in overflow for i in ids),
            evicted_lru=len(expected_evicted) * (self.policy == "evict_lru"),
            evicted_lfu=len(expected_evicted) * (self.policy == "evict_lfu"),
        )
        assert stats.hits + stats.new_lookups + stats.filtered + stats.overflowed == len(ids)

    def _victims(self, n: int, protected: set[int]) -> list[int]:
        def order(i: int) -> tuple[int, ...]:
            if self.policy == "evict_lru":
                return (self.last[i], self.slot[i])
            return (self.count[i], self.last[i], self.slot[i])

        return sorted((i for i in self.slot if i not in protected), key=order)[:n]

    def check_state(self, idmap: IdMap) -> None:
        ids, slots = idmap.live_ids()
        assert dict(zip(ids.tolist(), slots.tolist(), strict=True)) == self.slot
        assert idmap.num_live == len(self.slot) and idmap.capacity == self.capacity
        assert len(set(self.slot.values())) == len(self.slot)
        probe = torch.tensor(list(self.slot) + EDGE_IDS, dtype=torch.int64)
        assert idmap.lookup(probe).tolist() == [self.slot.get(i, -1) for i in probe.tolist()]


def random_batches(seed: int, n: int, size: int, universe: int) -> list[torch.Tensor]:
    """Batches of heavy-tailed IDs spread over the int64 range, edge values mixed in."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ranks = (torch.rand(size, generator=g) ** 3 * universe).long()
        ids = hash64(ranks, 7)
        ids[: len(EDGE_IDS)] = torch.tensor(EDGE_IDS)[torch.randperm(len(EDGE_IDS), generator=g)]
        out.append(ids)
    return out


def adversarial_batches() -> list[torch.Tensor]:
    limits = torch.tensor(EDGE_IDS * 3, dtype=torch.int64)
    near_max = I64_MAX - torch.arange(40)
    near_min = I64_MIN + torch.arange(40)
    stride = torch.arange(40) << 40  # IDs that differ only in high bits
    return [
        limits,
        torch.full((500,), I64_MIN),  # all the same
        torch.full((500,), -1),
        torch.cat([near_max, near_min, stride]),  # all new
        torch.cat([near_max, near_min]).repeat(5),  # heavy duplicates
        torch.arange(-60, 60),
        torch.cat([stride, torch.tensor(EDGE_IDS)]).repeat(3),
    ]


def replay(idmap: IdMap, ref: Reference, batches: list[torch.Tensor]) -> None:
    for t, ids in enumerate(batches, start=1):
        ref.check(ids.tolist(), idmap.lookup_or_insert(ids, None, t), t)
        ref.check_state(idmap)


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch_ops"])
@pytest.mark.parametrize("policy", ["evict_lru", "evict_lfu"])
@pytest.mark.parametrize("capacity", [24, 96, 400])  # ~1.0 load quickly, and below
def test_matches_dict_reference(policy: str, capacity: int, native: bool) -> None:
    idmap = IdMap(capacity, policy, native=native)  # type: ignore[arg-type]
    ref = Reference(capacity, policy)
    replay(idmap, ref, random_batches(capacity, 12, 150, 600) + adversarial_batches())


def test_native_kernels_are_built() -> None:
    """`make venv` builds tables/collisionless/csrc; without it the map silently runs 2x slower."""
    assert kernels.NATIVE


@pytest.mark.parametrize("policy", ["evict_lru", "evict_lfu"])
@pytest.mark.parametrize(("capacity", "chunk"), [(300, 0.0), (64, 0.25)])  # 64: overflows
def test_native_kernels_equal_the_torch_ops_path(policy: str, capacity: int, chunk: float) -> None:
    """Same slots, stats and row state (free list order included), batch by batch, with
    per-ID event times (a row keeps its latest) and a scalar time, at load 1.0 with
    evictions, and with batches holding more new IDs than rows. Only where an ID sits in the
    hash array may differ (the inserts walk differently), so lookups are compared instead."""
    native, reference = (
        IdMap(capacity, policy, evict_chunk=chunk, native=n)  # type: ignore[arg-type]
        for n in (True, False)
    )
    g = torch.Generator().manual_seed(3)
    for t, ids in enumerate(random_batches(9, 16, 400, 2_000) + adversarial_batches()):
        now: int | torch.Tensor = t
        if t % 2:
            now = torch.randint(0, 1_000, ids.shape, generator=g)
        a, b = native.lookup_or_insert(ids, None, now), reference.lookup_or_insert(ids, None, now)
        assert torch.equal(a.slots, b.slots) and a.stats == b.stats, t
        for name in ("row_ids", "last_seen", "counts", "live", "free", "num_free"):
            assert torch.equal(getattr(native, name), getattr(reference, name)), (t, name)
        rows = native.live.nonzero().squeeze(1)
        assert torch.equal(native.vals[native.row_pos[rows]], rows.int())  # row_pos is current
    probe = torch.cat([native.live_ids()[0], torch.tensor(EDGE_IDS)])
    assert torch.equal(native.lookup(probe), reference.lookup(probe))


def test_native_insert_rebuilds_when_displacements_run_out(monkeypatch) -> None:
    """With no displacement allowed, an ID whose three choices are taken sends the map to a
    rebuild with a new seed (and larger arrays after repeated failures): no ID is lost, and
    the map restores into a fresh one of the same capacity."""
    monkeypatch.setattr(kernels, "MAX_KICK_ROUNDS", 0)
    idmap, ref = IdMap(3276, "evict_lru", max_load=0.8), Reference(3276, "evict_lru")
    replay(idmap, ref, [hash64(torch.arange(3276), 2)])
    assert int(idmap.seed) > idmap_module.MAP_SEED and idmap.keys.numel() > 4096
    restored = IdMap(3276, "evict_lru", max_load=0.8)  # takes the larger hash array
    restored.load_state_dict(idmap.state_dict())
    ref.check_state(restored)


def test_load_factor_one_then_eviction() -> None:
    ids = hash64(torch.arange(256), 3)
    idmap, ref = IdMap(256, "evict_lru"), Reference(256, "evict_lru")
    replay(idmap, ref, [ids, ids.flip(0), torch.tensor([I64_MIN]), ids[:10]])
    assert idmap.num_live == 256


def test_hash_array_at_its_highest_load() -> None:
    """3276 rows in 4096 hash slots (max_load 0.8): inserts displace long chains of IDs."""
    idmap, ref = IdMap(3276, "evict_lru", max_load=0.8), Reference(3276, "evict_lru")
    assert idmap.keys.numel() == 4096
    ids = hash64(torch.arange(3400), 9)
    replay(idmap, ref, [ids[:1000], ids[1000:3276], ids[3276:], ids[:500]])
    assert idmap.keys.numel() == 4096


def test_batch_with_more_new_ids_than_rows_overflows_loudly() -> None:
    idmap = IdMap(8, "evict_lfu")
    result = idmap.lookup_or_insert(torch.arange(20), None, 1)
    assert result.slots[:8].tolist() == list(range(8)) and result.stats.overflowed == 12
    assert result.slots[8:].tolist() == [-1] * 12
    again = idmap.lookup_or_insert(torch.arange(8, 28), None, 2)  # every row is evictable
    assert again.stats.hits == 0 and again.stats.evicted_lfu == 8
    assert again.stats.admitted == 8 and again.stats.overflowed == 12


def test_eviction_chunk_frees_ahead_and_slots_are_reused() -> None:
    idmap = IdMap(16, "evict_lru", evict_chunk=0.25)
    idmap.lookup_or_insert(torch.arange(16), None, 1)
    result = idmap.lookup_or_insert(torch.tensor([100]), None, 2)
    assert result.stats.evicted_lru == 5  # 1 needed + ceil(0.25 * 16)
    assert result.evicted.ids.tolist() == [0, 1, 2, 3, 4]  # all seen at t=1: lower slots first
    later = idmap.lookup_or_insert(torch.tensor([101, 102, 103, 104]), None, 3)
    assert later.stats.evicted_lru == 0
    assert set(later.new_slots.tolist()) | set(result.new_slots.tolist()) == set(
        result.evicted.slots.tolist()
    )


def test_expiry_frees_stale_rows_for_reuse() -> None:
    idmap = IdMap(64, "evict_lru")
    idmap.lookup_or_insert(torch.tensor([1, 2, 3]), None, 10)
    idmap.lookup_or_insert(torch.tensor([3, 4]), None, 20)
    idmap.lookup_or_insert(torch.tensor([5, 6, 6]), None, torch.tensor([25, 31, 29]))
    assert idmap.expire(now=30, ttl=10).ids.tolist() == [1, 2, 3, 4]  # 30 - 20 >= 10
    assert idmap.lookup(torch.tensor([1, 2, 3, 4, 5, 6])).tolist() == [-1, -1, -1, -1, 4, 5]
    stale = idmap.expire(now=35, ttl=10)  # 5 last seen at 25; 6 keeps its latest time, 31
    assert stale.ids.tolist() == [5]
    result = idmap.lookup_or_insert(torch.tensor([7, 8, 9, 10]), None, 40)
    assert set(result.new_slots.tolist()) == {0, 1, 2, 4}  # the freed rows first
    assert idmap.expire(now=I64_MIN, ttl=I64_MAX).ids.numel() == 0  # no overflow
    assert set(idmap.expire(now=I64_MAX, ttl=0).ids.tolist()) == {6, 7, 8, 9, 10}
    assert idmap.num_live == 0


def test_admission_mask_and_filter_callable() -> None:
    idmap, ref = IdMap(32, "evict_lru"), Reference(32, "evict_lru")
    ids = torch.tensor([5, 6, 6, 7, I64_MIN])
    admit = [True, False, True, False, False]  # 6 admitted through its second occurrence
    ref.check(ids.tolist(), idmap.lookup_or_insert(ids, torch.tensor(admit), 1), 1, admit)
    assert idmap.lookup(ids).tolist() == [0, 1, 1, -1, -1]
    seen_twice = FrequencyFilter(min_count=2, width=1 << 10)
    first = idmap.lookup_or_insert(torch.tensor([7, 8, 5]), seen_twice, 2)
    assert first.stats.filtered == 2 and first.stats.hits == 1
    second = idmap.lookup_or_insert(torch.tensor([8, 9]), seen_twice, 3)
    assert second.stats.admitted == 1 and second.stats.filtered == 1
    assert seen_twice.sketch is not None and seen_twice.sketch.query(torch.tensor([5])) == 0


def test_cuckoo_rebuilds_with_a_new_seed_when_inserts_do_not_settle(monkeypatch) -> None:
    settled: list[bool] = []
    cuckoo = IdMap._cuckoo

    def one_round_first(self: IdMap, ids: torch.Tensor, slots: torch.Tensor) -> bool:
        rounds = 1 if not settled else 64  # one round leaves the contention losers homeless
        monkeypatch.setattr(kernels, "MAX_KICK_ROUNDS", rounds)
        settled.append(cuckoo(self, ids, slots))
        return settled[-1]

    monkeypatch.setattr(IdMap, "_cuckoo", one_round_first)
    idmap = IdMap(3000, "evict_lru", max_load=0.45, native=False)
    ref = Reference(3000, "evict_lru")
    replay(idmap, ref, [hash64(torch.arange(3000), 1)])
    assert settled == [False, True] and int(idmap.seed) == idmap_module.MAP_SEED + 1


def test_checkpoint_round_trip_is_exact() -> None:
    idmap = IdMap(200, "evict_lfu", evict_chunk=0.1)
    batches = random_batches(5, 10, 120, 500)
    for t, ids in enumerate(batches[:6]):
        idmap.lookup_or_insert(ids, None, t)
    buffer = io.BytesIO()
    torch.save(idmap.state_dict(), buffer)
    buffer.seek(0)
    restored = IdMap(200, "evict_lfu", evict_chunk=0.1)
    restored.load_state_dict(torch.load(buffer))
    for name, value in idmap.state_dict().items():
        assert torch.equal(value, restored.state_dict()[name]), name
    for t, ids in enumerate(batches[6:], start=6):
        a, b = idmap.lookup_or_insert(ids, None, t), restored.lookup_or_insert(ids, None, t)
        assert torch.equal(a.slots, b.slots) and a.stats == b.stats
        assert torch.equal(a.evicted.ids, b.evicted.ids)
    assert torch.equal(idmap.live_ids()[0], restored.live_ids()[0])


def test_state_bytes_per_component() -> None:
    idmap = IdMap(1000, "evict_lru", max_load=0.4)
    sizes = idmap.state_bytes()
    assert sizes == {
        "keys": 4096 * 8,
        "values": 4096 * 4,
        "rows": 1000 * (8 + 8 + 1 + 4),
        "timestamps": 1000 * 8,
        "counts": 1000 * 8,
    }
    assert FrequencyFilter(3, width=1 << 12, depth=4).state_bytes() == {"filter": 4 * 4096 * 4}
    assert FrequencyFilter(3, probabilistic=True).state_bytes() == {"filter": 0}


def test_hash64_is_splitmix64() -> None:
    values = [*EDGE_IDS, *range(-50, 50), *torch.randint(I64_MIN, I64_MAX, (200,)).tolist()]
    for seed in (0, 1, 0x51AB, 2**40):
        got = hash64(torch.tensor(values), seed).tolist()
        assert got == [splitmix64(v % (1 << 64), seed) for v in values]


def test_count_min_never_undercounts_and_false_admission_is_bounded() -> None:
    g = torch.Generator().manual_seed(0)
    singles = hash64(torch.arange(20_000), 11)  # seen once: admitting one is an error
    frequent = hash64(torch.arange(20_000, 22_000), 11).repeat(10)  # seen 10 times
    stream = torch.cat([singles, frequent])[torch.randperm(40_000, generator=g)]
    width, depth = 1 << 16, 4
    seen_twice = FrequencyFilter(min_count=2, width=width, depth=depth)
    idmap = IdMap(30_000, "evict_lru")
    for t, batch in enumerate(stream.split(4096)):
        idmap.lookup_or_insert(batch, seen_twice, t)
    live = set(idmap.live_ids()[0].tolist())
    assert set(hash64(torch.arange(20_000, 22_000), 11).tolist()) <= live  # none refused
    false_rate = sum(i in live for i in singles.tolist()) / singles.numel()
    # An ID is falsely admitted only if every row's cell also holds another ID: at most
    # (distinct IDs / width) ** depth, about 1.3% here.
    bound = (22_000 / width) ** depth
    assert false_rate <= bound, (false_rate, bound)
    exact = torch.unique(stream[:5000], return_counts=True)
    sketch = CountMinSketch(width, depth)
    sketch.add(stream[:5000])
    assert bool((sketch.query(exact[0]) >= exact[1]).all())


def test_count_min_saturates_instead_of_wrapping() -> None:
    sketch = CountMinSketch(16, 2)
    sketch.counters.fill_(2**30 - 1)
    assert sketch.add(torch.zeros(1000, dtype=torch.int64)).max() == 2**30
    assert int(sketch.counters.max()) == 2**30


def test_probabilistic_admission_reaches_95_percent_at_min_count() -> None:
    min_count = 4
    ids = hash64(torch.arange(20_000), 5)
    gate = FrequencyFilter(min_count, probabilistic=True, seed=3)
    assert gate.p == pytest.approx(1 - 0.05 ** (1 / min_count))
    idmap = IdMap(20_000, "evict_lru")
    for t in range(min_count):  # each ID seen min_count times, in separate batches
        idmap.lookup_or_insert(ids, gate, t)
    assert abs(idmap.num_live / ids.numel() - 0.95) < 0.01  # std 0.0015
    restored = FrequencyFilter(min_count, probabilistic=True, seed=99)
    restored.load_state_dict(gate.state_dict())  # the draws' state travels in checkpoints
    assert torch.equal(gate(ids), restored(ids))


def test_ownership_moves_whole_buckets_when_ranks_double() -> None:
    ids = torch.cat([torch.tensor(EDGE_IDS), hash64(torch.arange(50_000), 2)])
    num_buckets = 64
    buckets = bucket_of(ids, num_buckets)
    assert torch.equal(buckets, bucket_of(ids, num_buckets)) and buckets.min() >= 0
    assert buckets.max() < num_buckets
    counts = torch.bincount(buckets, minlength=num_buckets).float()
    assert counts.min() > 0.8 * counts.mean()  # the hash spreads IDs evenly
    two, four = owner_of(buckets, num_buckets, 2), owner_of(buckets, num_buckets, 4)
    assert torch.equal(four // 2, two)  # each rank's range splits in two
    for b in range(num_buckets):  # an ID moves if and only if its whole bucket moves
        assert len(set(four[buckets == b].tolist())) == 1
    for world in (1, 2, 3, 4, 7, 64):
        owners = owner_of(torch.arange(num_buckets), num_buckets, world)
        for rank in range(world):
            start, end = bucket_range(rank, num_buckets, world)
            assert (owners == rank).nonzero().squeeze(1).tolist() == list(range(start, end))
    with pytest.raises(ValueError):
        owner_of(buckets, num_buckets, 65)


def test_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError):
        IdMap(10, "evict_random")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        IdMap(10, "grow")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        IdMap(10, max_load=0.9)
    with pytest.raises(ValueError):
        CountMinSketch(1000)
    assert math.isclose(FrequencyFilter(1).p, 1.0)
