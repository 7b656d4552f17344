"""An export is safe to load: its manifest is checked against the schema before anything
is read, every path it names stays inside the export folder, every file has the SHA-256 it
records and the columns its entry says; each broken rule is an `ExportError` naming the
file and the field. And a failed export leaves nothing that looks like one."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipelines.build import build_model, load_trained, save_vocabularies
from pipelines.export.writer import export
from pipelines.train.checkpoint import save_checkpoint
from recsys.batch import BatchConverter
from recsys.config import config_from_dict
from recsys.logs import read_validated
from recsys.serving.format import embedding_table, rows_of
from recsys.serving.manifest import ExportError, sha256_file
from recsys.serving.model import ServingModel, load_tables
from tables.vocab import build_vocabularies
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
    run.mkdir()
    vocab = build_vocabularies(cfg, log)
    save_vocabularies(run, vocab)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    model = build_model(cfg, vocab)
    save_checkpoint(run, model, torch.optim.SGD(model.parameters(), lr=0.1), {"step": 3})
    export(run, root / "export")
    return run, log, root / "export"


@pytest.fixture
def copy(built: tuple[Path, Path, Path], tmp_path: Path) -> Path:
    """A copy of the export to tamper with."""
    return Path(shutil.copytree(built[2], tmp_path / "export", symlinks=True))


def _manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text())


def _write(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _edit(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    manifest = _manifest(folder)
    change(manifest)
    _write(folder, manifest)


def _table(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    (entry,) = [t for t in manifest["tables"] if t["name"] == name]
    return entry


def _refused(folder: Path, message: str) -> None:
    """Loading `folder` fails with an ExportError whose message holds `message` (regex)."""
    with pytest.raises(ExportError, match=message):
        ServingModel(folder)


def _expected(run: Path, log: Path) -> np.ndarray:
    cfg, trained, _ = load_trained(run)
    convert = BatchConverter(cfg.features)
    with torch.no_grad():
        parts = [
            torch.sigmoid(trained(convert(t))).numpy() for t in read_validated(log, cfg.features)
        ]
    return np.concatenate(parts)


# ------------------------------------------------------------------------------ valid


def test_a_valid_export_loads_anywhere_and_scores_what_the_model_scores(
    built: tuple[Path, Path, Path], copy: Path
) -> None:
    run, log, folder = built
    served = ServingModel(folder).predict(log).column("prob").to_numpy()
    np.testing.assert_allclose(served, _expected(run, log), atol=1e-6)
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


# ------------------------------------------------------------------------------ paths


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/etc/passwd", "is absolute"),
        ("../x", "leaves the export folder"),
        ("tables/../../x", "leaves the export folder"),
        ("tables/./s_single/part-00000.parquet", "is not normalised"),
        ("tables//s_single/part-00000.parquet", "is not normalised"),
        ("tables\\s_single", "is not a relative path with '/' separators"),
        ("", "is not a relative path"),
    ],
)
def test_a_table_path_that_is_not_relative_and_normalised_is_refused(
    copy: Path, path: str, message: str
) -> None:
    _edit(copy, lambda m: _table(m, "s_single")["files"].__setitem__(0, path))
    field = r"export/manifest\.json: tables\.s_single\.files\[0\]: "
    _refused(copy, field + re.escape(f"{path!r} {message}"))


def test_the_program_path_is_held_to_the_same_rule(copy: Path) -> None:
    _edit(copy, lambda m: m.__setitem__("dense_program", "../dense.pt2"))
    _refused(copy, r"manifest\.json: dense_program: '\.\./dense\.pt2' leaves the export folder")


def test_a_checksum_key_that_leaves_the_folder_is_refused(copy: Path) -> None:
    _edit(copy, lambda m: m["sha256"].__setitem__("../../etc/passwd", "0" * 64))
    _refused(copy, r"manifest\.json: sha256\['\.\./\.\./etc/passwd'\]: .* leaves the export folder")


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


def test_a_symlinked_folder_pointing_out_is_refused(copy: Path, tmp_path: Path) -> None:
    shutil.move(copy / "tables" / "s_single", tmp_path / "s_single")
    (copy / "tables" / "s_single").symlink_to(tmp_path / "s_single", target_is_directory=True)
    _refused(copy, r"tables\.s_single\.files\[0\]: .* leaves the export folder")


def test_a_manifest_that_is_a_symlink_out_is_refused(copy: Path, tmp_path: Path) -> None:
    shutil.move(copy / "manifest.json", tmp_path / "manifest.json")
    (copy / "manifest.json").symlink_to(tmp_path / "manifest.json")
    _refused(copy, r"export: no readable manifest\.json: 'manifest\.json' leaves the export folder")


def test_a_file_named_but_missing_is_refused(copy: Path) -> None:
    (copy / PART).unlink()
    _refused(copy, rf"manifest\.json: tables\.s_single\.files\[0\]: '{PART}' does not exist")


def test_a_folder_where_a_file_should_be_is_refused(copy: Path) -> None:
    (copy / PART).unlink()
    (copy / PART).mkdir()
    _refused(copy, rf"tables\.s_single\.files\[0\]: '{PART}' is not a regular file")


def test_a_folder_without_a_manifest_is_not_an_export(tmp_path: Path) -> None:
    _refused(tmp_path, r"no readable manifest\.json: 'manifest\.json' does not exist")


# ------------------------------------------------------------------------------ checksums


def test_a_changed_file_is_refused_by_its_checksum(copy: Path) -> None:
    data = bytearray((copy / PART).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / PART).write_bytes(bytes(data))
    _refused(
        copy,
        rf"tables\.s_single\.files\[0\]: '{PART}' has SHA-256 [0-9a-f]{{64}}, the manifest "
        r"records [0-9a-f]{64}: the file is damaged or was changed after export",
    )


def test_a_wrong_checksum_is_refused(copy: Path) -> None:
    _edit(copy, lambda m: m["sha256"].__setitem__("dense.pt2", "0" * 64))
    _refused(
        copy, r"dense_program: 'dense\.pt2' has SHA-256 [0-9a-f]{64}, the manifest records 0{64}"
    )


def test_a_file_without_a_checksum_is_refused(copy: Path) -> None:
    _edit(copy, lambda m: m["sha256"].pop(PART))
    _refused(copy, rf"tables\.s_single\.files\[0\]: '{PART}' has no entry in sha256")


def test_a_checksum_that_is_not_hex_sha256_is_refused(copy: Path) -> None:
    _edit(copy, lambda m: m["sha256"].__setitem__(PART, "abc"))
    _refused(copy, rf"sha256\['{PART}'\]: String should match pattern")


# ------------------------------------------------------------------------------ dims, dtypes


def _rewrite_part(copy: Path, dim: int | None = None, dtype: str = "float32") -> None:
    """The part file written again at another dim or dtype, with its checksum updated, so
    that only the column check stands between it and a reader."""
    table = pq.read_table(copy / PART)
    rows = rows_of(table)
    if dim is not None:
        rows = np.tile(rows, 2)[:, :dim]
    ids = table.column("id").to_numpy()
    pq.write_table(embedding_table(ids, rows, dtype), copy / PART)
    _edit(copy, lambda m: m["sha256"].__setitem__(PART, sha256_file(copy / PART)))


def test_a_file_of_another_dim_than_its_entry_is_refused(copy: Path) -> None:
    _rewrite_part(copy, dim=2 * DIM)
    _refused(
        copy,
        rf"export/{PART}: embedding: fixed_size_list<.*>\[{2 * DIM}\], but tables\.s_single "
        rf"\(dim {DIM}, dtype float32\) needs fixed_size_list<.*>\[{DIM}\]",
    )


def test_a_file_of_another_dtype_than_its_entry_is_refused(copy: Path) -> None:
    _rewrite_part(copy, dtype="float16")
    _refused(
        copy,
        rf"export/{PART}: embedding: fixed_size_list<.*halffloat>\[{DIM}\], but "
        rf"tables\.s_single \(dim {DIM}, dtype float32\) needs",
    )


def test_int8_columns_in_a_float_table_are_refused(copy: Path) -> None:
    _rewrite_part(copy, dtype="int8")
    _refused(copy, rf"export/{PART}: columns \['id', 'embedding', 'scale', 'bias'\], but")


def test_a_manifest_dim_that_does_not_match_the_files_is_refused(copy: Path) -> None:
    def wider(m: dict[str, Any]) -> None:
        entry = _table(m, "s_single")
        entry["dim"] = 2 * DIM
        entry["default_embedding"] *= 2
        m["input"]["feature_dims"][m["input"]["sparse"].index("s_single")] = 2 * DIM

    _edit(copy, wider)
    _refused(copy, rf"needs fixed_size_list<.*>\[{2 * DIM}\]")


def test_a_manifest_dim_that_does_not_add_up_to_the_program_input_is_refused(copy: Path) -> None:
    def wider(m: dict[str, Any]) -> None:
        entry = _table(m, "s_single")
        entry["dim"] = 2 * DIM
        entry["default_embedding"] *= 2

    _edit(copy, wider)
    _refused(copy, rf"input\.feature_dims\[0\]: {DIM} for feature 's_single', whose tables give 8")


def test_a_manifest_dtype_that_does_not_match_the_files_is_refused(copy: Path) -> None:
    _edit(copy, lambda m: _table(m, "s_single").__setitem__("dtype", "int8"))
    _refused(copy, rf"export/{PART}: columns \['id', 'embedding'\], but tables\.s_single")


# ------------------------------------------------------------------------------ schema


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda m: _table(m, "s_single").__setitem__("dtype", "float64"),
            r"tables\.s_single\.dtype: Input should be 'float32', 'float16' or 'int8'",
        ),
        (
            lambda m: _table(m, "s_single").__setitem__("dim", 0),
            r"tables\.s_single\.dim: Input should be greater than 0",
        ),
        (
            lambda m: _table(m, "s_single").__setitem__("dim", "4"),
            r"tables\.s_single\.dim: Input should be a valid integer \(got '4'\)",
        ),
        (lambda m: _table(m, "s_single").pop("dtype"), r"tables\.s_single\.dtype: Field required"),
        (
            lambda m: _table(m, "s_single").__setitem__("lookup", "mmap"),
            r"tables\.s_single\.lookup: Input should be",
        ),
        (
            lambda m: _table(m, "s_single").__setitem__("extra", 1),
            r"tables\.s_single\.extra: Extra inputs are not permitted",
        ),
        (
            lambda m: _table(m, "s_single").__setitem__("default_embedding", [0.0]),
            rf"tables\.s_single\.default_embedding: 1 values for a table of dim {DIM}",
        ),
        (
            lambda m: _table(m, "mux").__setitem__("hash", "md5"),
            r"tables\.mux\.hash: 'md5' is not the hash this reader computes",
        ),
        (
            lambda m: _table(m, "mux")["probes"].pop("s_multi"),
            r"tables\.mux\.probes: feature 's_multi' has no probes",
        ),
        (
            lambda m: _table(m, "mux").pop("num_rows"),
            r"tables\.mux\.num_rows: lookup 'hash' needs num_rows",
        ),
        (
            lambda m: _table(m, "mux").__setitem__("rows", 1000),
            r"tables\.mux\.rows: 1000 rows in a table of num_rows 97",
        ),
        (
            lambda m: _table(m, "s_single").__setitem__("rows", 1),
            r"tables\.s_single\.rows: 1, but its files hold \d+ rows",
        ),
        (
            lambda m: m["tables"].append(dict(_table(m, "mux"))),
            r"tables\.mux\.name: 'mux' names two tables",
        ),
        (
            lambda m: m["input"].__setitem__("kind", "graph"),
            r"input: Input tag 'graph'|input\.kind",
        ),
        (lambda m: m.pop("features"), r"manifest\.json: features: Field required"),
        (
            lambda m: m["features"].__setitem__("label", 3),
            r"features\.label: Input should be a valid string",
        ),
        (lambda m: m.__setitem__("tables", {}), r"tables: Input should be a valid list"),
    ],
)
def test_a_manifest_against_the_schema_is_refused_naming_the_field(
    copy: Path, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    _edit(copy, change)
    _refused(copy, message)


def test_a_missing_table_is_refused_naming_the_feature(copy: Path) -> None:
    _edit(copy, lambda m: m["tables"].remove(_table(m, "s_single")))
    _refused(copy, r"manifest\.json: input\.sparse\[0\]: feature 's_single' has no table")


def test_a_table_of_a_feature_the_program_does_not_read_is_refused(copy: Path) -> None:
    _edit(copy, lambda m: _table(m, "s_single")["features"].append("nobody"))
    _refused(copy, r"tables\.s_single\.features: 'nobody' is not in input\.sparse")


def test_unsorted_ids_are_refused(copy: Path) -> None:
    table = pq.read_table(copy / PART)
    order = np.arange(table.num_rows)[::-1].copy()
    pq.write_table(table.take(order), copy / PART)
    _edit(copy, lambda m: m["sha256"].__setitem__(PART, sha256_file(copy / PART)))
    _refused(copy, r"tables\.s_single\.files: the files' ids are not sorted and unique")


# ------------------------------------------------------------------------------ JSON, version


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"format_version": 4,', r"manifest\.json: not valid JSON: Expecting"),
        (
            '{"format_version": 4, "format_version": 4}',
            r"not valid JSON: key 'format_version' appears twice",
        ),
        ('{"format_version": NaN}', r"not valid JSON: NaN is not a JSON number"),
        ("[4]", r"manifest\.json: not a JSON object"),
    ],
)
def test_a_manifest_that_is_not_strict_json_is_refused_with_its_file(
    copy: Path, text: str, message: str
) -> None:
    (copy / "manifest.json").write_text(text)
    _refused(copy, message)


def test_a_manifest_that_is_not_utf8_is_refused(copy: Path) -> None:
    (copy / "manifest.json").write_bytes(b'{"a": "\xff"}')
    _refused(copy, r"manifest\.json: not UTF-8 text")


def test_an_unknown_format_version_is_refused(copy: Path) -> None:
    _edit(copy, lambda m: m.__setitem__("format_version", 99))
    _refused(copy, r"manifest\.json: format_version: 99 is not one this reader knows \(4\)")


@pytest.mark.parametrize("version", [1, 2, 3])
def test_an_export_from_before_checksums_is_refused_asking_to_export_again(
    copy: Path, version: int
) -> None:
    _edit(copy, lambda m: m.__setitem__("format_version", version))
    _refused(copy, rf"format_version: {version} predates checksummed exports .* `recsys export`")


# ------------------------------------------------------------------------------ base


def test_a_base_that_is_the_export_itself_is_refused(copy: Path) -> None:
    def own_base(m: dict[str, Any]) -> None:
        m["base"] = str(copy.resolve())
        m["base_sha256"] = "0" * 64

    _edit(copy, own_base)
    _refused(copy, r"manifest\.json: base: .* is this export or one it is built on")


def test_a_relative_base_is_refused(copy: Path) -> None:
    _edit(copy, lambda m: m.update(base="../base", base_sha256="0" * 64))
    _refused(copy, r"manifest\.json: base: '\.\./base': the base export is named by its absolute")


def test_a_delta_table_without_a_base_is_refused(copy: Path) -> None:
    _edit(copy, lambda m: _table(m, "s_single").update(delta=True, deleted_files=[PART]))
    _refused(copy, r"tables\.s_single\.delta: a delta table in an export without a base")


# ------------------------------------------------------------------------------ writing


def test_an_export_that_fails_midway_leaves_nothing(
    built: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tables written, the program not: no folder, no manifest, no partial folder."""

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch.export, "save", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export(built[0], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_export_over_an_earlier_one_leaves_the_earlier_one_whole(
    built: tuple[Path, Path, Path], copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch.export, "save", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export(built[0], copy)
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in copy.parent.iterdir()) == ["export"]
    monkeypatch.undo()
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
    np.testing.assert_allclose(served, _expected(run, log), atol=atol)


def test_an_unknown_dtype_or_a_delta_over_its_own_target_is_refused_before_writing(
    built: tuple[Path, Path, Path], copy: Path, tmp_path: Path
) -> None:
    with pytest.raises(ExportError, match=r"dtype 'float64' is not one of"):
        export(built[0], tmp_path / "out", dtype="float64")
    with pytest.raises(ExportError, match=r"--since names the export this one would replace"):
        export(built[0], copy, since=copy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
