"""Cell converters of the text columns: one text column in, its contract column out.

Each converter raises ValueError (pyarrow's ArrowInvalid is one) if any present cell is
bad, without saying which; `first_bad_cell` then finds it by halving, so the common case
(a clean block) pays for one vectorized conversion only, and `convert_columns` names the
earliest bad cell of a block by file, line and column.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.contract import BadInputError

HEX_DIGITS = 8

_LABEL_VALUES = pa.array([0.0, 1.0])


def convert_label(text: pa.Array) -> pa.Array:
    """0 or 1, also written 0.0 / 1.0; a missing label is bad too."""
    value = pc.cast(text, pa.float64())
    if value.null_count or not pc.all(pc.is_in(value, _LABEL_VALUES), min_count=0).as_py():
        raise ValueError("label must be 0 or 1")
    return pc.cast(value, pa.int8())


def convert_dense(text: pa.Array, log_transform: bool) -> pa.Array:
    """A number, kept finite in float32; log(1 + x) for x > 0 when asked."""
    value = pc.cast(text, pa.float64())
    if log_transform:
        value = pc.if_else(pc.greater(value, 0), pc.log1p(value), value)
    value = pc.cast(value, pa.float32())
    if not pc.all(pc.is_finite(value), min_count=0).as_py():
        raise ValueError("not a finite float32")
    return value


def _hex_pair_values() -> np.ndarray:
    """Two text bytes, read as one little-endian uint16 -> the byte they spell in hex
    ("9f" -> 0x9F), or 0xFFFF when either is not a hex digit. One lookup per pair of
    digits is the cheapest vectorized hex parse numpy offers."""
    nibble = np.full(256, 0xFFFF, dtype=np.int64)
    for digits in (b"0123456789abcdef", b"0123456789ABCDEF"):
        nibble[np.frombuffer(digits, dtype=np.uint8)] = np.arange(16)
    pair = np.arange(1 << 16)
    high, low = nibble[pair & 0xFF], nibble[pair >> 8]
    return np.where((high < 16) & (low < 16), high * 16 + low, 0xFFFF).astype(np.uint16)


_HEX_PAIRS = _hex_pair_values()
_ABOVE_BYTE = np.uint64(0xFF00_FF00_FF00_FF00)  # four uint16 lanes: set if a lane is > 0xFF


def convert_sparse(text: pa.Array) -> pa.Array:
    """Exactly 8 hex digits, read in base 16 into int64 (so 0 .. 2**32 - 1)."""
    if text.null_count == len(text):
        return pa.nulls(len(text), pa.int64())
    fixed = pc.cast(text, pa.binary(HEX_DIGITS))  # raises unless every present cell has 8
    pairs = np.frombuffer(fixed.buffers()[1], np.uint16, len(fixed) * 4, fixed.offset * 8)
    values = _HEX_PAIRS[pairs].reshape(-1, 4)  # row i: its 4 bytes, big-endian
    not_hex = (values.view(np.uint64).ravel() & _ABOVE_BYTE) != 0
    present = None if fixed.null_count == 0 else np.asarray(pc.is_valid(fixed))
    if (not_hex if present is None else not_hex & present).any():
        raise ValueError("not 8 hex digits")
    ids = values.astype(np.uint8).view(">u4").ravel().astype(np.int64)
    return pa.array(ids, mask=None if present is None else ~present)


def first_bad_cell(text: pa.Array, convert: Callable[[pa.Array], pa.Array]) -> int:
    """Index of the first cell `convert` refuses, by halving: converters work cell by cell,
    so this costs ~17 conversions of shrinking slices, only when a chunk has a bad cell."""
    lo, hi = 0, len(text)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            convert(text.slice(lo, mid - lo))
        except ValueError:
            hi = mid
        else:
            lo = mid
    return lo


Converter = Callable[[pa.Array], pa.Array]


def convert_columns(
    text: Mapping[str, pa.Array],
    converters: Mapping[str, tuple[Converter, str]],
    where: Callable[[int], str],
) -> dict[str, pa.Array]:
    """Convert each text column; on bad cells raise BadInputError at the earliest one (row,
    then column order) as `<where(row)>, column 'c': <problem>, got <value>`."""
    columns: dict[str, pa.Array] = {}
    bad: list[tuple[int, int, str]] = []
    for position, (name, (convert, _)) in enumerate(converters.items()):
        cells = text[name]
        cells = cells.combine_chunks() if isinstance(cells, pa.ChunkedArray) else cells
        try:
            columns[name] = convert(cells)
        except ValueError:  # pyarrow's ArrowInvalid is one
            bad.append((first_bad_cell(cells, convert), position, name))
    if bad:
        row, _, name = min(bad)
        value = text[name][row].as_py()
        shown = "missing" if value is None else repr(value)
        raise BadInputError(f"{where(row)}, column {name!r}: {converters[name][1]}, got {shown}")
    return columns
