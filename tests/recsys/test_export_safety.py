"""An export is safe to load: its manifest is checked against the schema before anything
is read, every path it names stays inside the export folder, every file has the SHA-256 it
records and the columns its entry says; each broken rule is an `ExportError` naming the
file and the field. And a failed export leaves nothing that looks like one."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.export.writer import export
from recsys.config import config_from_dict
from recsys.serving.format import embedding_table, rows_of
from recsys.serving.manifest import ExportError, sha256_file
from recsys.serving.model import ServingModel, load_tables
from tests.helpers import hand_written_run, trained_probabilities
from tests.small_log import small_features, small_table

DIM = 4
TABLES = [  # one table per lookup kind: id (vocabulary), hash (multiplexed, qr)
    {"features": ["s_single"], "embedding_dim": DIM},
    {
        "name": "mux",
        "features": ["s_multi", "s_nullable"],
        "variant": "multiplexed",
        "num_embeddings": 97,
        "embedding_dim": DIM,
        "probes": {"s_multi": 2},
    },
    {"features": ["s_multi_null"], "variant": "qr", "num_embeddings": 20, "embedding_dim": DIM},
]
PART = "tables/s_single/part-00000.parquet"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(run, log, export): a run written by hand, no Ray, and its export."""
    root = tmp_path_factory.mktemp("safety")
    cfg = config_from_dict(
        {
            "name": "safety",
            "features": small_features().model_dump(mode="json"),
            "tables": TABLES,
            "model": {"name": "dlrm", "dense_arch": [8, DIM], "over_arch": [8]},
        }
    )
    log = root / "log.parquet"
    pq.write_table(small_table(200, 1), log)
    run = root / "run"
    hand_written_run(cfg, log, run)
    export(run, root / "export")
    return run, log, root / "export"


@pytest.fixture
def copy(built: tuple[Path, Path, Path], tmp_path: Path) -> Path:
    """A copy of the export to tamper with."""
    return Path(shutil.copytree(built[2], tmp_path / "export", symlinks=True))


def _manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text())


def _edit(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    manifest = _manifest(folder)
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _table(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    (entry,) = [t for t in manifest["tables"] if t["name"] == name]
    return entry


def _refused(folder: Path, message: str) -> None:
    """Loading `folder` fails with an ExportError whose message holds `message` (regex)."""
    with pytest.raises(ExportError, match=message):
        ServingModel(folder)


# ------------------------------------------------------------------------------ valid


def test_a_valid_export_loads_anywhere_and_scores_what_the_model_scores(
    built: tuple[Path, Path, Path], copy: Path
) -> None:
    run, log, folder = built
    served = ServingModel(folder).predict(log).column("prob").to_numpy()
    np.testing.assert_allclose(served, trained_probabilities(run, log), atol=1e-6)
    assert served.std() > 0
    # Paths are relative: a copied export serves exactly what the original does.
    np.testing.assert_array_equal(ServingModel(copy).predict(log).column("prob").to_numpy(), served)
    manifest = _manifest(folder)
    assert manifest["format_version"] == 4
    named = {f for t in manifest["tables"] for f in t["files"]} | {manifest["dense_program"]}
    assert set(manifest["sha256"]) == named
    assert manifest["sha256"][PART] == sha256_file(folder / PART)


def test_a_symlink_that_stays_inside_the_folder_is_followed(copy: Path) -> None:
    """The rule is where a path resolves to, not whether it is a link."""
    (copy / "elsewhere").mkdir()
    (copy / PART).rename(copy / "elsewhere" / "part.parquet")
    (copy / PART).symlink_to(Path("../../elsewhere/part.parquet"))
    assert len(load_tables(copy)["s_single"].ids) > 0


# ------------------------------------------------------------------------------ tampering

Change = Callable[[dict[str, Any]], None]


def _set(key: str, value: Any) -> Change:
    return lambda m: m.__setitem__(key, value)


def _set_in(table: str, key: str, value: Any) -> Change:
    return lambda m: _table(m, table).__setitem__(key, value)


def _checksum(path: str, value: str) -> Change:
    return lambda m: m["sha256"].__setitem__(path, value)


def _first_file(path: str) -> Change:
    return lambda m: _table(m, "s_single")["files"].__setitem__(0, path)


def _wider(m: dict[str, Any], program_too: bool = True) -> None:
    """s_single's entry twice as wide; with `program_too`, the program's input as well."""
    entry = _table(m, "s_single")
    entry["dim"] = 2 * DIM
    entry["default_embedding"] *= 2
    if program_too:
        m["input"]["feature_dims"][m["input"]["sparse"].index("s_single")] = 2 * DIM


_M, _S, _MUX = r"manifest\.json: ", r"tables\.s_single\.", r"tables\.mux\."
_FILE0, _ZEROS = r"tables\.s_single\.files\[0\]: ", "0" * 64
_TABLE_PATHS = [  # s_single's first file named `path`, and what the refusal says is wrong
    ("/etc/passwd", "is absolute"),
    ("../x", "leaves the export folder"),
    ("tables/../../x", "leaves the export folder"),
    ("tables/./s_single/part-00000.parquet", "is not normalised"),
    ("tables//s_single/part-00000.parquet", "is not normalised"),
    ("tables\\s_single", "is not a relative path with '/' separators"),
    ("", "is not a relative path"),
]
_SCHEMA = [  # (table, key, value, what the refusal says after "tables.<table>.<key>: ")
    ("s_single", "dtype", "float64", "Input should be 'float32', 'float16' or 'int8'"),
    ("s_single", "dim", 0, "Input should be greater than 0"),
    ("s_single", "dim", "4", r"Input should be a valid integer \(got '4'\)"),
    ("s_single", "lookup", "mmap", "Input should be"),
    ("s_single", "extra", 1, "Extra inputs are not permitted"),
    ("s_single", "default_embedding", [0.0], f"1 values for a table of dim {DIM}"),
    ("s_single", "rows", 1, r"1, but its files hold \d+ rows"),
    ("mux", "hash", "md5", "'md5' is not the hash this reader computes"),
    ("mux", "rows", 1000, "1000 rows in a table of num_rows 97"),
]

# fmt: off
MANIFEST_EDITS = [  # (change to the manifest, what the refusal says, as a regex); a line a case
    *((_first_file(path), "export/" + _M + _FILE0 + re.escape(f"{path!r} {why}"))
      for path, why in _TABLE_PATHS),
    (_set("dense_program", "../dense.pt2"),
     _M + r"dense_program: '\.\./dense\.pt2' leaves the export folder"),
    (_checksum("../../etc/passwd", _ZEROS),
     _M + r"sha256\['\.\./\.\./etc/passwd'\]: .* leaves the export folder"),
    (_checksum("dense.pt2", _ZEROS),
     r"dense_program: 'dense\.pt2' has SHA-256 [0-9a-f]{64}, the manifest records 0{64}"),
    (lambda m: m["sha256"].pop(PART), _FILE0 + f"'{PART}' has no entry in sha256"),
    (_checksum(PART, "abc"), rf"sha256\['{PART}'\]: String should match pattern"),
    (_wider, rf"needs fixed_size_list<.*>\[{2 * DIM}\]"),
    (partial(_wider, program_too=False),
     rf"input\.feature_dims\[0\]: {DIM} for feature 's_single', whose tables give 8"),
    (_set_in("s_single", "dtype", "int8"),
     rf"export/{PART}: columns \['id', 'embedding'\], but tables\.s_single"),
    # against the schema
    *((_set_in(table, key, value), rf"tables\.{table}\.{key}: {why}")
      for table, key, value, why in _SCHEMA),
    (lambda m: _table(m, "s_single").pop("dtype"), _S + "dtype: Field required"),
    (lambda m: _table(m, "mux")["probes"].pop("s_multi"),
     _MUX + "probes: feature 's_multi' has no probes"),
    (lambda m: _table(m, "mux").pop("num_rows"), _MUX + "num_rows: lookup 'hash' needs num_rows"),
    (lambda m: m["tables"].append(dict(_table(m, "mux"))), _MUX + "name: 'mux' names two tables"),
    (lambda m: m["input"].update(kind="graph"), r"input: Input tag 'graph'|input\.kind"),
    (lambda m: m.pop("features"), _M + "features: Field required"),
    (lambda m: m["features"].update(label=3), r"features\.label: Input should be a valid string"),
    (_set("tables", {}), r"tables: Input should be a valid list"),
    # against the program's inputs
    (lambda m: m["tables"].remove(_table(m, "s_single")),
     _M + r"input\.sparse\[0\]: feature 's_single' has no table"),
    (lambda m: _table(m, "s_single")["features"].append("nobody"),
     _S + r"features: 'nobody' is not in input\.sparse"),
    # the version (from before checksums: export again), the base
    (_set("format_version", 99), _M + r"format_version: 99 is not one this reader knows \(4\)"),
    *((_set("format_version", v),
       rf"format_version: {v} predates checksummed exports .* `recsys export`") for v in (1, 2, 3)),
    (lambda m: m.update(base="../base", base_sha256=_ZEROS),
     _M + r"base: '\.\./base': the base export is named by its absolute"),
    (lambda m: _table(m, "s_single").update(delta=True, deleted_files=[PART]),
     _S + "delta: a delta table in an export without a base"),
]
# fmt: on


def _ids(cases: list[tuple[Any, str]]) -> list[str]:
    """Each case's id: the message it expects, unescaped."""
    return [re.sub(r"\\(.)", r"\1", message) for _, message in cases]


@pytest.mark.parametrize(("change", "message"), MANIFEST_EDITS, ids=_ids(MANIFEST_EDITS))
def test_a_manifest_that_breaks_a_rule_is_refused_naming_the_field(
    copy: Path, change: Change, message: str
) -> None:
    _edit(copy, change)
    _refused(copy, message)


def test_a_base_that_is_the_export_itself_is_refused(copy: Path) -> None:
    _edit(copy, lambda m: m.update(base=str(copy.resolve()), base_sha256=_ZEROS))
    _refused(copy, _M + r"base: .* is this export or one it is built on")


def _rewrite_part(folder: Path, dim: int | None = None, dtype: str = "float32") -> None:
    """The part file written again at another dim or dtype, with its checksum updated, so
    that only the column check stands between it and a reader."""
    table = pq.read_table(folder / PART)
    rows = rows_of(table)
    if dim is not None:
        rows = np.tile(rows, 2)[:, :dim]
    pq.write_table(embedding_table(table.column("id").to_numpy(), rows, dtype), folder / PART)
    _edit(folder, _checksum(PART, sha256_file(folder / PART)))


def _reverse_ids(folder: Path) -> None:
    table = pq.read_table(folder / PART)
    pq.write_table(table.take(np.arange(table.num_rows)[::-1].copy()), folder / PART)
    _edit(folder, _checksum(PART, sha256_file(folder / PART)))


def _flip_a_byte(folder: Path) -> None:
    data = bytearray((folder / PART).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / PART).write_bytes(bytes(data))


def _folder_for_the_file(folder: Path) -> None:
    (folder / PART).unlink()
    (folder / PART).mkdir()


def _moved_out(name: str) -> Callable[[Path], None]:
    """`name` moved beside the export folder, a symlink to it left in its place."""

    def move(folder: Path) -> None:
        shutil.move(folder / name, folder.parent / Path(name).name)
        (folder / name).symlink_to(folder.parent / Path(name).name)

    return move


def _manifest_bytes(data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / "manifest.json").write_bytes(data)


# fmt: off
FILE_EDITS = [  # (change to the export folder, what the refusal says, as a regex)
    (lambda folder: (folder / PART).unlink(), _M + _FILE0 + f"'{PART}' does not exist"),
    (_folder_for_the_file, _FILE0 + f"'{PART}' is not a regular file"),
    (_moved_out("tables/s_single"), _FILE0 + ".* leaves the export folder"),
    (_moved_out("manifest.json"),
     r"export: no readable manifest\.json: 'manifest\.json' leaves the export folder"),
    (_flip_a_byte,
     _FILE0 + f"'{PART}' has SHA-256 [0-9a-f]{{64}}, the manifest records [0-9a-f]{{64}}: "
     "the file is damaged or was changed after export"),
    (partial(_rewrite_part, dim=2 * DIM),
     rf"export/{PART}: embedding: fixed_size_list<.*>\[{2 * DIM}\], but tables\.s_single "
     rf"\(dim {DIM}, dtype float32\) needs fixed_size_list<.*>\[{DIM}\]"),
    (partial(_rewrite_part, dtype="float16"),
     rf"export/{PART}: embedding: fixed_size_list<.*halffloat>\[{DIM}\], but "
     rf"tables\.s_single \(dim {DIM}, dtype float32\) needs"),
    (partial(_rewrite_part, dtype="int8"),
     rf"export/{PART}: columns \['id', 'embedding', 'scale', 'bias'\], but"),
    (_reverse_ids, _S + "files: the files' ids are not sorted and unique"),
    # a manifest that is not strict JSON
    (_manifest_bytes(b'{"format_version": 4,'), _M + "not valid JSON: Expecting"),
    (_manifest_bytes(b'{"format_version": 4, "format_version": 4}'),
     "not valid JSON: key 'format_version' appears twice"),
    (_manifest_bytes(b'{"format_version": NaN}'), "not valid JSON: NaN is not a JSON number"),
    (_manifest_bytes(b"[4]"), _M + "not a JSON object"),
    (_manifest_bytes(b'{"a": "\xff"}'), _M + "not UTF-8 text"),
]
# fmt: on


@pytest.mark.parametrize(("change", "message"), FILE_EDITS, ids=_ids(FILE_EDITS))
def test_an_export_whose_files_break_a_rule_is_refused_naming_the_file(
    copy: Path, change: Callable[[Path], None], message: str
) -> None:
    change(copy)
    _refused(copy, message)


def test_a_symlink_pointing_out_of_the_folder_is_refused(copy: Path, tmp_path: Path) -> None:
    """Even to a file with the right bytes: the path rule, not the checksum, refuses it."""
    outside = tmp_path / "outside.parquet"
    shutil.copy(copy / PART, outside)
    (copy / PART).unlink()
    (copy / PART).symlink_to(outside)
    _refused(
        copy,
        rf"manifest\.json: tables\.s_single\.files\[0\]: '{PART}' leaves the export folder "
        rf"\(it resolves to {re.escape(str(outside.resolve()))}\)",
    )


def test_a_folder_without_a_manifest_is_not_an_export(tmp_path: Path) -> None:
    _refused(tmp_path, r"no readable manifest\.json: 'manifest\.json' does not exist")


# ------------------------------------------------------------------------------ writing


@pytest.fixture
def disk_full(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Saving the dense program fails (after the tables are written); undo() ends it."""

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch.export, "save", fail)
    return monkeypatch


def test_an_export_that_fails_midway_leaves_nothing(
    built: tuple[Path, Path, Path], tmp_path: Path, disk_full: pytest.MonkeyPatch
) -> None:
    """Tables written, the program not: no folder, no manifest, no partial folder."""
    with pytest.raises(RuntimeError, match="disk full"):
        export(built[0], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_export_over_an_earlier_one_leaves_the_earlier_one_whole(
    built: tuple[Path, Path, Path], copy: Path, disk_full: pytest.MonkeyPatch
) -> None:
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match="disk full"):
        export(built[0], copy)
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in copy.parent.iterdir()) == ["export"]
    disk_full.undo()
    export(built[0], copy)  # and one that completes replaces it
    assert _manifest(copy)["training"]["step"] == 3
    ServingModel(copy)


def test_an_export_never_replaces_a_folder_that_is_not_an_export(
    built: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="neither empty nor an export"):
        export(built[0], tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(("dtype", "atol"), [("float16", 1e-2), ("int8", 5e-2)])
def test_every_storage_dtype_passes_the_column_checks(
    built: tuple[Path, Path, Path], tmp_path: Path, dtype: str, atol: float
) -> None:
    run, log, _ = built
    export(run, tmp_path / "export", dtype=dtype)
    assert _table(_manifest(tmp_path / "export"), "s_single")["dtype"] == dtype
    served = ServingModel(tmp_path / "export").predict(log).column("prob").to_numpy()
    np.testing.assert_allclose(served, trained_probabilities(run, log), atol=atol)


def test_an_unknown_dtype_or_a_delta_over_its_own_target_is_refused_before_writing(
    built: tuple[Path, Path, Path], copy: Path, tmp_path: Path
) -> None:
    with pytest.raises(ExportError, match=r"dtype 'float64' is not one of"):
        export(built[0], tmp_path / "out", dtype="float64")
    with pytest.raises(ExportError, match=r"--since names the export this one would replace"):
        export(built[0], copy, since=copy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
