"""The schema of an export's `manifest.json`: what each field is and which values it takes.

Strict on purpose: JSON types as written (no "8" for 8), unknown keys refused, dtypes,
lookups and poolings from fixed sets, dims positive, every path relative and normalised
(`RelPath`). What ties fields together, and what the files must be, is checked by
`recsys.serving.manifest`, which reads a manifest through this schema first.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    StringConstraints,
    Tag,
)
from pydantic_core import PydanticCustomError

from recsys.config import FeaturesConfig
from recsys.serving.format import DTYPES, FORMAT_VERSION


def _relative_path(path: str) -> str:
    """A path the manifest names: relative to the folder, '/'-separated, normalised."""
    if not path or "\x00" in path or "\\" in path:
        raise PydanticCustomError(
            "export_path", "{path} is not a relative path with '/' separators", {"path": repr(path)}
        )
    if path.startswith("/"):
        raise PydanticCustomError(
            "export_path",
            "{path} is absolute: paths are relative to the export folder",
            {"path": repr(path)},
        )
    parts = path.split("/")
    if ".." in parts:
        raise PydanticCustomError(
            "export_path", "{path} leaves the export folder", {"path": repr(path)}
        )
    if any(part in ("", ".") for part in parts):
        raise PydanticCustomError(
            "export_path", "{path} is not normalised (an empty or '.' part)", {"path": repr(path)}
        )
    return path


RelPath = Annotated[str, AfterValidator(_relative_path)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, StringConstraints(min_length=1)]
Dtype = Literal[DTYPES]  # type: ignore[valid-type]


class _Schema(BaseModel):
    # JSON types as written (no "8" for 8), unknown keys refused: a reader that skipped a
    # field it does not know could serve something other than what was exported.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Probe(_Schema):
    """One hashed lookup: id = (bucket(raw ID, salt, hash_size) // divisor) mod num_rows."""

    salt: int
    hash_size: PositiveInt
    divisor: PositiveInt


class TableEntry(_Schema):
    name: Name
    variant: str
    kind: Literal["sequence"] | None = None
    role: Literal["att", "rep", "both"] | None = None
    storage: str | None = None  # optembed: the variant its rows were cut from
    features: list[Name] = Field(min_length=1)
    dim: PositiveInt
    input_dim: PositiveInt | None = None  # optembed: the width the dense model reads
    pooling: Literal["sum", "mean", "none"]
    dtype: Dtype
    lookup: Literal["id", "modulo", "hash", "position"]
    hash: str | None = None
    num_rows: PositiveInt | None = None
    probes: dict[Name, list[Probe]] | None = None
    default_embedding: list[float] | None = None
    rows: NonNegativeInt
    full_rows: NonNegativeInt | None = None
    bytes: NonNegativeInt
    storage_error: NonNegativeFloat | None = None  # largest change storage made to a value
    id_bytes: NonNegativeInt | None = None
    files: list[RelPath] = Field(min_length=1)
    trained_steps: NonNegativeInt | None = None  # collisionless: what a delta builds on
    delta: bool = False
    deleted: NonNegativeInt | None = None
    deleted_files: Annotated[list[RelPath], Field(min_length=1)] | None = None


class PooledInput(_Schema):
    kind: Literal["pooled"] = "pooled"  # not written: the original input kind
    dense: list[Name]
    sparse: list[Name]
    feature_dims: list[PositiveInt]


class RoleTables(_Schema):
    att: Name
    rep: Name


class RoleDims(_Schema):
    att: list[PositiveInt]
    rep: list[PositiveInt]


class SequenceField(_Schema):
    name: Name
    target: Name
    history: Name
    tables: RoleTables


class SequenceInput(_Schema):
    kind: Literal["sequence"]
    dense: list[Name]
    # the other sparse features, pooled by tables of no `kind`, after `dense` in `other`
    sparse: list[Name] = []
    feature_dims: list[PositiveInt] = []
    fields: list[SequenceField] = Field(min_length=1)
    time_positions: PositiveInt
    time_gaps: bool = False
    max_history: PositiveInt
    dims: RoleDims


def _input_kind(value: Any) -> str | None:
    kind = value.get("kind", "pooled") if isinstance(value, dict) else getattr(value, "kind", None)
    return kind if isinstance(kind, str) else None  # pydantic names a missing or unknown tag


InputSpec = Annotated[
    Annotated[PooledInput, Tag("pooled")] | Annotated[SequenceInput, Tag("sequence")],
    Discriminator(_input_kind),
]


class Manifest(_Schema):
    format_version: Literal[FORMAT_VERSION]  # type: ignore[valid-type]
    base: str | None = None  # an incremental export: the export it updates
    base_sha256: Sha256 | None = None
    features: FeaturesConfig
    input: InputSpec
    tables: list[TableEntry]
    dense_program: RelPath
    sha256: dict[RelPath, Sha256]
    training: dict[str, Any]
