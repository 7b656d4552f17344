"""Reductions within jagged segments: each user's rows one after the other, never padded.

The sequence models keep histories jagged ([N, d] values with [B + 1] offsets, or a segment
number per row), so that a batch of short histories costs what its rows hold; these are the
softmax and mean they need over such rows.
"""

from __future__ import annotations

import torch
from torch import Tensor


def segment_mean(values: Tensor, offsets: Tensor) -> Tensor:
    """[N, d] jagged values -> [B, d] mean per user; 0 for an empty history."""
    lengths = offsets[1:] - offsets[:-1]
    users = torch.arange(lengths.shape[0], device=values.device)
    rows = torch.repeat_interleave(users, lengths, output_size=values.shape[0])
    sums = values.new_zeros(lengths.shape[0], values.shape[1]).index_add(0, rows, values)
    return sums / lengths.clamp(min=1).unsqueeze(1).to(values.dtype)


def segment_softmax(scores: Tensor, segments: Tensor, count: int) -> Tensor:
    """Softmax of [M] jagged scores within each of `count` segments (`segments`: each
    score's, in 0..count-1). The per-segment max it subtracts is only for range, so it is
    taken without autograd: a softmax does not change with a shift."""
    top = scores.new_full((count,), float("-inf"))
    top = top.scatter_reduce(0, segments, scores.detach(), "amax")
    exp = (scores - top[segments]).exp()
    return exp / exp.new_zeros(count).index_add(0, segments, exp)[segments]


def gather_rows(values: Tensor, rows: Tensor) -> Tensor:
    """`values[rows]` for [N, d] jagged values, an index past the last row reading zeros:
    the slots of short histories, and every slot when the batch holds no behaviour at all
    (one new user's request), where there is no row to read."""
    padded = torch.cat([values, values.new_zeros(1, values.shape[1])])
    return padded[rows.clamp(max=values.shape[0])]
