"""Ownership of raw IDs by rank: ID -> bucket by a stable hash, bucket -> rank by range.

Buckets, not ranks, are the unit of ownership: `bucket_of` never depends on the world size,
and `owner_of` gives each rank a contiguous range of buckets, so going from W to 2W ranks
splits every range in two and moves whole buckets; no ID is rehashed.

`hash64` is the splitmix64 finalizer in wrapping int64 torch arithmetic. Ownership, the ID
map and the frequency filter each hash with their own seed, so the bits that pick a rank
are independent of the bits that pick a hash slot (otherwise every ID on a rank would land
in the same part of that rank's hash array).
"""

from __future__ import annotations

import torch

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64
_MUL1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MUL2 = -7723592293110705685  # 0x94D049BB133111EB
OWNERSHIP_SEED = 0x0DDBA11


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's `>>` is arithmetic and would smear the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def hash64(ids: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A bijective, well-mixed int64 -> int64 hash (splitmix64 of `ids + seed * golden`)."""
    offset = ((seed + 1) * _GOLDEN) % (1 << 64)
    x = ids.to(torch.int64) + (offset - (1 << 64) if offset >= 1 << 63 else offset)
    x = (x ^ _shr(x, 30)) * _MUL1
    x = (x ^ _shr(x, 27)) * _MUL2
    return x ^ _shr(x, 31)


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
