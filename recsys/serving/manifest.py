"""The checks a loader runs on an export before it opens any table.

An export is input from outside the serving process: whatever a training job, a copy or a
person left in a folder. So nothing in it is trusted until it has passed, in order: the
manifest as strict JSON (UTF-8, no duplicate keys, no NaN); its format version; its schema
(`recsys.serving.schema`: required fields and their JSON types, allowed dtypes, lookups and
poolings, positive dims, no unknown keys, paths relative and normalised); the rules that
tie fields together (each lookup's own fields, a table for every input feature, widths
that add up to what the dense program reads, a checksum for every file named); and every
path, which must resolve, symlinks followed, to a regular file inside the folder's real
path, with the SHA-256 recorded. Only then does `recsys.serving.model` open files, and
each Parquet table's columns must match its entry's dim and dtype there. These are rules
on what is allowed, not a list of known attacks. Every failure is an `ExportError` naming
the file and the field.
(They hold for an export at rest: whoever can write into the folder while it is being
loaded can still swap a file between its check and its read.)

An incremental export's `base` is the one path outside its folder: it names another
export, which is read through these same checks, and must still be the export the delta
was written on (`base_sha256`, its manifest's digest).
"""

from __future__ import annotations

import hashlib
import json
import math
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from recsys.serving.format import FORMAT_VERSION, HASH, MANIFEST, OLD_VERSIONS
from recsys.serving.schema import Manifest, PooledInput, SequenceInput, TableEntry

CHUNK_BYTES = 1 << 20  # files are hashed streaming, a chunk at a time
MAX_ERRORS = 10  # schema errors listed in one message


class ExportError(ValueError):
    """An export folder that cannot be served as it is; the message names file and field."""


@dataclass(frozen=True)
class Export:
    """A checked export: its manifest, and every file it names as a checked real path."""

    root: Path  # as given, for messages
    real_root: Path
    manifest: Manifest
    manifest_sha256: str
    files: dict[str, Path]

    @property
    def manifest_file(self) -> Path:
        return self.root / MANIFEST

    def path(self, relative: str) -> Path:
        return self.files[relative]

    def fail(self, field: str, message: str) -> ExportError:
        return ExportError(f"{self.manifest_file}: {field}: {message}")


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read a chunk at a time (tables can be gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def read_export(root: str | Path) -> Export:
    """The export at `root`, its manifest and every file it names checked; raises
    `ExportError` at the first rule broken."""
    root = Path(root)
    real_root = root.resolve()
    if not real_root.is_dir():
        raise ExportError(f"{root}: not a folder; is this an export?")
    manifest_file = root / MANIFEST
    try:
        manifest_path = _inside(real_root, MANIFEST)
    except ExportError as err:
        raise ExportError(f"{root}: no readable {MANIFEST}: {err}; is this an export?") from None
    try:
        data = manifest_path.read_bytes()
    except OSError as err:
        raise ExportError(f"{manifest_file}: cannot be read ({err})") from None
    raw = _parse(data, manifest_file)
    manifest = _validate(raw, manifest_file)
    export = Export(root, real_root, manifest, hashlib.sha256(data).hexdigest(), {})
    _check_rules(export)
    _check_files(export)
    return export


def _parse(data: bytes, where: Path) -> dict[str, Any]:
    """Strict JSON: a duplicate key or a NaN would let two readers see different manifests."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise ValueError(f"key {key!r} appears twice in one object")
            out[key] = value
        return out

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"{text} does not fit a float")
        return value

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ExportError(f"{where}: not UTF-8 text ({err})") from None
    try:
        raw = json.loads(text, object_pairs_hook=pairs, parse_constant=constant, parse_float=finite)
    except ValueError as err:  # json.JSONDecodeError names line and column
        raise ExportError(f"{where}: not valid JSON: {err}") from None
    except RecursionError:
        raise ExportError(f"{where}: not valid JSON: nested too deeply") from None
    if not isinstance(raw, dict):
        raise ExportError(f"{where}: not a JSON object")
    return raw


def _validate(raw: dict[str, Any], where: Path) -> Manifest:
    version = raw.get("format_version")
    if version in OLD_VERSIONS:
        raise ExportError(
            f"{where}: format_version: {version} predates checksummed exports "
            f"(version {FORMAT_VERSION}); export the run again with `recsys export`"
        )
    if version != FORMAT_VERSION:
        raise ExportError(
            f"{where}: format_version: {version!r} is not one this reader knows ({FORMAT_VERSION})"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as err:
        lines = [
            f"{where}: {_field(e['loc'], raw)}: {_message(e)}" for e in err.errors()[:MAX_ERRORS]
        ]
        raise ExportError("\n".join(lines)) from None


def _field(loc: tuple[Any, ...], raw: Any) -> str:
    """A pydantic location as a manifest field path, tables named: `tables.user_id.dim`."""
    text, node = "", raw
    for part in loc:
        if isinstance(part, int):
            item = node[part] if isinstance(node, list) and part < len(node) else None
            name = item.get("name") if isinstance(item, dict) and text == "tables" else None
            named = isinstance(name, str) and name and "." not in name
            text += f".{name}" if named else f"[{part}]"
            node = item
        elif part == "[key]" or (text == "input" and part in ("pooled", "sequence")):
            continue  # pydantic's markers of a dict key and of the union member
        elif isinstance(node, dict) and text == "sha256":
            text += f"[{part!r}]"
            node = node.get(part)
        else:
            text += f".{part}" if text else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return text or "(manifest)"


def _message(error: Any) -> str:
    if error["type"] in ("missing", "export_path"):
        return str(error["msg"])
    shown = repr(error["input"])
    return f"{error['msg']} (got {shown[:80]}{'...' if len(shown) > 80 else ''})"


def _check_rules(export: Export) -> None:
    """What the schema's types cannot say: fields that depend on each other."""
    m, fail = export.manifest, export.fail
    if (m.base is None) != (m.base_sha256 is None):
        raise fail("base_sha256" if m.base else "base", "base and base_sha256 go together")
    if m.base is not None and not Path(m.base).is_absolute():
        raise fail("base", f"{m.base!r}: the base export is named by its absolute path")
    names: set[str] = set()
    for t in m.tables:
        field = f"tables.{t.name}"
        if t.name in names:
            raise fail(f"{field}.name", f"{t.name!r} names two tables")
        names.add(t.name)
        _check_entry(export, t, field)
    if isinstance(m.input, SequenceInput):
        _check_sequence_input(export, m.input)
    else:
        for t in m.tables:
            if t.kind == "sequence":
                raise fail(f"tables.{t.name}.kind", "a sequence table in a pooled export")
    _check_pooled_input(export, m.input)
    named = [("dense_program", m.dense_program), *_table_files(m)]
    for field, path in named:
        if path not in m.sha256:
            raise fail(field, f"{path!r} has no entry in sha256")


def _check_entry(export: Export, t: TableEntry, field: str) -> None:
    fail = export.fail
    if t.lookup in ("modulo", "hash", "position") and t.num_rows is None:
        raise fail(f"{field}.num_rows", f"lookup {t.lookup!r} needs num_rows")
    if t.lookup == "hash":
        if t.hash != HASH:
            raise fail(f"{field}.hash", f"{t.hash!r} is not the hash this reader computes ({HASH})")
        probes = t.probes or {}
        for feature in t.features:
            if not probes.get(feature):
                raise fail(f"{field}.probes", f"feature {feature!r} has no probes")
        for feature in probes:
            if feature not in t.features:
                raise fail(f"{field}.probes.{feature}", "not one of the table's features")
    elif t.hash is not None or t.probes is not None:
        raise fail(f"{field}.lookup", f"hash and probes are for lookup 'hash', not {t.lookup!r}")
    if t.default_embedding is not None and len(t.default_embedding) != t.dim:
        raise fail(
            f"{field}.default_embedding",
            f"{len(t.default_embedding)} values for a table of dim {t.dim}",
        )
    if t.input_dim is not None and t.input_dim < t.dim:
        raise fail(f"{field}.input_dim", f"{t.input_dim} is narrower than dim {t.dim}")
    if (t.pooling == "none") != (t.kind == "sequence"):
        raise fail(f"{field}.pooling", "'none' is for sequence tables, and only for them")
    if t.num_rows is not None and t.lookup != "id" and t.rows > t.num_rows:
        raise fail(f"{field}.rows", f"{t.rows} rows in a table of num_rows {t.num_rows}")
    if t.delta and export.manifest.base is None:
        raise fail(f"{field}.delta", "a delta table in an export without a base")
    if t.delta != (t.deleted_files is not None):
        raise fail(f"{field}.deleted_files", "a delta table lists deleted_files, no other does")


def _check_pooled_input(export: Export, spec: PooledInput | SequenceInput) -> None:
    """Each pooled feature's tables (those of no `kind`) add up to the width the program
    reads for it."""
    fail = export.fail
    if len(spec.feature_dims) != len(spec.sparse):
        raise fail(
            "input.feature_dims", f"{len(spec.feature_dims)} widths for {len(spec.sparse)} features"
        )
    widths = dict.fromkeys(spec.sparse, 0)
    for t in export.manifest.tables:
        if t.kind == "sequence":
            continue
        for feature in t.features:
            if feature not in widths:
                raise fail(f"tables.{t.name}.features", f"{feature!r} is not in input.sparse")
            lookups = len((t.probes or {}).get(feature, [])) if t.lookup == "hash" else 1
            widths[feature] += lookups * (t.input_dim or t.dim)
    for i, (feature, want) in enumerate(zip(spec.sparse, spec.feature_dims, strict=True)):
        if widths[feature] == 0:
            raise fail(f"input.sparse[{i}]", f"feature {feature!r} has no table")
        if widths[feature] != want:
            raise fail(
                f"input.feature_dims[{i}]",
                f"{want} for feature {feature!r}, whose tables give {widths[feature]}",
            )


def _check_sequence_input(export: Export, spec: SequenceInput) -> None:
    """Each field's tables exist and are as wide as the program's inputs say."""
    fail = export.fail
    tables = {t.name: t for t in export.manifest.tables}
    for role in ("att", "rep"):
        dims = getattr(spec.dims, role)
        if len(dims) != len(spec.fields):
            raise fail(f"input.dims.{role}", f"{len(dims)} widths for {len(spec.fields)} fields")
        for i, field in enumerate(spec.fields):
            name = getattr(field.tables, role)
            if name not in tables:
                raise fail(f"input.fields[{i}].tables.{role}", f"table {name!r} is not in tables")
            if tables[name].kind != "sequence":
                raise fail(f"tables.{name}.kind", "a field's table must be of kind 'sequence'")
            if tables[name].dim != dims[i]:
                raise fail(
                    f"input.dims.{role}[{i}]",
                    f"{dims[i]}, but table {name!r} has dim {tables[name].dim}",
                )


def _table_files(m: Manifest) -> list[tuple[str, str]]:
    """(field, path) of every table file the manifest names, in manifest order."""
    named = []
    for t in m.tables:
        named += [(f"tables.{t.name}.files[{i}]", p) for i, p in enumerate(t.files)]
        for i, p in enumerate(t.deleted_files or []):
            named.append((f"tables.{t.name}.deleted_files[{i}]", p))
    return named


def _check_files(export: Export) -> None:
    """Every named file resolves inside the folder and has the SHA-256 recorded."""
    m = export.manifest
    named = [("dense_program", m.dense_program), *_table_files(m)]
    named += [(f"sha256[{p!r}]", p) for p in m.sha256]
    for field, path in named:
        if path in export.files:
            continue
        try:
            real = _inside(export.real_root, path)
        except ExportError as err:
            raise export.fail(field, str(err)) from None
        try:
            actual = sha256_file(real)
        except OSError as err:
            raise export.fail(field, f"{path!r} cannot be read ({err})") from None
        if actual != m.sha256[path]:
            raise export.fail(
                field,
                f"{path!r} has SHA-256 {actual}, the manifest records {m.sha256[path]}: "
                "the file is damaged or was changed after export",
            )
        export.files[path] = real


def _inside(real_root: Path, path: str) -> Path:
    """The real path of `path` under the folder, refused unless it is a regular file there."""
    try:
        real = (real_root / path).resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise ExportError(f"{path!r} cannot be resolved ({err})") from None
    if not real.is_relative_to(real_root):
        raise ExportError(f"{path!r} leaves the export folder (it resolves to {real})")
    try:
        mode = real.stat().st_mode
    except FileNotFoundError:
        raise ExportError(f"{path!r} does not exist") from None
    except OSError as err:
        raise ExportError(f"{path!r} cannot be read ({err})") from None
    if not stat.S_ISREG(mode):
        raise ExportError(f"{path!r} is not a regular file")
    return real
