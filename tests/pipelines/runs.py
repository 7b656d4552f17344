"""Small Ray training runs for the pipeline tests: a config whose log and run folder live
in a test's temporary folder, and a run trained once per module on embedded Ray."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl
import pytest
import ray
from sklearn.metrics import roc_auc_score

from pipelines.train.driver import train
from pipelines.train.split import make_split
from recsys.config import ExperimentConfig, load_config
from recsys.logs import scan_log
from recsys.synth import generate
from tests.helpers import trained_probabilities

REPO = Path(__file__).resolve().parents[2]
HELD_OUT_DAY = "day=2026-01-03"  # the last of three synthetic days: the validation split
SMALL_CTR = (  # conf/demo.yaml cut down to seconds per epoch
    "data.synthetic.days=3",
    "tables.0.embedding_dim=8",
    "model.dense_arch=[16, 8]",
    "model.over_arch=[32]",
    "train.batch_size=1024",
)


def run_config(conf: str, tmp: Path, *overrides: str) -> ExperimentConfig:
    """`conf/<conf>` with its log under `tmp/log` and its runs under `tmp/runs`."""
    return load_config(
        REPO / "conf" / conf,
        [f"data.train={tmp / 'log'}", f"train.run_dir={tmp / 'runs'}", *overrides],
    )


def module_run(config: Callable[[Path], ExperimentConfig], rows: int) -> Callable:
    """A module-scoped fixture giving (cfg, tmp, train's result): `config(tmp)` trained once
    on `rows` rows of its synthetic log. Ray is shut down after the module's last test, so
    the next module starts its own."""

    @pytest.fixture(scope="module")
    def trained(
        tmp_path_factory: pytest.TempPathFactory,
    ) -> Iterator[tuple[ExperimentConfig, Path, dict]]:
        tmp = tmp_path_factory.mktemp("run")
        cfg = config(tmp)
        generate(cfg, rows=rows, out=tmp / "log")
        try:
            yield cfg, tmp, train(cfg)
        finally:
            ray.shutdown()

    return trained


def validation_auc(cfg: ExperimentConfig, run: str | Path, tmp: Path) -> float:
    """sklearn's AUC of the run's best checkpoint, unsharded, on its validation split:
    the independent reference for the `valid_auc` that training reports."""
    split = make_split(cfg)
    rows = scan_log(split.valid_files or split.train_files)
    if split.held_out is not None:
        rows = rows.filter(split.held_out.fill_null(False))
    path = tmp / "validation_rows.parquet"
    rows.collect().write_parquet(path)
    labels = pl.read_parquet(path)[cfg.features.label].to_numpy()
    return float(roc_auc_score(labels, trained_probabilities(run, path)))
