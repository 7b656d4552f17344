"""Finding and streaming Parquet logs on one machine, validated against the contract.

Training reads through Ray Data (pipelines); this reader serves evaluation of small logs,
validation (`recsys validate`), statistics and benchmarks, and names the file and row of
any bad input because it knows both.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.config import FeaturesConfig
from recsys.contract import BadInputError, BadRowCounts, check_schema, validate_table


def parquet_files(path: str | Path) -> list[Path]:
    """A Parquet file, every `*.parquet` under a directory, or a glob's matches (`**`
    recursive), sorted so that day order holds."""
    text = str(path)
    if any(c in text for c in "*?["):
        root, pattern = _glob_root(text)
        files = sorted(p for p in root.glob(pattern) if p.is_file() and _visible(p))
        if not files:
            raise FileNotFoundError(f"{text}: the glob matches no Parquet files")
        return files
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    files = sorted(p for p in path.rglob("*.parquet") if _visible(p))
    if not files:
        raise FileNotFoundError(f"{path}: no .parquet files under this directory")
    return files


def scan_log(files: list[Path] | list[str]) -> pl.LazyFrame:
    """The log's files as one polars frame. Columns the contract does not name may come
    and go between files (a log gains a column one day): they are never read, so they are
    ignored rather than refused; the contract's own columns are checked per file before."""
    return pl.scan_parquet([str(f) for f in files], hive_partitioning=False, extra_columns="ignore")


def _visible(path: Path) -> bool:
    """Not one of writers' hidden or marker files (`_SUCCESS`, `_metadata`, `.crc`)."""
    return not path.name.startswith(("_", "."))


def _glob_root(pattern: str) -> tuple[Path, str]:
    """Split `dir/sub/*/x.parquet` into the fixed directory and the relative pattern."""
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    return root, str(Path(*parts[fixed:]))


def read_validated(
    path: str | Path,
    features: FeaturesConfig,
    batch_size: int = 65_536,
    on_bad_rows: str = "error",
    skipped: BadRowCounts | None = None,
    optional: frozenset[str] = frozenset(),
) -> Iterator[pa.Table]:
    """Stream a log as validated Arrow tables of at most `batch_size` rows.

    Rows dropped under `on_bad_rows: skip` are added to `skipped`, which the caller reports;
    `optional` columns (`recsys.contract.traffic_optional`) may be absent from the files.
    """
    for file in parquet_files(path):
        try:
            parquet = pq.ParquetFile(file)
        except (pa.ArrowException, OSError) as err:
            raise BadInputError(f"{file}: not a readable Parquet file ({err})") from None
        schema = parquet.schema_arrow
        check_schema(schema, features, str(file), optional)
        columns = [c for c in features.column_names() if c in schema.names or c not in optional]
        offset = 0
        for group in range(parquet.num_row_groups):
            # Whole row groups decode faster than `iter_batches`; slices are zero-copy.
            try:
                rows = parquet.read_row_group(group, columns=columns)
            except (pa.ArrowException, OSError) as err:
                raise BadInputError(
                    f"{file}: row group {group} cannot be read ({err}); the file is damaged"
                ) from None
            for start in range(0, rows.num_rows, batch_size):
                table = rows.slice(start, batch_size)
                clean, counts = validate_table(
                    table, features, str(file), offset, on_bad_rows, optional
                )
                offset += table.num_rows
                if skipped is not None:
                    skipped.merge(counts)
                if clean.num_rows:
                    yield clean
