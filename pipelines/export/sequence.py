"""`recsys export` for sequence models: their tables and a tensor-only model program.

Every physical sequence table is written like a pooled one (`id` rows sorted, vocabulary
IDs for full tables, the live admitted raw IDs and a default embedding for collisionless
ones, row numbers for hashed and time-position ones) with the field and set
(`att`, `rep` or `both`) it serves, so that a reader rebuilds the attention and
representation vectors, item | category | time, from raw IDs. The model is exported over
plain tensors (`FlatSequenceModel`) with a symbolic batch and history total; the
two-stage search needs a static bound on history lengths, `max_history`. A model that reads
time gaps takes them as its `gaps` input (`time_gaps` in the input spec): the reader derives
them from the log's timestamps as training does (`recsys.batch.Batch.time_gaps`), and the
program buckets and embeds them itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.fx.experimental._config as fx_config

from models.sequence_ranking import FlatSequenceModel, SequenceRankingModel
from recsys.config import ExperimentConfig
from tables.sequence import SequenceTableSpec
from tables.transforms import IdTransform, ServedRows

DEFAULT_MAX_HISTORY = 100_000


# (transform, table, weights, entry) -> (IDs, rows) to write, the entry's lookup fields set:
# all a table serves, or an incremental export's rows (pipelines.export.delta.served_entry)
ServedEntry = Callable[[IdTransform, str, torch.Tensor, dict[str, Any]], tuple[Any, Any]]


def sequence_tables(
    model: SequenceRankingModel, write: Any, dtype: str, served_entry: ServedEntry
) -> list[dict[str, Any]]:
    """Manifest entries of the sequence tables; `write(name, ids, rows)` stores a table,
    `served_entry` picks its rows. Time-position tables (no ID transform) serve every row
    by position."""
    seq = model.sequence
    fields = {seq.table_of(f, r).name: f for f in seq.fields for r in ("att", "rep")}
    entries = []
    for spec in seq.specs:
        field = fields[spec.name]
        weights = _weights(model, spec)
        entry: dict[str, Any] = {
            "name": spec.name,
            "variant": spec.variant,
            "kind": "sequence",
            "role": spec.role,
            "features": [
                k
                for f in seq.fields
                if f.name in _names(seq, spec)
                for k in (f.target_key, f.history_key)
            ],
            "dim": spec.dim,
            "pooling": "none",
            "dtype": dtype,
        }
        if field.transform:
            transform = seq.transforms[field.transform]
            ids, rows = served_entry(transform, spec.name, weights, entry)
        else:
            positions = ServedRows.every_row(weights, "position")
            ids, rows = positions.ids.numpy(), weights.numpy()
            entry.update(lookup="position", num_rows=spec.num_rows)
        entry["rows"] = len(ids)
        entry["bytes"] = int(rows.size * {"float32": 4, "float16": 2, "int8": 1}[dtype])
        entry.update(write(spec.name, ids, rows))
        entries.append(entry)
    return entries


def _names(seq: Any, spec: SequenceTableSpec) -> set[str]:
    """The fields a table serves (several for a shared table)."""
    return {f.name for f in seq.fields for r in ("att", "rep") if seq.table_of(f, r) is spec}


def _weights(model: SequenceRankingModel, spec: SequenceTableSpec) -> torch.Tensor:
    collection = model.sequence.collections[f"d{spec.dim}"]
    return collection.embeddings[spec.name].weight.detach().float()


def sequence_program(
    cfg: ExperimentConfig, model: SequenceRankingModel, max_history: int = DEFAULT_MAX_HISTORY
) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """The model over flat tensors, and the manifest's input spec for it: `other` is the
    dense features, then the other sparse features' pooled embeddings (`sparse`, each
    `feature_dims` wide), as `SequenceRankingModel.inputs` lays it out."""
    seq = model.sequence
    if hasattr(model.model, "max_length"):
        model.model.max_length = max_history
    att, rep = sum(seq.dims["att"]), sum(seq.dims["rep"])
    lengths = [3, 5]
    total = sum(lengths)
    example = [
        torch.zeros(2, att),
        torch.zeros(total, att),
        torch.zeros(2, rep),
        torch.zeros(total, rep),
        torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int64),
    ]
    # Any batch from one row, any number of behaviours from none (a new user's one request).
    batch, n = torch.export.Dim("batch", min=1), torch.export.Dim("total", min=0)
    shapes: dict[str, Any] = {
        "attention_target": {0: batch},
        "attention_history": {0: n},
        "representation_target": {0: batch},
        "representation_history": {0: n},
        "offsets": {0: batch + 1},
    }
    pooled_names = model.pooled.feature_names if model.pooled is not None else []
    pooled_dims = model.pooled.feature_dims if model.pooled is not None else []
    if model.num_dense or pooled_names:
        example.append(torch.zeros(2, model.num_dense + sum(pooled_dims)))
        shapes["other"] = {0: batch}
    # gaps by name: exports made before them (positional dense) are still served alike
    time_gaps = getattr(model.model, "time_gaps", None) is not None
    named = {"gaps": torch.zeros(total, dtype=torch.int64)} if time_gaps else {}
    if time_gaps:
        shapes["gaps"] = {0: n}
    # Size-oblivious tracing keeps the program general at one row and at no behaviour:
    # torch otherwise guards sizes 0 and 1 out, whatever `min` says.
    with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
        program = torch.export.export(
            FlatSequenceModel(model.model).eval(), tuple(example), named, dynamic_shapes=shapes
        )
    spec = {
        "kind": "sequence",
        "dense": [d.name for d in cfg.features.dense],
        "sparse": pooled_names,
        "feature_dims": pooled_dims,
        "fields": [
            {
                "name": f.name,
                "target": f.target_key,
                "history": f.history_key,
                "tables": {r: seq.table_of(f, r).name for r in ("att", "rep")},
            }
            for f in seq.fields
        ],
        "time_positions": seq.time_positions,
        "time_gaps": time_gaps,
        "max_history": max_history,
        "dims": seq.dims,
    }
    return program, spec
