"""float16 and int8 exports: values float16 cannot hold are refused, naming the table, and
every table reports the largest change its storage made, which bounds what serving reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipelines.build import build_model, save_vocabularies
from pipelines.export.writer import export
from pipelines.train.checkpoint import save_checkpoint
from recsys.config import config_from_dict
from recsys.serving.format import rows_of
from recsys.serving.manifest import ExportError, read_export
from tables.vocab import build_vocabularies
from tests.pipelines.test_predict_traffic import _ctr


def _run(tmp_path: Path, large: float | None = None) -> tuple[Path, torch.nn.Module]:
    """A DLRM run written by hand; `large` is planted in two values of table s_nullable."""
    doc, table = _ctr("dlrm")
    cfg = config_from_dict(doc)
    pq.write_table(table, tmp_path / "log.parquet")
    vocab = build_vocabularies(cfg, tmp_path / "log.parquet")
    torch.manual_seed(0)
    model = build_model(cfg, vocab)
    if large is not None:
        with torch.no_grad():
            model.sparse.ebc.embedding_bags["s_nullable"].weight[[3, 5], 1] = large
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    save_vocabularies(run, vocab)
    save_checkpoint(run, model, torch.optim.SGD(model.parameters(), lr=0.1), {"step": 0})
    return run, model


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_each_table_reports_the_largest_change_its_storage_made(dtype: str, tmp_path: Path) -> None:
    run, model = _run(tmp_path)
    summary = export(run, tmp_path / "export", dtype=dtype)
    loaded = read_export(tmp_path / "export")
    for entry in loaded.manifest.tables:
        trained = model.sparse.ebc.embedding_bags[entry.name].weight.detach().numpy()
        stored = np.concatenate([rows_of(pq.read_table(loaded.path(f))) for f in entry.files])
        rows = trained[1:] if entry.lookup == "id" else trained  # row 0: the OOV default
        measured = float(np.abs(stored - rows).max())
        assert entry.storage_error == pytest.approx(measured, abs=1e-12)
        assert summary["storage_error"][entry.name] == entry.storage_error
        if dtype == "float32":
            assert measured == 0.0
        else:  # half a step of the format's grid at the rows' magnitude, and not zero
            step = np.abs(rows).max() * (2.0**-10 if dtype == "float16" else 2 / 255)
            assert 0 < measured <= step


def test_float16_refuses_values_beyond_its_range_and_leaves_no_export(tmp_path: Path) -> None:
    run, _ = _run(tmp_path, large=-7e4)
    with pytest.raises(ExportError, match=r"table 's_nullable': 2 values beyond float16's"):
        export(run, tmp_path / "export", dtype="float16")
    assert not (tmp_path / "export").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export")] == []
    export(run, tmp_path / "export", dtype="int8")  # int8 scales each row: it holds them
    assert read_export(tmp_path / "export").manifest.tables[0].dtype == "int8"
