"""Ownership of raw IDs by rank: ID -> bucket by a stable hash, bucket -> rank by range.

Buckets, not ranks, are the unit of ownership: `bucket_of` never depends on the world size,
and `owner_of` gives each rank a contiguous range of buckets, so going from W to 2W ranks
splits every range in two and moves whole buckets; no ID is rehashed.

`hash64` is `recsys.hashing`'s salted splitmix64 with a salt per seed. Ownership, the ID
map and the frequency filter each hash with their own seed, so the bits that pick a rank
are independent of the bits that pick a hash slot (otherwise every ID on a rank would land
in the same part of that rank's hash array).
"""

from __future__ import annotations

import torch

from recsys.hashing import hash64 as salted_hash
from recsys.hashing import mix64_int, to_int64

OWNERSHIP_SEED = 0x0DDBA11


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's `>>` is arithmetic and would smear the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def hash64(ids: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A bijective, well-mixed int64 -> int64 hash, one independent function per seed."""
    return salted_hash(ids.to(torch.int64), to_int64(mix64_int(seed + 1)))


def bucket_of(ids: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Bucket of each raw ID in [0, num_buckets), fixed for the life of the data."""
    return _shr(hash64(ids, OWNERSHIP_SEED), 1) % num_buckets


def owner_of(buckets: torch.Tensor, num_buckets: int, world_size: int) -> torch.Tensor:
    """Rank owning each bucket: rank r holds the contiguous range `bucket_range(r, ...)`."""
    if world_size > num_buckets:
        raise ValueError(f"{world_size} ranks cannot share {num_buckets} buckets")
    return buckets * world_size // num_buckets


def bucket_range(rank: int, num_buckets: int, world_size: int) -> tuple[int, int]:
    """[start, end) of the buckets `rank` owns; the inverse of `owner_of`."""
    return -(-rank * num_buckets // world_size), -(-(rank + 1) * num_buckets // world_size)
