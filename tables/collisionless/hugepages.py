"""Large CPU arrays backed by transparent huge pages where Linux offers them.

The ID map's arrays (hash keys and values, per-row times and counts) are hundreds of MB
read and written at random, so with 4 KiB pages almost every access also misses the
TLB. Advising `MADV_HUGEPAGE` on a fresh allocation, before anything touches it, lets
the kernel fault it in as 2 MiB pages when THP is in `madvise` mode (a common default).
It is advice only: elsewhere, or if the kernel declines, the array is an ordinary one.
torch can do the same for every allocation of a process (`THP_MEM_ALLOC_ENABLE=1`); this
does it for the map's arrays alone.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

import torch

MADV_HUGEPAGE = 14
HUGE_PAGE = 1 << 21
MIN_BYTES = 4 * HUGE_PAGE  # smaller arrays fit the TLB's reach well enough


def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _madvise()


def full(numel: int, value: int | bool, dtype: torch.dtype) -> torch.Tensor:
    """`torch.full((numel,), value)`, with its whole 2 MiB pages advised as huge pages."""
    out = torch.empty(numel, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    if _MADVISE is not None and nbytes >= MIN_BYTES:
        start = -(-out.data_ptr() // HUGE_PAGE) * HUGE_PAGE
        end = (out.data_ptr() + nbytes) // HUGE_PAGE * HUGE_PAGE
        _MADVISE(start, end - start, MADV_HUGEPAGE)  # a refusal leaves 4 KiB pages
    return out.fill_(value)
