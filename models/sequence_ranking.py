"""A sequence ranking model: sequence tables and any other features feeding a sequence model.

The sequence tables hand over an attention and a representation embedding set (the same
tensors unless the tables are decoupled); dense features and the pooled embeddings of the
remaining sparse features become the model's `other` input. The model itself (DIN, TWIN,
TWIN with projections, DARE) sees `SequenceInputs` only, with the behaviours' time gaps to
their impressions when the log has behaviour timestamps.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from models.sequence import EmbeddingSet, SequenceInputs
from recsys.batch import Batch


class SequenceRankingModel(nn.Module):
    """`sequence`: (sparse, sequences) KJTs and the samples' event times ->
    `tables.sequence.SequenceLookup`; `pooled`:
    optional KJT of the other sparse features -> `KeyedTensor`; `model`: `SequenceInputs`
    -> logits [B]."""

    def __init__(
        self,
        sequence: nn.Module,
        model: nn.Module,
        pooled: nn.Module | None = None,
        num_dense: int = 0,
    ) -> None:
        super().__init__()
        self.sequence = sequence
        self.pooled = pooled
        self.model = model
        self.num_dense = num_dense
        self.pooled_keys = list(pooled.feature_names) if pooled is not None else []

    def table_sharding(self) -> dict[str, str]:
        """Every physical table -> its sharding choice, as the tables were configured."""
        pooled = self.pooled.sharding() if self.pooled is not None else {}
        return {**self.sequence.sharding(), **pooled}

    def regularizer(self) -> Tensor | None:
        """No loss term beside the data loss (embedding L2 is a CTR-model option)."""
        return None

    def inputs(self, batch: Batch) -> SequenceInputs:
        if batch.sequences is None:
            raise ValueError("a sequence model needs a batch with sequence features")
        out = self.sequence(batch.sparse, batch.sequences, batch.timestamps)
        other: list[Tensor] = [batch.dense] if self.num_dense else []
        if self.pooled is not None:
            columns = batch.sparse.to_dict()
            features = KeyedJaggedTensor.from_jt_dict({k: columns[k] for k in self.pooled_keys})
            other.append(self.pooled(features).values())
        return SequenceInputs(
            attention=EmbeddingSet(out.attention_target, out.attention_history),
            representation=EmbeddingSet(out.representation_target, out.representation_history),
            offsets=out.offsets,
            other=torch.cat(other, dim=1) if other else None,
            gaps=batch.time_gaps(),
        )

    def forward(self, batch: Batch) -> Tensor:
        return self.model(self.inputs(batch))


class FlatSequenceModel(nn.Module):
    """A sequence model over plain tensors, for `torch.export`: a served program then takes
    tensors only, and its reader needs no dataclass of this package."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        attention_target: Tensor,
        attention_history: Tensor,
        representation_target: Tensor,
        representation_history: Tensor,
        offsets: Tensor,
        other: Tensor | None = None,
        gaps: Tensor | None = None,
    ) -> Tensor:
        return self.model(
            SequenceInputs(
                EmbeddingSet(attention_target, attention_history),
                EmbeddingSet(representation_target, representation_history),
                offsets,
                other,
                gaps,
            )
        )
