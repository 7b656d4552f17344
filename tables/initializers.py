"""How a table's rows start: one function of (seed, table, row), whatever holds the rows.

`RowInit` is the `init_fn` of a table's torchrec config. An unsharded collection calls it on
the whole table; a sharded one calls it on each local shard, which does not say where in
the table it sits (every shard would draw the table's first rows), so it leaves those alone
and `tables.sharding.shard_model` writes each local shard's own rows (`fill`, by offset).
A table is drawn by blocks of `BLOCK_ROWS` full-width rows, each block from its own
generator seeded by (seed, table, block): a row-wise, column-wise or data-parallel shard
holds exactly the rows of the whole table, on any number of workers, and no global RNG is
consumed, so the dense layers start alike however the tables are built.

A collisionless table gives rows to IDs as they arrive; `RowInit.rows_of` draws a row from
the same distribution as a pure function of the ID (hashed, Box-Muller for the normal), so
that any rank, and a resumed run, starts an ID's row alike.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from torchrec.distributed.composable.table_batched_embedding_slice import (
    TableBatchedEmbeddingSlice,
)

from recsys.config import NormalInit, UniformInit
from recsys.hashing import hash64 as salted_hash
from recsys.hashing import mix64_int, to_int64

BLOCK_ROWS = 4096
_ID_SEED = 0x1717  # the ID hash; the collisionless rows' bits of earlier releases
_MASK53 = (1 << 53) - 1


def _hash(ids: torch.Tensor, seed: int) -> torch.Tensor:
    return salted_hash(ids, to_int64(mix64_int(seed + 1)))


def table_seed(seed: int, table: str) -> int:
    """A table's own seed from the run's (`train.seed`) and its name, stable across
    processes (Python's `hash` of a string is not)."""
    return mix64_int((seed << 32) ^ zlib.crc32(table.encode()))


@dataclass(frozen=True)
class RowInit:
    """N(0, scale^2) (`normal`) or U(-scale, scale) (`uniform`) rows, drawn from `seed`."""

    distribution: str
    scale: float
    seed: int = 0

    def __post_init__(self) -> None:
        if self.distribution not in ("normal", "uniform"):
            raise ValueError(f"distribution {self.distribution!r}: use normal or uniform")
        if not self.scale > 0:
            raise ValueError(f"init scale must be positive, got {self.scale}")

    @classmethod
    def of(cls, config: NormalInit | UniformInit, rows: int, seed: int, table: str) -> RowInit:
        """From a table's `init` config: `rows` sizes torchrec's default bound
        sqrt(1 / rows) of a `uniform` without `bound`."""
        if isinstance(config, NormalInit):
            scale = config.std
        else:
            scale = config.bound if config.bound is not None else math.sqrt(1.0 / rows)
        return cls(config.distribution, scale, table_seed(seed, table))

    def __call__(self, weight: torch.Tensor) -> None:
        """torchrec's `init_fn`: the whole table. A sharded collection's local shard (or
        its empty placeholder on a rank without one) is left to `shard_model`."""
        if not isinstance(weight, TableBatchedEmbeddingSlice) and weight.numel():
            self.fill(weight)

    @torch.no_grad()
    def fill(
        self, weight: torch.Tensor, first_row: int = 0, first_col: int = 0, width: int = 0
    ) -> None:
        """Write the block of the table at rows `first_row`.., columns `first_col`.. into
        `weight` (a shard, or the table), of a table `width` columns wide (default: the
        block's)."""
        rows, cols = weight.shape
        width = width or cols
        end = first_row + rows
        for block in range(first_row // BLOCK_ROWS, -(-end // BLOCK_ROWS)):
            lo = max(first_row, block * BLOCK_ROWS)
            hi = min(end, (block + 1) * BLOCK_ROWS)
            start = block * BLOCK_ROWS
            part = self._block(block, width)[lo - start : hi - start, first_col : first_col + cols]
            weight[lo - first_row : hi - first_row].copy_(part)

    def _block(self, block: int, width: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(mix64_int(self.seed + block) >> 1)
        out = torch.empty(BLOCK_ROWS, width)
        if self.distribution == "normal":
            return out.normal_(0.0, self.scale, generator=generator)
        return out.uniform_(-self.scale, self.scale, generator=generator)

    def rows_of(self, ids: torch.Tensor, dim: int) -> torch.Tensor:
        """[len(ids), dim] float32 rows, a pure function of each ID and the seed."""
        per_id = _hash(ids.reshape(-1).to(torch.int64) ^ to_int64(self.seed), _ID_SEED)
        cells = per_id.unsqueeze(1) + torch.arange(dim)
        unit = self._units(cells, _ID_SEED + 1)
        if self.distribution == "uniform":
            return ((2.0 * unit - 1.0) * self.scale).to(torch.float32)
        radius = torch.sqrt(-2.0 * torch.log1p(-unit))  # 1 - unit in (0, 1]
        angle = (2.0 * math.pi) * self._units(cells, _ID_SEED + 2)
        return (radius * torch.cos(angle) * self.scale).to(torch.float32)

    @staticmethod
    def _units(cells: torch.Tensor, seed: int) -> torch.Tensor:
        """Uniform [0, 1) float64 of 53 hashed bits per cell."""
        bits = _hash(cells.contiguous(), seed)
        return ((bits >> 11) & _MASK53).to(torch.float64) / float(1 << 53)
