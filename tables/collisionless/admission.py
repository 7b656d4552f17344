"""Frequency filter: an ID earns a row only after `min_count` sightings (Monolith).

Candidates are counted in a count-min sketch, not in the table, so an ID seen once costs no
row and no per-ID memory: `depth` rows of `width` saturating int32 counters, whatever the
number of distinct IDs. The sketch only over-counts (two IDs sharing a cell in every row), so
its errors are false admissions, which Monolith accepts; an ID is never refused once it has
really been seen `min_count` times.

Probabilistic admission (Monolith's alternative) admits each sighting with probability
`p = 1 - 0.05 ** (1 / min_count)`, so an ID seen `count` times has been admitted with
probability `1 - (1 - p) ** count` (0.95 at `count == min_count`) with no counting at all.
Draws come from a seeded generator kept in the checkpoint, so replays are deterministic.

A `FrequencyFilter` is the `admit_mask` callable of `IdMap.lookup_or_insert`, which passes it
only the IDs missing from the table: IDs that have rows are never counted.

Sharded by ownership, a rank's sketch is `BucketedCountMinSketch`: every ownership bucket has
its own cells, so the ranks' sketches are slices of one global sketch that does not depend on
the world size, and resuming on another number of workers re-slices it exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from tables.collisionless.ownership import bucket_of, hash64

SATURATION = 1 << 30  # counters stop here; one batch adds < 2^30 more, so int32 never wraps
SKETCH_SEED = 0xC0FFEE


class CountMinSketch(nn.Module):
    """Approximate occurrence counts in `depth x width` int32 cells (width a power of two).

    Row r reads cell `(h1 + r * h2) mod width` of one 64-bit hash split in halves (double
    hashing), so `depth` rows cost one hash.
    """

    def __init__(
        self, width: int, depth: int = 4, seed: int = SKETCH_SEED, *, segments: int = 1
    ) -> None:
        super().__init__()
        if width <= 0 or width & (width - 1) or depth <= 0:
            raise ValueError("width must be a power of two and depth positive")
        self.width, self.depth, self.seed = width, depth, seed
        self.register_buffer("counters", torch.zeros(depth, segments * width, dtype=torch.int32))

    def _segment(self, ids: torch.Tensor) -> torch.Tensor | int:
        """Which `width` cells of each row an ID hashes into (one segment here)."""
        return 0

    def _columns(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Cell within the segment per (row, hash): double hashing."""
        low, high = h & 0xFFFFFFFF, ((h >> 32) & 0xFFFFFFFF) | 1
        return (low + rows * high) & (self.width - 1)

    def _cells(self, ids: torch.Tensor) -> torch.Tensor:
        """Flat cell index per (row, ID): `depth x n`."""
        flat = ids.reshape(-1)
        rows = torch.arange(self.depth).unsqueeze(1)
        columns = self._columns(hash64(flat, self.seed), rows)
        columns = columns + self._segment(flat) * self.width
        return columns + rows * self.counters.shape[1]

    def add(self, ids: torch.Tensor) -> torch.Tensor:
        """Count one sighting per entry of `ids`; returns each ID's estimate after adding."""
        if ids.numel() >= SATURATION:
            raise ValueError("batch too large for saturating int32 counters")
        cells = self._cells(ids)
        flat, index = self.counters.view(-1), cells.reshape(-1)
        flat.scatter_add_(0, index, torch.ones_like(index, dtype=torch.int32))
        values = flat.index_select(0, index).clamp_(max=SATURATION)
        flat.index_copy_(0, index, values)
        return values.view(self.depth, -1).amin(0)

    @torch.no_grad()
    def query(self, ids: torch.Tensor) -> torch.Tensor:
        """Estimated count of each ID (never below its true count)."""
        cells = self._cells(ids)
        return (
            self.counters.view(-1).index_select(0, cells.reshape(-1)).view(self.depth, -1).amin(0)
        )

    def state_bytes(self) -> int:
        return self.counters.numel() * self.counters.element_size()


class BucketSpan(NamedTuple):
    """Ownership buckets [first, end) of `total` that a rank holds (see `ownership`)."""

    first: int
    end: int
    total: int


class BucketedCountMinSketch(CountMinSketch):
    """A count-min sketch with `width` cells per row for each ownership bucket of `span`.

    An ID's cells lie in its bucket's segment, so its estimate counts only IDs of its own
    bucket, and the sketch of buckets [first, end) is columns [first * width, end * width)
    of the same sketch over all buckets. A rank's sketch is thus a slice of one global
    sketch whatever the number of ranks: concatenating the ranks' counters in rank order
    and slicing them by the new ranges moves it to another world size, every estimate kept.
    The segment comes from the ownership hash, the cell inside it from the sketch's own, so
    the two are independent. Segments are narrow (a few cells when IDs are few per bucket),
    where double hashing would give every row the same cells: each row takes its own bits of
    the hash instead, while they last. It counts only IDs of its own buckets.
    """

    def __init__(
        self, width: int, span: BucketSpan, depth: int = 4, seed: int = SKETCH_SEED
    ) -> None:
        super().__init__(width, depth, seed, segments=span.end - span.first)
        self.span = span

    def _segment(self, ids: torch.Tensor) -> torch.Tensor:
        return bucket_of(ids, self.span.total) - self.span.first

    def _columns(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        bits = self.width.bit_length() - 1
        if bits * self.depth > 64:
            return super()._columns(h, rows)
        # Bits [r * bits, (r + 1) * bits) for row r; all below bit 64, so the arithmetic
        # shift's sign fill is masked off.
        return (h >> (rows * bits)) & (self.width - 1)


class FrequencyFilter(nn.Module):
    """Admission mask for IDs missing from the table; callable as `admit_mask`.

    Args:
        min_count: sightings needed for a row; 0 or 1 admits everything (Monolith's default).
        width, depth: sketch size (deterministic mode only); bytes = 4 * width * depth.
        probabilistic: Monolith's probabilistic admission instead of counting.
        seed: seed of the probabilistic draws.
        span: count per ownership bucket (`BucketedCountMinSketch`; `width` is then the
            cells per bucket and row).
    """

    def __init__(
        self,
        min_count: int,
        *,
        width: int = 1 << 20,
        depth: int = 4,
        probabilistic: bool = False,
        seed: int = 0,
        span: BucketSpan | None = None,
    ) -> None:
        super().__init__()
        self.min_count = min_count
        self.probabilistic = probabilistic
        self.sketch: CountMinSketch | None = None
        if min_count > 1 and not probabilistic:
            self.sketch = (
                CountMinSketch(width, depth)
                if span is None
                else BucketedCountMinSketch(width, span, depth)
            )
        self.p = 1 - 0.05 ** (1 / min_count) if min_count > 1 else 1.0
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Count these sightings and return, per entry, whether its ID is admitted."""
        flat = ids.reshape(-1)
        if self.min_count <= 1:
            return torch.ones_like(flat, dtype=torch.bool)
        if self.sketch is None:
            return torch.rand(flat.numel(), generator=self.generator) < self.p
        return self.sketch.add(flat) >= self.min_count

    def state_bytes(self) -> dict[str, int]:
        return {"filter": self.sketch.state_bytes() if self.sketch is not None else 0}

    def get_extra_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def extra_repr(self) -> str:
        mode = "probabilistic" if self.probabilistic else "count-min"
        return f"min_count={self.min_count}, mode={mode}"
