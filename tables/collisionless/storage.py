"""Where a collisionless table's rows live: this rank's block of the torchrec table's
weights and of its optimizer state, found in the collection that holds the table."""

from __future__ import annotations

import torch
from torch import nn


def table_storage(ebc: nn.Module, table: str) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """(weight rows, optimizer state tensors, first global row) of this rank's block.

    A sharded collection exposes its local shard as views of the fbgemm TBE's weights and
    of its fused optimizer's state, so writing them writes the kernel's own storage.
    """
    state = ebc.state_dict()
    key = f"embedding_bags.{table}.weight"  # an `EmbeddingCollection` names it `embeddings`
    weight = state[key if key in state else f"embeddings.{table}.weight"]
    if not hasattr(weight, "local_shards"):
        return weight, [], 0
    (shard,) = weight.local_shards()
    first_row = shard.metadata.shard_offsets[0]
    states = []
    for per_param in ebc.fused_optimizer.state.values():  # type: ignore[union-attr]
        for key, value in per_param.items():
            if key.startswith(f"{table}."):
                states += [s.tensor for s in value.local_shards()]
    return shard.tensor, states, first_row


def collection_of(sparse: nn.Module, table: str) -> nn.Module:
    """The torchrec collection holding `table`: `sparse.ebc`, or `sparse.collection_of`
    where a layer has several (optembed's)."""
    of = getattr(sparse, "collection_of", None)
    return of(table) if of is not None else sparse.ebc  # type: ignore[return-value]
