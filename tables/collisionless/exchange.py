"""Raw IDs -> global rows by their owners: the ID exchange between ranks.

Every rank sends its batch's IDs (and event times) of all collisionless tables to their
owners with one gloo `all_to_all`; owners expire, filter, admit and evict
(`CollisionlessTransform.serve`) and answer with global rows (-1 where an ID has no row);
the rows come back. Unsharded (evaluation, export) a table holds every shard and routes
locally, read-only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tables.collisionless.transform import NO_TIME, CollisionlessTransform


def _owners(transforms: list[CollisionlessTransform], ids: list[torch.Tensor]) -> torch.Tensor:
    """The owning rank of every table's IDs, concatenated: one ownership hash over all
    tables when they share their bucket and shard counts (the usual case), else one per
    table."""
    if len({(t.buckets, t.num_shards) for t in transforms}) == 1:
        return transforms[0].owner(torch.cat(ids))
    return torch.cat([t.owner(i) for t, i in zip(transforms, ids, strict=True)])


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
        transform.advance_clock(now)
        at = (inbox[:, 0] == k).nonzero().squeeze(1)
        rows = transform.serve(transform.rank, inbox[at, 1], inbox[at, 2])  # type: ignore[arg-type]
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
    of the local batch (`NO_TIME` for none)."""
    if all(t.group is None for t in transforms):
        triples = zip(transforms, ids, times, strict=True)
        return [t.rows_local(i, ts, now) for t, i, ts in triples]
    return _exchange(transforms, ids, times, now)


def route_tables(
    tables: list[tuple[CollisionlessTransform, KeyedJaggedTensor]],
    event_times: torch.Tensor | None,
) -> list[tuple[KeyedJaggedTensor, torch.Tensor]]:
    """Per table, its features' raw IDs -> (the lookup's input, per bag the number of IDs
    reading the default), with one exchange between ranks for all tables (bound tables
    share one group), not one per table.

    `event_times` holds one time per sample (the batch's timestamps). Each output keeps
    its features as keys; IDs without a row are left out of their bags. Counts are
    key-major, `[len(keys) * stride]`, like the lengths.
    """
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
    now = int(event_times.max()) if event_times is not None and event_times.numel() else NO_TIME
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
