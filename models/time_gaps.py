"""Time-gap features of behaviours: how long before its impression each behaviour happened.

The time-position field says where a behaviour sits in the history; the gap says when, which
is what tells a burst of clicks an hour ago from the same clicks last year (TWIN, Chang et al.
2023, feeds such gaps into its attention). A gap is the impression's timestamp minus the
behaviour's, in the log's seconds, bucketed on a log2 scale: bucket 0 for a gap <= 0 (a
behaviour logged at or after its impression), bucket b for 2^(b-1) <= gap < 2^b, the last
bucket for anything longer. A sequence model embeds the bucket in a small dense table of its
attention width and adds it to the attention keys, so the gap shifts which behaviours are
attended to, not the vectors that are aggregated.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

TIME_GAP_BUCKETS = 32  # 2^30 s is 34 years: the last bucket holds every longer gap


def time_gap_buckets(gaps: Tensor, buckets: int = TIME_GAP_BUCKETS) -> Tensor:
    """[N] int64 gaps in seconds -> [N] bucket in 0..buckets-1 (see the module docstring).

    Counting the powers of two 1, 2, 4, ... that do not exceed the gap is floor(log2) + 1,
    exact on integers, where a float log2 rounds near the powers of two."""
    bounds = 2 ** torch.arange(buckets - 1, device=gaps.device, dtype=torch.int64)
    return torch.searchsorted(bounds, gaps.to(torch.int64), right=True)


class TimeGapEmbedding(nn.Module):
    """Gap buckets -> [N, width] vectors, zero at first: a fresh model with gaps scores as
    the same model without them, and learns the gaps' effect from there."""

    def __init__(self, width: int, buckets: int = TIME_GAP_BUCKETS) -> None:
        super().__init__()
        self.table = nn.Embedding(buckets, width)
        nn.init.zeros_(self.table.weight)

    def forward(self, gaps: Tensor) -> Tensor:
        return self.table(time_gap_buckets(gaps, self.table.num_embeddings))


def with_time_gaps(keys: Tensor, gaps: Tensor | None, embedding: TimeGapEmbedding | None) -> Tensor:
    """Attention keys [N, width] plus their gaps' embeddings; the keys themselves for a model
    built without gaps."""
    if embedding is None:
        return keys
    if gaps is None:
        raise ValueError("the model was built with time gaps: SequenceInputs.gaps is required")
    return keys + embedding(gaps)
