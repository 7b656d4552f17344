"""Serving a sequence model from its export: unpooled lookups in plain torch, then the
exported program over (attention target, attention history, representation target,
representation history, offsets[, other][, gaps= by name]); `other` is the dense features
then the other sparse features' pooled embeddings (`recsys.serving.model.PooledLookup`).

Each field (item, category, time position) reads, per set, the table the manifest names;
vectors are the fields' rows concatenated in manifest order. Time positions are the reverse
positions in the history (0 for the target), capped at the table's last row, as in training.
A program exported with `time_gaps` also takes each behaviour's gap to its impression, from
the log's timestamps, as `gaps`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.batch import Batch
from recsys.serving.schema import SequenceField, SequenceInput

ROLES = ("att", "rep")


class SequenceServing:
    """The lookups and program of an exported sequence model; `tables` maps table names
    to loaded tables (`recsys.serving.model.ServedTable`), checked against `spec` by
    `recsys.serving.manifest`."""

    def __init__(
        self,
        spec: SequenceInput,
        tables: dict[str, Any],
        program: torch.nn.Module,
        pooled: Callable[[KeyedJaggedTensor], torch.Tensor] | None = None,
    ) -> None:
        self.fields: list[SequenceField] = spec.fields
        self.time_positions = spec.time_positions
        self.num_dense = len(spec.dense)
        self.time_gaps = spec.time_gaps
        self.tables = tables
        self.program = program
        self.pooled = pooled  # the other sparse features' embeddings, after the dense ones

    def _rows(self, table: Any, keys: torch.Tensor) -> torch.Tensor:
        return F.embedding(table.rows(keys), table.weights)

    def _keys(self, table: Any, field: SequenceField, raw: torch.Tensor) -> torch.Tensor:
        if table.lookup == "position":
            return raw.clamp(max=self.time_positions - 1)
        (keys,) = table.keys(field.target, raw)
        return keys

    def logits(self, batch: Batch) -> torch.Tensor:
        if batch.sequences is None:
            raise ValueError("a sequence model needs the log's sequence columns")
        targets, histories = batch.sparse.to_dict(), batch.sequences.to_dict()
        lengths = histories[self.fields[0].history].lengths().long()
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        total = int(offsets[-1])
        ends = torch.repeat_interleave(offsets[1:], lengths, output_size=total)
        positions = ends - torch.arange(total)
        sets: dict[str, list[torch.Tensor]] = {}
        for role in ROLES:
            target_parts, history_parts = [], []
            for field in self.fields:
                table = self.tables[getattr(field.tables, role)]
                if table.lookup == "position":
                    raw_target, raw_history = torch.zeros_like(lengths), positions
                else:
                    raw_target = targets[field.target].values()
                    raw_history = histories[field.history].values()
                target_parts.append(self._rows(table, self._keys(table, field, raw_target)))
                history_parts.append(self._rows(table, self._keys(table, field, raw_history)))
            sets[role] = [torch.cat(target_parts, 1), torch.cat(history_parts, 1)]
        inputs = [*sets["att"], *sets["rep"], offsets]
        other = [batch.dense] if self.num_dense else []
        if self.pooled is not None:
            other.append(self.pooled(batch.sparse))
        if other:
            inputs.append(torch.cat(other, dim=1))
        named: dict[str, torch.Tensor] = {}
        if self.time_gaps:
            gaps = batch.time_gaps()
            if gaps is None:
                raise ValueError("this export reads time gaps: the log needs sequence_timestamps")
            named["gaps"] = gaps
        with torch.no_grad():
            return self.program(*inputs, **named)
