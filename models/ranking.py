"""A ranking model: any pooled-embedding module feeding any CTR dense architecture."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys.batch import Batch


class RankingModel(nn.Module):
    """`sparse` maps raw-ID features and the samples' event times to pooled embeddings
    (`KeyedTensor`); `dense` maps (dense features, concatenated embeddings) to logits.
    Neither knows the other's kind.

    `embedding_l2` > 0 adds `lookup_l2` of each training batch to `regularizer()`.
    """

    def __init__(self, sparse: nn.Module, dense: nn.Module, embedding_l2: float = 0.0) -> None:
        super().__init__()
        self.sparse = sparse
        self.dense = dense
        self.embedding_l2 = embedding_l2
        self._penalty: torch.Tensor | None = None

    def table_sharding(self) -> dict[str, str]:
        """Every physical table -> its sharding choice, as the tables were configured."""
        return self.sparse.sharding()

    def forward(self, batch: Batch) -> torch.Tensor:
        pooled = self.sparse(batch.sparse, batch.timestamps)
        if self.training and self.embedding_l2:
            self._penalty = 0.5 * self.embedding_l2 * lookup_l2(batch.sparse, pooled)
        return self.dense(batch.dense, pooled.values())

    def regularizer(self) -> torch.Tensor | None:
        """The loss terms of the last training forward beside the data loss: embedding L2
        and the sparse module's own (OptEmbed's threshold term), or None."""
        terms = [self._penalty] if self._penalty is not None else []
        own = getattr(self.sparse, "regularizer", None)
        term = own() if own is not None else None
        if term is not None:
            terms.append(term)
        self._penalty = None
        return sum(terms[1:], terms[0]) if terms else None


def lookup_l2(features: KeyedJaggedTensor, pooled: KeyedTensor) -> torch.Tensor:
    """Squared norms of the embeddings this batch looked up, each distinct row once.

    A sample whose bag holds one ID pools exactly that ID's row; its term is divided by
    how often the ID occurs in the feature's bags of one, so each distinct ID counts once
    and its row's gradient gains `lambda * w`, what a fused L2 weight decay gives the rows
    a batch touches (fbgemm's CPU kernels ignore weight decay). Rows the batch does not
    read are left alone, unlike FuxiCTR's penalty over whole tables. Longer (and empty)
    bags are penalised as pooled, weighted 1 / batch size.
    """
    embeddings = pooled.to_dict()
    total = pooled.values().new_zeros(())
    for name, ids in features.to_dict().items():
        if name not in embeddings:
            continue
        squares = embeddings[name].pow(2).sum(dim=1)
        weights = torch.full_like(squares, 1.0 / max(len(squares), 1))
        single = ids.lengths() == 1
        if bool(single.any()):
            first = ids.values()[ids.offsets()[:-1][single]]
            _, inverse, counts = torch.unique(first, return_inverse=True, return_counts=True)
            weights[single] = 1.0 / counts[inverse].to(squares.dtype)
        total = total + (squares * weights).sum()
    return total
