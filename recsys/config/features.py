"""The `features:` section: which columns of the log are read, and as what."""

from __future__ import annotations

from pydantic import Field, model_validator

from recsys.config.base import Named, Strict


class DenseFeature(Named):
    # Value for a null cell; None makes a null bad input (error or skip, per data.on_bad_rows).
    fill_null: float | None = None
    # log(1 + x) for x > 0 (values <= 0 kept): the usual treatment of Criteo's heavy-tailed counts.
    log: bool = False


class SparseFeature(Named):
    """A categorical feature of raw 64-bit IDs: `int64` (single) or `list<int64>` (multi)."""

    multi_valued: bool = False
    # Raw IDs are often hashes that use the whole int64 range; by default negatives are rejected.
    allow_negative: bool = False
    # A null cell (or null list) becomes "no IDs for this row" (length 0 in the jagged tensor).
    allow_null: bool = False


class SequenceFeature(Strict):
    """A behaviour history column (`list<int64>`), looked up in the table of its `target`."""

    name: str
    target: str  # the sparse feature of the candidate item it is compared with
    allow_null: bool = False


class FeaturesConfig(Strict):
    label: str = "label"
    user_id: str | None = "user_id"
    timestamp: str = "timestamp"
    dense: list[DenseFeature] = Field(default_factory=list)
    sparse: list[SparseFeature] = Field(default_factory=list)
    sequences: list[SequenceFeature] = Field(default_factory=list)
    # Optional list<int64> of event times aligned with the sequence columns.
    sequence_timestamps: str | None = None

    @model_validator(mode="after")
    def _unique_columns(self) -> FeaturesConfig:
        names = [self.label, self.timestamp, *(f.name for f in self.dense)]
        names += [f.name for f in self.sparse] + [s.name for s in self.sequences]
        if self.user_id and self.user_id not in {f.name for f in self.sparse}:
            names.append(self.user_id)
        if self.sequence_timestamps:
            names.append(self.sequence_timestamps)
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise ValueError(f"column {name!r} is declared twice")
            seen.add(name)
        sparse = {f.name for f in self.sparse}
        for f in self.sparse:
            if f.name == self.user_id and f.multi_valued:
                raise ValueError(f"sparse feature {f.name!r} is the user_id column: single-valued")
        for seq in self.sequences:
            if seq.target not in sparse:
                raise ValueError(
                    f"sequence {seq.name!r}: target {seq.target!r} is not a sparse feature"
                )
        return self

    def column_names(self) -> list[str]:
        """Every column read, once (user_id may also be a sparse feature)."""
        cols = [self.label, self.timestamp]
        if self.user_id and self.user_id not in {f.name for f in self.sparse}:
            cols.append(self.user_id)
        cols += [f.name for f in self.dense] + [f.name for f in self.sparse]
        cols += [s.name for s in self.sequences]
        if self.sequence_timestamps:
            cols.append(self.sequence_timestamps)
        return cols
