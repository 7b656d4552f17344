"""The ID map's per-ID loops, over its hash array and its rows: probe, insert, pick rows to
evict, stamp rows read.

Each runs in a native kernel (csrc/idmap_native.cpp, built at install) that stops at an
ID's first matching choice and keeps many IDs' memory reads in flight; the same operation
in torch ops remains as the reference it is tested against, and runs where the kernels are
not built. `native` picks one per call. IDs sit in one of `CHOICES` hash slots each (see
`idmap`); `vals` holds the row of each hash slot, EMPTY when free.
"""

from __future__ import annotations

import warnings

import torch

from recsys.hashing import mix64_int, to_int64
from tables.collisionless.ownership import hash64

try:
    import tables.collisionless._idmap_native  # noqa: F401  (registers torch.ops.recsys_idmap)

    NATIVE = True
except ImportError:  # a source tree that was not built, e.g. shipped without its library
    NATIVE = False
    warnings.warn(
        "tables.collisionless._idmap_native is not built: the ID map runs on torch ops, "
        "about 2x slower "
        "(`make venv` builds it)",
        stacklevel=1,
    )

EMPTY = -1
CHOICES = 3  # hash slots per ID: 3-choice cuckoo inserts rarely kick below ~0.9 load
MAX_KICK_ROUNDS = 64  # insert rounds (native: displacements per ID) before a rebuild
SAMPLE = 1 << 16  # rows sampled to pick an eviction threshold before the exact selection


def _salt(seed: int) -> int:
    """The salt `hash64(ids, seed)` mixes into every ID, for the native kernels."""
    return to_int64(mix64_int(seed + 1))


def _choice(h: torch.Tensor, j: int, num_keys: int) -> torch.Tensor:
    """Hash slot number j of IDs with hashes h: `low + j * high` (double hashing; the odd
    step makes the choices distinct in a power-of-two array)."""
    return (h + j * ((h >> 32) | 1)) & (num_keys - 1)


def _choices(h: torch.Tensor, num_keys: int) -> list[torch.Tensor]:
    """Every `_choice` of IDs with hashes h, the step computed once."""
    mask = num_keys - 1
    step = (h >> 32) | 1
    return [h & mask] + [(h + j * step) & mask for j in range(1, CHOICES)]


def probe(
    keys: torch.Tensor, vals: torch.Tensor, ids: torch.Tensor, seed: int, native: bool
) -> torch.Tensor:
    """Row slot per ID, -1 if absent.

    In torch ops each round checks the next choice of the IDs not found yet, and almost all
    are found at their first.
    """
    if native:
        return torch.ops.recsys_idmap.probe(keys, vals, ids, _salt(seed))
    h = hash64(ids, seed)
    pos = h & (keys.numel() - 1)
    found = torch.where(keys.index_select(0, pos) == ids, vals.index_select(0, pos), EMPTY)
    slots = found.to(torch.int64)
    rest = (found < 0).nonzero().squeeze(1)
    for j in range(1, CHOICES):
        if not rest.numel():
            break
        pos = _choice(h.index_select(0, rest), j, keys.numel())
        held = keys.index_select(0, pos)
        wanted = ids.index_select(0, rest)
        found = torch.where(held == wanted, vals.index_select(0, pos), EMPTY)
        slots.index_copy_(0, rest, found.to(torch.int64))
        rest = rest[found < 0]
    return slots


def insert(
    keys: torch.Tensor,
    vals: torch.Tensor,
    row_pos: torch.Tensor,
    ids: torch.Tensor,
    rows: torch.Tensor,
    seed: int,
    native: bool,
) -> bool:
    """Cuckoo insert of distinct absent IDs with their rows, keeping each row's hash slot
    in `row_pos`; False if some ID is still homeless after the rounds.

    In torch ops, vectorized: each round every pending ID targets its first free hash slot,
    else its kick slot. All write their key and the one whose key reads back wins the slot,
    so no two IDs ever share one; a displaced occupant becomes pending, kicking at its next
    choice. Pending state is one (id, row, choices..., kick) x n tensor: fewer ops per round.
    The native kernel inserts one ID at a time instead, with a bounded random walk of
    displacements per ID, so its hash slots differ but never its rows.
    """
    if native:
        return torch.ops.recsys_idmap.insert(
            keys, vals, row_pos, ids, rows.to(torch.int64), _salt(seed), MAX_KICK_ROUNDS
        )
    choices = _choices(hash64(ids, seed), keys.numel())
    pending = torch.stack([ids, rows.to(torch.int64), *choices, choices[0]])
    for _ in range(MAX_KICK_ROUNDS):
        if not pending.shape[1]:
            return True
        ids, rows, choices, kick = pending[0], pending[1], pending[2:-1], pending[-1]
        taken = vals.index_select(0, choices.reshape(-1)).view(CHOICES, -1) >= 0
        target = kick
        for j in reversed(range(CHOICES)):  # the first free choice, else the kick slot
            target = torch.where(taken[j], target, choices[j])
        held_key = keys.index_select(0, target)
        held_row = vals.index_select(0, target)
        keys.index_copy_(0, target, ids)
        won = keys.index_select(0, target) == ids
        winners = won.nonzero().squeeze(1)
        at, rows = target.index_select(0, winners), rows.index_select(0, winners)
        vals.index_copy_(0, at, rows.to(torch.int32))
        row_pos.index_copy_(0, rows, at)
        out = winners[held_row.index_select(0, winners) >= 0]
        pending = pending[:, ~won]
        if out.numel():
            displaced = _displaced(held_key[out], held_row[out], target[out], seed, keys.numel())
            pending = torch.cat([pending, displaced], 1)
    return not pending.shape[1]


def _displaced(
    ids: torch.Tensor, rows: torch.Tensor, at: torch.Tensor, seed: int, num_keys: int
) -> torch.Tensor:
    """Pending state of occupants pushed out of hash slots `at`: they kick at the choice
    after the one they held, so a chain does not bounce between two slots."""
    choices = _choices(hash64(ids, seed), num_keys)
    kick = choices[0]
    for j in reversed(range(CHOICES)):
        kick = torch.where(at == choices[j], choices[(j + 1) % CHOICES], kick)
    return torch.stack([ids, rows.to(torch.int64), *choices, kick])


def lowest(
    live: torch.Tensor,
    protect: torch.Tensor,
    scores: list[torch.Tensor],
    target: int,
    num_live: int,
    native: bool,
) -> torch.Tensor:
    """The `target` live rows lowest by (scores..., slot), exactly, in ascending slot order
    (so that the free list does not depend on how they were found), never one of the
    rows in `protect` (-1 entries ignored); `num_live` is the map's live row count.

    In torch ops the protected rows are marked dead for the selection.
    """
    if native:
        return torch.ops.recsys_idmap.lowest(live, protect, scores, target)
    used = protect[protect >= 0]
    live.index_fill_(0, used, False)
    rows, bound = _candidates(live, scores[0], target, num_live)
    live.index_fill_(0, used, True)
    target = min(target, rows.numel())
    chosen = []
    for score in scores:
        if target in (0, rows.numel()):
            break
        value = score.index_select(0, rows)
        if bound is not None and int((value < bound).sum()) < target:
            kth = bound  # every value is <= bound, so the target-th smallest is bound
        else:
            kth = value.kthvalue(target).values
        below = value < kth
        chosen.append(rows[below])
        target -= int(below.sum())
        rows, bound = rows[value == kth], None
    chosen.append(rows[:target])
    return torch.cat(chosen).sort().values


def _candidates(
    live: torch.Tensor, score: torch.Tensor, target: int, num_live: int
) -> tuple[torch.Tensor, int | None]:
    """Live rows with `score <= bound`, a bound from a strided sample that ~1.2x `target`
    rows fall under, so the exact selection skips most rows; all live rows (and no bound)
    if too few fall under.
    """
    stride = max(1, live.numel() // SAMPLE)
    sample = score[::stride][live[::stride]]
    fraction = target / max(1, num_live)
    if fraction < 1 and sample.numel():
        k = min(sample.numel(), int(1.2 * fraction * sample.numel()) + 16)
        bound = int(sample.kthvalue(k).values)
        rows = (live & (score <= bound)).nonzero().squeeze(1)
        if rows.numel() >= target:
            return rows, bound
    return live.nonzero().squeeze(1), None


def touch(
    last_seen: torch.Tensor,
    counts: torch.Tensor,
    slots: torch.Tensor,
    now: int | torch.Tensor,
    served: int,
    native: bool,
) -> None:
    """Stamp the last-seen time and count one access on every row the batch used (`slots`,
    -1 for none; `served` of them are rows); per-ID times keep each row's latest."""
    if native:
        times = now.reshape(-1) if isinstance(now, torch.Tensor) else torch.tensor([now])
        torch.ops.recsys_idmap.touch(last_seen, counts, slots, times.long())
        return
    rows = slots if served == slots.numel() else slots[slots >= 0]
    if isinstance(now, torch.Tensor) and now.numel() > 1:
        times = now.reshape(-1).to(torch.int64)
        times = times if served == slots.numel() else times[slots >= 0]
        last_seen.scatter_reduce_(0, rows, times, "amax")
    else:
        last_seen.index_fill_(0, rows, int(now))
    counts.scatter_add_(0, rows, torch.ones_like(rows))
