"""HTTP bodies to validated Arrow tables, and probabilities back to bodies.

A request is input from outside, like a log: it passes the Parquet contract
(`recsys.contract.validate_table`, with traffic's optional columns) before any row is
scored, and a broken rule is a `RequestError` with status 400 and the contract's message,
which names the column and the row. JSON has no integers apart from floats, so a JSON
row's whole-number dense values and empty lists are given the contract's types first;
Arrow and Parquet bodies must already have them. A table that passed is cut to the
columns the model reads, in canonical types, so that the tables of one server-side batch
concatenate into one (the same values, so the same math).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys.config import FeaturesConfig
from recsys.contract import validate_table
from recsys.serving.schema import SequenceInput

JSON = "application/json"
ARROW_STREAM = "application/vnd.apache.arrow.stream"
PARQUET = frozenset(
    {"application/vnd.apache.parquet", "application/parquet", "application/x-parquet"}
)
SOURCE = "request"
ID_LIST = pa.list_(pa.int64())


class RequestError(Exception):
    """A request that cannot be scored as sent: its HTTP status and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def media_type(header: str | None) -> str:
    return (header or "").split(";")[0].strip().lower()


def parse_body(body: bytes, content_type: str | None, features: FeaturesConfig) -> pa.Table:
    """The rows of a request body, by its Content-Type (JSON rows, Arrow IPC stream,
    Parquet); not yet validated."""
    kind = media_type(content_type) or JSON
    try:
        if kind == JSON:
            return _json_rows(body, features)
        if kind == ARROW_STREAM:
            return pa.ipc.open_stream(pa.BufferReader(body)).read_all()
        if kind in PARQUET:
            return pq.read_table(pa.BufferReader(body))
    except (pa.ArrowException, OSError) as err:
        raise RequestError(400, f"{SOURCE}: not a readable {kind} body ({err})") from None
    accepted = ", ".join([JSON, ARROW_STREAM, *sorted(PARQUET)])
    raise RequestError(415, f"{SOURCE}: Content-Type {kind!r}; send one of {accepted}")


def _json_rows(body: bytes, features: FeaturesConfig) -> pa.Table:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(400, f"{SOURCE}: not JSON ({err})") from None
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise RequestError(400, f'{SOURCE}: expected {{"rows": [{{column: value, ...}}, ...]}}')
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowException, OverflowError) as err:
        raise RequestError(400, _locate(rows, err)) from None
    return _json_types(table, features)


def _locate(rows: list[dict], err: Exception) -> str:
    """Which column and row of JSON rows Arrow could not type (an error path only)."""
    for name in dict.fromkeys(k for r in rows for k in r):
        values = [r.get(name) for r in rows]
        try:
            pa.array(values)
        except (pa.ArrowException, OverflowError):
            for row in range(len(values)):
                try:
                    pa.array(values[: row + 1])
                except (pa.ArrowException, OverflowError) as cell:
                    return f"{SOURCE}: column {name!r}, row {row}: {cell} (value {values[row]!r})"
    return f"{SOURCE}: rows Arrow cannot read ({err})"


def _json_types(table: pa.Table, features: FeaturesConfig) -> pa.Table:
    """JSON's values in the contract's types where JSON cannot say them: whole numbers in
    a dense column are floats, a list column of only empty lists holds int64, a column of
    only nulls has its feature's type (so that the contract names the null's row)."""
    dense = {f.name for f in features.dense}
    types = model_columns(features)
    for i, field in enumerate(table.schema):
        t, want = field.type, types.get(field.name)
        if field.name in dense and pa.types.is_integer(t):
            want = pa.float64()
        elif pa.types.is_list(t) and pa.types.is_null(t.value_type):
            want = ID_LIST
        elif not pa.types.is_null(t):
            continue
        if want is not None:
            table = table.set_column(i, field.name, table.column(i).cast(want))
    return table


def model_columns(features: FeaturesConfig) -> dict[str, pa.DataType]:
    """The columns a model reads, in the types one batch is concatenated in."""
    columns: dict[str, pa.DataType] = {f.name: pa.float64() for f in features.dense}
    columns.update({f.name: ID_LIST if f.multi_valued else pa.int64() for f in features.sparse})
    columns.update({s.name: ID_LIST for s in features.sequences})
    if features.sequence_timestamps:
        columns[features.sequence_timestamps] = ID_LIST
        columns[features.timestamp] = pa.int64()  # time gaps are measured from it
    return columns


def prepare(
    table: pa.Table, features: FeaturesConfig, spec: object, optional: frozenset[str]
) -> pa.Table:
    """A parsed request checked against the contract (and a sequence model's history
    limit), cut to the model's columns in canonical types."""
    if table.num_rows == 0:
        raise RequestError(400, f"{SOURCE}: no rows to score")
    try:
        table, _ = validate_table(table, features, SOURCE, optional=optional)
    except ValueError as err:
        raise RequestError(400, str(err)) from None
    if isinstance(spec, SequenceInput):
        for seq in features.sequences:
            lengths = pc.list_value_length(table.column(seq.name)).to_numpy(zero_copy_only=False)
            row = int(np.argmax(lengths))
            if lengths[row] > spec.max_history:
                raise RequestError(
                    400,
                    f"{SOURCE}: column {seq.name!r}, row {row}: {int(lengths[row])} behaviours, "
                    f"more than the model's max_history {spec.max_history}",
                )
    columns = model_columns(features)
    return pa.table({name: table.column(name).cast(t) for name, t in columns.items()})


def json_body(probs: np.ndarray, version: dict) -> bytes:
    return json.dumps({"probs": probs.tolist(), "version": version}).encode()


def arrow_body(probs: np.ndarray) -> bytes:
    sink = pa.BufferOutputStream()
    table = pa.table({"prob": pa.array(probs)})
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()
