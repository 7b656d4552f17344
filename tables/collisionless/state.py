"""Checkpoints of collisionless tables: one file per table and shard held here.

The ID maps are per-rank state, kept out of the module's parameters and buffers (DDP never
broadcasts them, DCP never deduplicates them across ranks): `save_id_maps` writes one file
per table and shard next to the checkpoint's DCP files, `load_id_maps` reads them back.

Restoring onto another number of workers (or another capacity) moves whole buckets: each
live ID goes to the rank that now owns its bucket, with its last-seen time, count and
touched step, into the next free slot of that rank's new map (in the order of the old
global rows); `load_id_maps` returns the (old row, new row) pairs so the checkpoint loader
can move the table rows and their optimizer state (`pipelines.train.checkpoint`). The frequency
filter counts per bucket (`BucketedCountMinSketch`), so the ranks' sketches are slices of
one global sketch and are re-sliced exactly. A rank that cannot hold the live rows of its
new buckets stops the restore with an error; nothing is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from tables.collisionless.idmap import IdMap
from tables.collisionless.ownership import bucket_range, owner_of
from tables.collisionless.transform import (
    CollisionlessTransform,
    TableCounters,
    collisionless_transforms,
)

ID_MAP_DIR = "id_maps"
STATE_FORMAT = 2  # of the per-shard files: 2 = filter counted per bucket, counters kept


class RowMoves(NamedTuple):
    """A table restored onto another layout: per live ID held here, its global row in the
    checkpoint's table (`old`) and in this one (`new`)."""

    old: torch.Tensor
    new: torch.Tensor


def _shard_state(transform: CollisionlessTransform, shard: int) -> dict[str, Any]:
    """What a checkpoint keeps of one shard; the counters since the last report go with
    the lowest shard held here, so summing all files counts them once."""
    part = transform.shards[shard]
    counters = transform.counters if shard == min(transform.shards) else TableCounters()
    return {
        "format": STATE_FORMAT,
        "num_shards": transform.num_shards,
        "capacity": transform.capacity,
        "buckets": transform.buckets,
        "bucket_width": transform.bucket_width,
        "idmap": part.idmap.state_dict(),
        "filter": part.filter.state_dict(),
        "touched": part.touched,
        "last_pass": transform.last_pass,
        "steps": transform.steps,
        "counters": asdict(counters),
    }


def _adopt(transform: CollisionlessTransform, state: dict[str, Any], source: Path) -> None:
    """Take the saved clock and filter layout; refuse files this code cannot read."""
    if state.get("format") != STATE_FORMAT:
        raise ValueError(
            f"{source}: ID map format {state.get('format', 1)}, this code reads "
            f"{STATE_FORMAT} (filter counted per bucket); retrain or use that version"
        )
    if state["buckets"] != transform.buckets:
        raise ValueError(
            f"{source}: table {transform.name!r} was trained with {state['buckets']} buckets, "
            f"the config has {transform.buckets}; buckets are fixed for the life of the data"
        )
    transform.resume(state["bucket_width"], state["last_pass"], state["steps"])


def _load_shards(
    transform: CollisionlessTransform, states: dict[int, tuple[dict[str, Any], Path]]
) -> None:
    """Restore the shards held here from a checkpoint of the same layout:
    {shard: (its saved state, its file)}."""
    transform.counters = TableCounters()
    for shard, (state, source) in states.items():
        _adopt(transform, state, source)
        part = transform.new_shard(shard)
        part.idmap.load_state_dict(state["idmap"])
        part.filter.load_state_dict(state["filter"])
        part.touched = state["touched"]
        transform.shards[shard] = part
        transform.counters += TableCounters.from_dict(state["counters"])


def _reshard(
    transform: CollisionlessTransform, states: Iterator[tuple[dict[str, Any], Path]]
) -> RowMoves:
    """Restore the shards held here from a checkpoint of another layout (every saved
    shard, in shard order; read one at a time). Each live ID goes to the owner of its
    bucket here, in the order of its old global row; the filter's global sketch is
    re-sliced; each saved shard's counters go to the owner of its first bucket.

    Raises ValueError, on every rank alike, if any rank here cannot hold the live rows
    of its buckets.
    """
    ids, old_rows, seen, counts, touched, sketches = [], [], [], [], [], []
    transform.counters = TableCounters()
    clocks, saved_shards = set(), 0
    for shard, (state, source) in enumerate(states):
        _adopt(transform, state, source)
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
        first = torch.tensor([bucket_range(shard, transform.buckets, saved_shards)[0]])
        if int(owner_of(first, transform.buckets, transform.num_shards)) in transform.shards:
            transform.counters += TableCounters.from_dict(state["counters"])
    if len(clocks) != 1:
        raise ValueError(f"table {transform.name!r}: the saved shards disagree on the clock")
    all_ids, all_rows = torch.cat(ids), torch.cat(old_rows)
    all_seen, all_counts, all_touched = torch.cat(seen), torch.cat(counts), torch.cat(touched)
    owner = transform.owner(all_ids)
    needed = torch.bincount(owner, minlength=transform.num_shards)
    for rank in (needed > transform.capacity).nonzero().flatten().tolist():
        raise ValueError(
            f"table {transform.name!r}: restoring {saved_shards} workers' checkpoint onto "
            f"{transform.num_shards}, rank {rank} needs {int(needed[rank])} rows for the live "
            f"IDs of its buckets but its capacity is {transform.capacity}; raise capacity to "
            f"at least {int(needed.max())} or use more workers"
        )
    sketch = torch.cat(sketches, 1) if sketches else None
    old, new = [], []
    for rank in sorted(transform.shards):
        part = transform.new_shard(rank)
        at = (owner == rank).nonzero().squeeze(1)
        slots = part.idmap.restore_rows(all_ids[at], all_seen[at], all_counts[at])
        part.touched.index_copy_(0, slots, all_touched[at])
        if sketch is not None and part.filter.sketch is not None:
            first, end = bucket_range(rank, transform.buckets, transform.num_shards)
            width = transform.bucket_width
            part.filter.sketch.counters.copy_(sketch[:, first * width : end * width])
        transform.shards[rank] = part
        old.append(all_rows[at])
        new.append(slots + rank * transform.capacity)
    return RowMoves(torch.cat(old), torch.cat(new))


def save_id_maps(model: nn.Module, directory: Path) -> None:
    """One file per table and shard held here, next to the DCP files of the checkpoint."""
    for transform in collisionless_transforms(model):
        folder = directory / ID_MAP_DIR
        folder.mkdir(parents=True, exist_ok=True)
        for s in transform.shards:
            torch.save(_shard_state(transform, s), folder / f"{transform.name}.{s}.pt")


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
            _load_shards(transform, held)
        else:
            saved = (first if s == 0 else _read(f) for s, f in enumerate(files))
            moved = _reshard(transform, saved)
            moves |= dict.fromkeys(transform.storage_tables, moved)
    return moves


def table_weight_key(state_dict: dict[str, Any], table: str) -> str:
    """The model state-dict key of a collisionless table's rows (found next to its
    transform's default embedding, so any wrapping prefix is kept)."""
    suffix = f"transforms.{table}.default"
    (key,) = (k for k in state_dict if k.endswith(suffix))
    return f"{key[: -len(suffix)]}ebc.embedding_bags.{table}.weight"
