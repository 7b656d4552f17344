"""Seeded 64-bit hashing of int64 ID tensors, stable across processes, machines and devices.

It lives in `recsys` because it is part of the export contract: hashed table variants
write their salts to the manifest, and the serving loader, which imports nothing from
`tables`, must compute the very same rows from raw IDs.

The mixer is the splitmix64 finalizer (Stafford's "Mix13"). fbgemm-gpu-cpu 1.8 does ship
`fbgemm::murmur_hash3`, but it takes a single value per call (it serves zero-collision
tables) and fails on CPU for larger inputs, so the mixer is written here in whole-tensor
int64 ops instead. torch has no
`uint64` shift or remainder on CPU, so the arithmetic is done in int64: multiplication
wraps modulo 2**64 in two's complement and a logical right shift is an arithmetic shift
with the sign-extended bits masked off. `mix64_int` is the same function on Python
integers; it derives salts and lets tests check the tensor version bit for bit.
"""

from __future__ import annotations

import torch

MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB
_SHIFTS = (30, 27, 31)
_CHUNK = 1 << 17  # 1 MiB of int64, plus as much scratch


def to_int64(value: int) -> int:
    """Reinterpret the low 64 bits of a Python integer as a signed int64."""
    value &= MASK64
    return value - (1 << 64) if value >> 63 else value


def mix64_int(value: int) -> int:
    """splitmix64 finalizer on the low 64 bits of `value`; returns an unsigned 64-bit int."""
    z = value & MASK64
    z = ((z ^ (z >> _SHIFTS[0])) * _MUL1) & MASK64
    z = ((z ^ (z >> _SHIFTS[1])) * _MUL2) & MASK64
    return z ^ (z >> _SHIFTS[2])


def mix64_(z: torch.Tensor) -> torch.Tensor:
    """In place: the splitmix64 finalizer on an int64 tensor, a bijection with full avalanche.

    Works through cache-sized chunks with one reused scratch tensor: the finalizer is eight
    elementwise passes, and on CPU a fresh multi-megabyte tensor per pass (page faults,
    trips to memory) costs several times the arithmetic.
    """
    if z.dtype != torch.int64:
        raise TypeError(f"hashing needs int64 IDs, got {z.dtype}")
    if not z.is_contiguous():
        raise ValueError("mix64_ works on contiguous tensors")
    flat = z.view(-1)
    scratch = torch.empty(min(flat.numel(), _CHUNK), dtype=torch.int64, device=z.device)
    for chunk in flat.split(_CHUNK):
        tmp = scratch[: chunk.numel()]
        for shift, multiplier in zip(_SHIFTS, (_MUL1, _MUL2, None), strict=True):
            # chunk ^= chunk >>> shift: an arithmetic shift, sign-extended bits masked off.
            torch.bitwise_right_shift(chunk, shift, out=tmp)
            chunk.bitwise_xor_(tmp.bitwise_and_((1 << (64 - shift)) - 1))
            if multiplier is not None:
                chunk.mul_(to_int64(multiplier))
    return z


def mix64(x: torch.Tensor) -> torch.Tensor:
    """`mix64_` on a copy of `x`."""
    return mix64_(x.clone(memory_format=torch.contiguous_format))


def hash64(ids: torch.Tensor, salt: int | torch.Tensor) -> torch.Tensor:
    """Salted 64-bit hash: mix64(ids XOR salt).

    `salt` is a signed int64 (a Python int or a tensor broadcastable to `ids`, one salt per
    ID). Salts from `derive_salt` are themselves well mixed, so distinct salts give
    unrelated hash functions, and for one salt distinct IDs never share a 64-bit hash.
    """
    return mix64_(torch.bitwise_xor(ids, salt).contiguous())


def bucket(
    ids: torch.Tensor, salt: int | torch.Tensor, num_buckets: int | torch.Tensor
) -> torch.Tensor:
    """Rows in [0, num_buckets): the salted hash, taken modulo with a non-negative result.

    The remainder is of the signed hash; with 2**64 hash values the bias towards low rows is
    below num_buckets / 2**63.
    """
    return hash64(ids, salt).remainder_(num_buckets)


def derive_salt(feature_index: int, probe: int, seed: int = 0) -> int:
    """The salt of (feature, probe), a signed int64 fixed by the three integers alone.

    Uses no Python `hash()` (randomized per process), so lookups survive restarts and
    export; `seed` gives a whole new family of hash functions for every feature at once.
    """
    if not (0 <= feature_index < 1 << 32 and 0 <= probe < 1 << 32):
        raise ValueError("feature_index and probe must lie in [0, 2**32)")
    key = (feature_index << 32) | probe
    return to_int64(mix64_int(key ^ mix64_int(seed + _GOLDEN)))
