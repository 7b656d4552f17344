"""ID transforms: raw 64-bit IDs -> table rows, as torch ops over whole ID tensors.

A transform is an `nn.Module` whose state (a vocabulary, hash parameters) lives in buffers,
so it travels in checkpoints and exports with the table it serves. Every transform is an
`IdTransform`: what the rest of the engine asks a table (which rows serving needs and how
a raw ID finds them, whether its IDs come and go while training runs) it asks this
interface, never the transform's type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass
class ServedRows:
    """The rows of one table that serving reads, and how a raw ID finds them.

    ids: sorted int64, what a reader binary-searches; rows: [len(ids), dim]; lookup: how a
    raw ID becomes an `id` (`id`: itself, `modulo`: mod `num_rows`, `hash`: by the
    transform's `hash_probes`, `position`: a time position); default: the row of IDs with
    none (None: zeros), and `default_row` its row in the trained table if it has one;
    positions: each id's row in the trained table.
    """

    ids: torch.Tensor
    rows: torch.Tensor
    lookup: str
    positions: torch.Tensor
    default: torch.Tensor | None = None
    default_row: int | None = None
    num_rows: int | None = None

    @classmethod
    def every_row(cls, weights: torch.Tensor, lookup: str) -> ServedRows:
        """All rows, the id of each its row number (hashed tables)."""
        rows = torch.arange(weights.shape[0])
        return cls(rows, weights, lookup, rows, num_rows=int(weights.shape[0]))


class IdTransform(nn.Module):
    """The interface of a table's ID transform (see the module docstring)."""

    # Rows belong to IDs admitted while training runs, and change with them (collisionless):
    # an incremental export writes the rows trained since the last one.
    dynamic_ids: ClassVar[bool] = False

    def served_rows(self, table: str, weights: torch.Tensor) -> ServedRows:
        """What serving reads of `table` (one this transform serves), given its weights."""
        raise NotImplementedError

    def count_unknown(self, feature: str, rows: torch.Tensor) -> None:
        """Count, while training, the IDs of `feature` (mapped to `rows`) that have no row
        of their own; most transforms give every ID one."""


def unknown_ids(module: nn.Module) -> dict[str, int]:
    """Per feature, the IDs counted by `IdTransform.count_unknown` in `module` so far."""
    counts: dict[str, int] = {}
    for transform in module.modules():
        for feature, n in getattr(transform, "unknown", {}).items():
            counts[feature] = counts.get(feature, 0) + int(n)
    return counts


class ModuloHash(IdTransform):
    """The hashing trick: row = raw ID mod rows (non-negative for negative IDs too)."""

    def __init__(self, num_rows: int) -> None:
        super().__init__()
        self.num_rows = num_rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.remainder(ids, self.num_rows)

    def served_rows(self, table: str, weights: torch.Tensor) -> ServedRows:
        return ServedRows.every_row(weights, "modulo")

    def extra_repr(self) -> str:
        return f"num_rows={self.num_rows}"


class VocabularyLookup(IdTransform):
    """A fixed vocabulary: row 0 is out-of-vocabulary, known IDs take rows 1..V.

    The vocabulary is kept sorted, so a batch is mapped with one `searchsorted` (binary
    search, O(log V) per ID, no hash table to build) and one gather to confirm the match.
    """

    OOV_ROW = 0

    def __init__(self, vocabulary: torch.Tensor) -> None:
        super().__init__()
        ids = torch.as_tensor(vocabulary, dtype=torch.int64)
        if ids.numel() and not bool((ids[1:] > ids[:-1]).all()):
            raise ValueError("the vocabulary must be sorted and free of duplicates")
        self.register_buffer("ids", ids)
        # IDs read as the OOV row in training, per feature (tensors: no sync per step)
        self.unknown: dict[str, torch.Tensor] = {}

    @property
    def num_rows(self) -> int:
        return int(self.ids.numel()) + 1

    def count_unknown(self, feature: str, rows: torch.Tensor) -> None:
        """IDs out of the vocabulary: below `min_count`, beyond the `num_embeddings` cap,
        or never seen in the training log's vocabulary pass."""
        if self.training:
            n = (rows == self.OOV_ROW).sum()
            self.unknown[feature] = self.unknown[feature] + n if feature in self.unknown else n

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ids.numel() == 0:
            return torch.zeros_like(ids)
        pos = torch.searchsorted(self.ids, ids).clamp_(max=self.ids.numel() - 1)
        found = self.ids[pos] == ids
        return torch.where(found, pos + 1, self.OOV_ROW)

    def served_rows(self, table: str, weights: torch.Tensor) -> ServedRows:
        """The vocabulary's rows; the out-of-vocabulary row is the default."""
        positions = torch.arange(1, self.num_rows)
        oov = self.OOV_ROW
        return ServedRows(self.ids, weights[1:], "id", positions, weights[oov], oov)

    def extra_repr(self) -> str:
        return f"vocabulary={self.ids.numel()}"
