"""Arrow -> `Batch`: the engine's unit of training input, built in bulk from Arrow buffers.

Every column becomes a tensor through numpy views of its Arrow buffers; list columns are
read through their offsets, never row by row. The only copy is the one that lays the
feature's IDs out key-major for torchrec's `KeyedJaggedTensor`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from recsys.config import FeaturesConfig


@dataclass
class Batch:
    """One batch of impressions.

    dense: [B, D] float32; sparse: raw int64 IDs, one key per sparse feature; labels: [B]
    float32 (NaN for unlabelled traffic); timestamps: [B] int64 event times (0 for traffic
    without them, which no served model reads: time gaps make them required); group: [B]
    int64 user IDs (GAUC) or None; sequences: history IDs, one key per sequence feature, or
    None; sequence_timestamps: event times aligned with the histories, or None.
    """

    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor
    timestamps: torch.Tensor
    group: torch.Tensor | None = None
    sequences: KeyedJaggedTensor | None = None
    sequence_timestamps: JaggedTensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    def time_gaps(self) -> torch.Tensor | None:
        """[N] int64 seconds from each behaviour to its impression (the row's timestamp
        minus the behaviour's), aligned with the histories; None without sequence_timestamps.
        """
        if self.sequence_timestamps is None:
            return None
        behaviours = self.sequence_timestamps.values()
        lengths = self.sequence_timestamps.lengths()
        rows = torch.repeat_interleave(self.timestamps, lengths, output_size=behaviours.numel())
        return rows - behaviours

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Copy to a device (the torchrec `Pipelineable` protocol)."""
        moved = {
            f.name: None
            if (v := getattr(self, f.name)) is None
            else v.to(device=device, non_blocking=non_blocking)
            for f in fields(self)
        }
        return replace(self, **moved)

    def record_stream(self, stream: torch.Stream) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                value.record_stream(stream)

    def pin_memory(self) -> Batch:
        pinned = {
            f.name: None if (v := getattr(self, f.name)) is None else v.pin_memory()
            for f in fields(self)
        }
        return replace(self, **pinned)


def _array(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return column


def _ids_and_lengths(column: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
    """(flat int64 IDs, per-row counts) of an int64 or list<int64> column; nulls count 0.

    Counts are None for a single-valued column without nulls (one ID per row)."""
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        if column.null_count:
            values = pc.list_flatten(column)
            lengths = pc.fill_null(pc.list_value_length(column), 0)
            return values.to_numpy(), lengths.to_numpy()
        offsets = column.offsets.to_numpy()
        start, stop = int(offsets[0]), int(offsets[-1])
        return column.values.slice(start, stop - start).to_numpy(), np.diff(offsets)
    if column.null_count:
        valid = pc.is_valid(column).to_numpy(zero_copy_only=False)
        return pc.drop_null(column).to_numpy(), valid.astype(np.int32)
    return column.to_numpy(), None


def jagged_from_columns(columns: list[pa.Array], keys: list[str], stride: int) -> KeyedJaggedTensor:
    """Lay several ID columns out key-major, as `KeyedJaggedTensor` expects, with one copy."""
    parts = [_ids_and_lengths(c) for c in columns]
    total = sum(len(v) for v, _ in parts)
    values = np.empty(total, dtype=np.int64)
    pos = 0
    for v, _ in parts:
        values[pos : pos + len(v)] = v
        pos += len(v)
    lengths = np.ones(stride * len(parts), dtype=np.int32)
    for i, (_, lens) in enumerate(parts):
        if lens is not None:
            lengths[i * stride : (i + 1) * stride] = lens
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(values),
        lengths=torch.from_numpy(lengths),
        stride=stride,
    )


def _numeric(column: pa.Array, dtype: np.dtype, fill: float | None = None) -> np.ndarray:
    if column.null_count and fill is not None:
        column = pc.fill_null(column, fill)
    return column.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


class BatchConverter:
    """Turns Arrow tables/record batches of a validated log into `Batch`es."""

    def __init__(self, features: FeaturesConfig) -> None:
        self.features = features
        self.sparse_keys = [f.name for f in features.sparse]
        self.sequence_keys = [s.name for s in features.sequences]

    def __call__(self, data: pa.Table | pa.RecordBatch) -> Batch:
        f = self.features
        rows = data.num_rows

        def col(name: str) -> pa.Array:
            return _array(data.column(name))

        dense = np.empty((rows, len(f.dense)), dtype=np.float32)
        for j, feature in enumerate(f.dense):
            dense[:, j] = _numeric(col(feature.name), np.float32, feature.fill_null)
            if feature.log:
                np.log1p(dense[:, j], out=dense[:, j], where=dense[:, j] > 0)
        sparse = jagged_from_columns([col(k) for k in self.sparse_keys], self.sparse_keys, rows)
        sequences = None
        if self.sequence_keys:
            sequences = jagged_from_columns(
                [col(k) for k in self.sequence_keys], self.sequence_keys, rows
            )
        seq_times = None
        if f.sequence_timestamps:
            seq_times = jagged_from_columns(
                [col(f.sequence_timestamps)], [f.sequence_timestamps], rows
            )[f.sequence_timestamps]
        names = set(data.schema.names)
        group = None
        if f.user_id and f.user_id in names:
            group = torch.from_numpy(np.array(col(f.user_id).to_numpy(), dtype=np.int64))
        # Absent only in traffic that the contract let through (`traffic_optional`).
        labels = torch.full((rows,), float("nan"))
        if f.label in names:
            labels = torch.from_numpy(_numeric(col(f.label), np.float32))
        timestamps = torch.zeros(rows, dtype=torch.int64)
        if f.timestamp in names:
            timestamps = torch.from_numpy(np.array(col(f.timestamp).to_numpy(), dtype=np.int64))
        return Batch(
            dense=torch.from_numpy(dense),
            sparse=sparse,
            labels=labels,
            timestamps=timestamps,
            group=group,
            sequences=sequences,
            sequence_timestamps=seq_times,
        )
