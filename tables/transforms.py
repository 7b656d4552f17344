"""ID transforms: raw 64-bit IDs -> table rows, as torch ops over whole ID tensors.

A transform is an `nn.Module` whose state (a vocabulary, hash parameters) lives in buffers,
so it travels in checkpoints and exports with the table it serves.
"""

from __future__ import annotations

import torch
from torch import nn


class ModuloHash(nn.Module):
    """The hashing trick: row = raw ID mod rows (non-negative for negative IDs too)."""

    def __init__(self, num_rows: int) -> None:
        super().__init__()
        self.num_rows = num_rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.remainder(ids, self.num_rows)

    def extra_repr(self) -> str:
        return f"num_rows={self.num_rows}"


class VocabularyLookup(nn.Module):
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

    @property
    def num_rows(self) -> int:
        return int(self.ids.numel()) + 1

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ids.numel() == 0:
            return torch.zeros_like(ids)
        pos = torch.searchsorted(self.ids, ids).clamp_(max=self.ids.numel() - 1)
        found = self.ids[pos] == ids
        return torch.where(found, pos + 1, self.OOV_ROW)

    def extra_repr(self) -> str:
        return f"vocabulary={self.ids.numel()}"
