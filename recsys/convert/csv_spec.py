"""The CSV / TSV feature spec of `recsys convert csv`, and the text -> int64 ID encodings
its columns name (shared by every text converter here, so one string gets one ID anywhere).

No two CSV logs agree on their columns, so a spec (YAML or JSON, or the CLI's options)
says what each column is:

    label: click                 # 0 or 1 (also 0.0 / 1.0)         -> label int8
    timestamp: ts                # optional                        -> timestamp int64
    timestamp_format: unix       # unix | unix_ms | a strptime format, read as UTC
    delimiter: ","               # default: tab for *.tsv / *.tab (also .gz), else comma
    header: true                 # false: `names` lists the file's columns in order
    quote: true                  # '"' quoting as spreadsheets write it; false: none
    columns:
      user: categorical                          # int64
      price: numeric                             # float32
      history: {type: sequence, separator: "|"}  # list<int64>
      city: {type: categorical, ids: hash}
      comment: skip

Every column of the file must be the label, the timestamp or in `columns` (`skip` leaves
one out), so a typo never drops a column.

IDs (`ids`, categorical and sequence columns): `auto` (default) keeps a value written as a
decimal integer ("42", "-7", "0042"; up to 18 digits, or 19 up to 2**63 - 1) as that
integer and hashes any other string; `int` refuses anything but such integers; `hash`
hashes every value ("042" != "42").
The hash is `string_id`: FNV-1a 64 over the UTF-8 bytes, then the splitmix64 finalizer of
`recsys.hashing`, sign bit cleared (the contract rejects negative IDs by default), so any
system can recompute it from the string alone. Vectorized: numpy, one XOR-multiply pass
per byte position over the distinct strings of a block.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import yaml
from pydantic import ValidationError, model_validator

from recsys.config.base import ConfigError, Strict
from recsys.hashing import MASK64, mix64_, mix64_int

IdMode = Literal["auto", "int", "hash"]
ColumnType = Literal["categorical", "numeric", "sequence", "skip"]

# --------------------------------------------------------------------------- text IDs

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_NON_NEGATIVE = (1 << 63) - 1
_INT64_MAX_TEXT = str(_NON_NEGATIVE)


def string_id(value: str) -> int:
    """The ID of one string, in plain Python: the reference `string_ids` must match."""
    h = _FNV_OFFSET
    for byte in value.encode("utf-8"):
        h = ((h ^ byte) * _FNV_PRIME) & MASK64
    return mix64_int(h) & _NON_NEGATIVE


def _fnv1a(text: pa.Array) -> np.ndarray:
    """FNV-1a 64 of each (non-null) string, byte position by byte position: strings sorted
    longest first make the ones still going at position j a prefix, so each step is one
    vectorized XOR-multiply and the whole costs one pass over the bytes."""
    binary = pc.cast(text, pa.large_binary())
    n = len(binary)
    offsets = np.frombuffer(binary.buffers()[1], np.int64)[binary.offset : binary.offset + n + 1]
    data_buffer = binary.buffers()[2]
    data = (
        np.frombuffer(data_buffer, np.uint8) if data_buffer is not None else np.empty(0, np.uint8)
    )
    lengths = np.diff(offsets)
    order = np.argsort(-lengths, kind="stable")
    starts, lengths = offsets[:-1][order], lengths[order]
    h = np.full(n, _FNV_OFFSET, np.uint64)
    longest = int(lengths[0]) if n else 0
    going = np.searchsorted(-lengths, -np.arange(longest), side="left")  # lengths > j
    prime = np.uint64(_FNV_PRIME)
    for j in range(longest):
        k = going[j]
        h[:k] ^= data[starts[:k] + j]
        h[:k] *= prime
    out = np.empty_like(h)
    out[order] = h
    return out


def string_ids(text: pa.Array) -> np.ndarray:
    """`string_id` of every cell (int64; a null cell gives an unspecified value), hashing
    each distinct string of the array once."""
    encoded = pc.dictionary_encode(text)
    hashed = torch.from_numpy(_fnv1a(encoded.dictionary).view(np.int64))
    unique = mix64_(hashed).numpy() & _NON_NEGATIVE
    return unique[np.asarray(pc.fill_null(encoded.indices, 0), dtype=np.int64)]


def _is_integer_text(text: pa.Array) -> np.ndarray:
    """Whether each cell is a decimal integer within int64 (false for null cells)."""
    short = pc.match_substring_regex(text, r"^-?[0-9]{1,18}$")
    long = pc.and_(
        pc.match_substring_regex(text, r"^[0-9]{19}$"), pc.less_equal(text, _INT64_MAX_TEXT)
    )
    return np.asarray(pc.fill_null(pc.or_(short, long), False), dtype=bool)


def encode_ids(text: pa.Array, mode: IdMode = "auto") -> pa.Array:
    """Text cells -> int64 IDs (see the module docstring); nulls stay null. Raises
    ValueError under mode `int` if a present cell is not an integer."""
    valid = np.asarray(pc.is_valid(text), dtype=bool)
    ids = np.zeros(len(text), np.int64)
    integer = np.zeros(len(text), bool) if mode == "hash" else _is_integer_text(text)
    if mode == "int" and not np.array_equal(integer, valid):
        raise ValueError("not an integer ID")
    if integer.any():
        ids[integer] = pc.cast(text.filter(pa.array(integer)), pa.int64()).to_numpy()
    hashed = valid & ~integer
    if hashed.any():
        ids[hashed] = string_ids(text.filter(pa.array(hashed)))
    return pa.array(ids, mask=None if valid.all() else ~valid)


def id_list_array(offsets: np.ndarray, ids: np.ndarray | pa.Array) -> pa.ListArray:
    """A list<int64> column from int offsets (len rows + 1) and the flat IDs."""
    return pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)), pa.array(ids, type=pa.int64())
    )


def encode_id_lists(text: pa.Array, separator: str, mode: IdMode = "auto") -> pa.Array:
    """Cells of IDs joined by `separator` -> list<int64>; an empty cell is an empty list,
    an empty ID inside a cell ("3||4", a trailing separator) is bad."""
    lists = pc.split_pattern(text, separator)
    lengths = np.asarray(pc.fill_null(pc.list_value_length(lists), 0), dtype=np.int64)
    flat = lists.flatten()
    if len(flat) and pc.any(pc.equal(flat, "")).as_py():
        raise ValueError("empty ID")
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return id_list_array(offsets, encode_ids(flat, mode))


# --------------------------------------------------------------------------- the CSV spec


class ColumnSpec(Strict):
    """One column: its type and, for IDs, how text becomes an int64."""

    type: ColumnType
    separator: str | None = None  # sequence only: between the IDs of a cell
    ids: IdMode = "auto"

    @model_validator(mode="before")
    @classmethod
    def _from_type(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _options_of_type(self) -> ColumnSpec:
        if self.type == "sequence" and not self.separator:
            raise ValueError("a sequence column needs a separator")
        if self.type != "sequence" and self.separator is not None:
            raise ValueError(f"separator is only for sequence columns, not {self.type}")
        if self.type in ("numeric", "skip") and "ids" in self.model_fields_set:
            raise ValueError(f"ids is only for categorical and sequence columns, not {self.type}")
        return self


class CsvSpec(Strict):
    """What the columns of a CSV / TSV log are (see the module docstring)."""

    label: str
    timestamp: str | None = None
    timestamp_format: str = "unix"
    delimiter: str | None = None
    header: bool = True
    names: list[str] | None = None  # the file's columns in order, when it has no header
    quote: bool = True
    columns: dict[str, ColumnSpec]

    @model_validator(mode="after")
    def _consistent(self) -> CsvSpec:
        if self.delimiter is not None and len(self.delimiter) != 1:
            raise ValueError(f"delimiter must be one character, got {self.delimiter!r}")
        if self.timestamp == self.label:
            raise ValueError("label and timestamp must be different columns")
        for name in (self.label, self.timestamp):
            if name in self.columns:
                raise ValueError(f"{name!r} is the label or timestamp; not also in columns")
        if "label" in self.columns or "timestamp" in self.columns:
            raise ValueError("columns 'label' and 'timestamp' are the output's own; rename them")
        if self.header == (self.names is not None):
            raise ValueError("give names (the file's columns in order) exactly when header: false")
        return self

    def outputs(self) -> dict[str, ColumnSpec]:
        return {name: c for name, c in self.columns.items() if c.type != "skip"}


def spec_from_dict(doc: Any, source: str = "<spec>") -> CsvSpec:
    """Validate a spec; errors name `source` and the key."""
    try:
        return CsvSpec.model_validate(doc)
    except ValidationError as err:
        lines = [
            f"{source}: {'.'.join(str(p) for p in e['loc']) or '(top level)'}: "
            + e["msg"].removeprefix("Value error, ")
            for e in err.errors()
        ]
        raise ConfigError("\n".join(lines)) from None


def load_spec(path: str | Path) -> CsvSpec:
    """A spec file: JSON for *.json, else YAML."""
    path = Path(path)
    text = path.read_text()
    return spec_from_dict(
        json.loads(text) if path.suffix == ".json" else yaml.safe_load(text), str(path)
    )


def spec_from_options(
    label: str,
    timestamp: str | None = None,
    categorical: Iterable[str] = (),
    numeric: Iterable[str] = (),
    sequence: Iterable[str] = (),
    skip: Iterable[str] = (),
    **options: Any,
) -> CsvSpec:
    """The spec of the CLI's options; `sequence` entries are `NAME=SEPARATOR`; `options`
    are the other spec keys (None: the default)."""
    columns: dict[str, Any] = {}
    for names, kind in ((categorical, "categorical"), (numeric, "numeric"), (skip, "skip")):
        columns.update(dict.fromkeys(names, kind))
    for entry in sequence:
        name, sep, separator = entry.partition("=")
        if not (sep and name and separator):
            raise ConfigError(f"--sequence {entry!r}: expected NAME=SEPARATOR, e.g. hist='|'")
        columns[name] = {"type": "sequence", "separator": separator}
    doc = {"label": label, "timestamp": timestamp, "columns": columns, **options}
    return spec_from_dict({k: v for k, v in doc.items() if v is not None}, "options")
