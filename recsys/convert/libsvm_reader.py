"""Read libsvm and libfm (libffm) text as parsed tokens: the input side of
`recsys.convert.libsvm`, which says what the tokens become.

The text is streamed in 4 MB blocks of whole lines; numpy finds the tokens, their lines and
colons in a block's bytes and parses the integers, pyarrow's cast the other numbers: no
Python per line or token. A check that fails raises `BadLine` (the block's row and what is
wrong); `parsed` turns the earliest one into a `BadInputError` naming the file and line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.contract import BadInputError
from recsys.convert.cells import first_bad_cell
from recsys.convert.criteo import TextFile

LINE_BLOCK_BYTES = 1 << 22
_SPACE = np.zeros(256, bool)
_SPACE[[9, 10, 11, 12, 13, 32]] = True  # the ASCII whitespace str.split() splits at
_NEWLINE, _COLON, _ZERO = 10, 58, 48
_MAX_DIGITS = 18


@dataclass
class BadLine(Exception):
    """A bad line of a block: its 0-based row and what is wrong (named by the caller)."""

    row: int
    message: str


def read_blocks(source: TextFile) -> Iterator[tuple[int, bytes]]:
    """(1-based number of the first line, whole lines each ending in a newline), ~4 MB each."""
    line, rest = 1, b""
    with source.open() as stream:
        while block := stream.read(LINE_BLOCK_BYTES):
            data = rest + block
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            if cut:
                yield line, data[:cut]
                line += data.count(b"\n", 0, cut)
    if rest:  # the last line may lack its newline
        yield line, rest + b"\n"


def lines_before(data: bytes, row: int) -> bytes:
    """The first `row` lines of a block."""
    return data[: int(np.flatnonzero(np.frombuffer(data, np.uint8) == _NEWLINE)[row - 1]) + 1]


@dataclass
class Tokens:
    """A block: labels per line; per token its line, key, feature and value (libsvm: key
    and feature are the index; libfm: the field and the feature)."""

    lines: int
    labels: np.ndarray
    rows: np.ndarray
    keys: np.ndarray
    features: np.ndarray
    values: np.ndarray


class _NotNumber(Exception):
    """The position of the first substring that does not parse."""


def _strings(b: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> pa.Array:
    """The substrings b[lo[i]:hi[i]], gathered into one pyarrow string array."""
    lengths = hi - lo
    offsets = np.zeros(len(lo) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.repeat(lo - offsets[:-1], lengths) + np.arange(offsets[-1])
    buffers = pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b[flat])
    return pa.StringArray.from_buffers(len(lo), *buffers)


def _integers(b: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Non-negative decimal integers of up to 18 digits, one digit position at a time."""
    lengths = hi - lo
    bad = (lengths < 1) | (lengths > _MAX_DIGITS)
    value = np.zeros(len(lo), np.int64)
    for j in range(min(int(lengths.max(initial=0)), _MAX_DIGITS)):
        going = lengths > j
        digit = b[np.minimum(lo + j, len(b) - 1)].astype(np.int64) - _ZERO
        bad |= going & ((digit < 0) | (digit > 9))
        value = np.where(going, value * 10 + digit, value)
    if bad.any():
        raise _NotNumber(int(np.flatnonzero(bad)[0]))
    return value


def _floats(b: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Numbers; "0" and "1" (nearly every value of one-hot data) without pyarrow's parser."""
    head = b[np.minimum(lo, len(b) - 1)]
    simple = (hi - lo == 1) & ((head == _ZERO) | (head == _ZERO + 1))
    value = np.where(simple, head.astype(np.float64) - _ZERO, 0.0)
    rest = np.flatnonzero(~simple)
    if len(rest):
        text = _strings(b, lo[rest], hi[rest])
        try:
            value[rest] = pc.cast(text, pa.float64()).to_numpy()
        except pa.ArrowInvalid:
            bad = first_bad_cell(text, partial(pc.cast, target_type=pa.float64()))
            raise _NotNumber(int(rest[bad])) from None
    return value


def parse_tokens(data: bytes, parts: int) -> Tokens:
    """Tokenize, parse and check a block of lines; `parts` is 2 (libsvm) or 3 (libfm).

    Tokens are the runs of non-whitespace bytes, found with numpy over the whole block;
    running counts of newlines and colons give each token its line and its colons, and
    numbers are parsed from their substrings, so no per-token strings are made.
    """
    b = np.frombuffer(data, np.uint8)
    newlines = np.cumsum(b == _NEWLINE, dtype=np.int32)  # up to and including each byte
    colons_upto = np.cumsum(b == _COLON, dtype=np.int32)
    word = ~_SPACE[b]
    edges = np.flatnonzero(np.diff(np.concatenate([[False], word, [False]]).view(np.int8)))
    starts, ends = edges[::2], edges[1::2]
    rows = newlines[starts].astype(np.int64)
    counts = np.bincount(rows, minlength=int(newlines[-1]))
    if (counts == 0).any():
        raise BadLine(int(np.flatnonzero(counts == 0)[0]), "empty line, expected a label")
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])

    def bad(i: int, problem: str) -> BadLine:
        token = data[starts[i] : ends[i]].decode("utf-8", "replace")
        return BadLine(int(rows[i]), problem.format(repr(token)))

    try:
        labels = _floats(b, starts[first], ends[first])
        wrong = np.flatnonzero(~np.isin(labels, (-1.0, 0.0, 1.0)))
    except _NotNumber as err:
        wrong = err.args
    if len(wrong):
        raise bad(first[wrong[0]], "label {} is not 0 or 1 (or -1 / +1)")
    token = np.ones(len(starts), bool)
    token[first] = False
    token = np.flatnonzero(token)
    before = colons_upto[starts[token]] - (b[starts[token]] == _COLON)  # colons before it
    wrong = np.flatnonzero(colons_upto[ends[token] - 1] - before != parts - 1)
    if len(wrong):
        shape = "index:value" if parts == 2 else "field:feature:value"
        raise bad(token[wrong[0]], f"token {{}} is not {shape}")
    colon = np.flatnonzero(b == _COLON)
    cuts = [starts[token], *(colon[before + k] for k in range(parts - 1)), ends[token]]
    numbers = []
    names = ["index", "value"] if parts == 2 else ["field", "feature", "value"]
    for k, name in enumerate(names):
        parse = _floats if name == "value" else _integers
        try:
            numbers.append(parse(b, cuts[k] + (k > 0), cuts[k + 1]))
        except _NotNumber as err:
            wanted = "a number" if name == "value" else "a non-negative integer"
            raise bad(token[err.args[0]], f"{name} in {{}} is not {wanted}") from None
    labels = (labels == 1).astype(np.int8)
    return Tokens(len(first), labels, rows[token], numbers[0], numbers[-2], numbers[-1])


def parsed(lines: bytes, first_line: int, path: Path, convert: Callable[[bytes], Any]) -> Any:
    """`convert(lines)`, or BadInputError at the earliest bad line: a failure at line r is
    retried on the lines before r, whose own first failure (if any) comes first."""
    try:
        return convert(lines)
    except BadLine as bad:
        row, message = bad.row, bad.message
    while row > 0:
        try:
            convert(lines_before(lines, row))
            break
        except BadLine as earlier:
            row, message = earlier.row, earlier.message
    raise BadInputError(f"{path}, line {first_line + row}: {message}")
