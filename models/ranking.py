"""A ranking model: any pooled-embedding module feeding any CTR dense architecture."""

from __future__ import annotations

import torch
from torch import nn

from recsys.batch import Batch


class RankingModel(nn.Module):
    """`sparse` maps raw-ID features and the samples' event times to pooled embeddings
    (`KeyedTensor`); `dense` maps (dense features, concatenated embeddings) to logits.
    Neither knows the other's kind."""

    def __init__(self, sparse: nn.Module, dense: nn.Module) -> None:
        super().__init__()
        self.sparse = sparse
        self.dense = dense

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.dense(batch.dense, self.sparse(batch.sparse, batch.timestamps).values())
