"""OptEmbed end to end on a real embedded Ray: supernet training on 2 workers, search
(resumed), retrain, compact export scored by the serving loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import ray

from pipelines.build import load_trained
from pipelines.export.writer import export
from pipelines.optembed import BEST_FILE, CURVE_PNG, SEARCH_DIR, STATE_FILE, retrain, search
from pipelines.train.driver import train
from recsys.config import ExperimentConfig
from recsys.serving.model import ServingModel
from recsys.synth import generate
from tests.helpers import trained_probabilities
from tests.pipelines.runs import HELD_OUT_DAY, SMALL_CTR, module_run, run_config


def _config(tmp: Path, *extra: str) -> ExperimentConfig:
    return run_config(
        "demo.yaml",
        tmp,
        *SMALL_CTR,
        "tables.0.variant=optembed",
        "tables.0.storage=full",
        "train.log_every=5",
        "optembed.alpha=0.01",
        "optembed.threshold_lr=0.05",
        "optembed.search={rounds: 1, mutations: 2, crossovers: 2, parents: 2, workers: 2}",
        *extra,
    )


supernet = module_run(_config, rows=30_000)


def test_supernet_trains_thresholds_and_keeps_them_in_its_checkpoint(supernet) -> None:
    _, _, result = supernet
    assert 0.5 < result["metrics"]["valid_auc"] < 1.0
    _, model, _ = load_trained(result["run_dir"])
    thresholds = model.sparse.pooling.thresholds.threshold
    assert bool((thresholds > 0).all())  # the regularizer and the loss moved every one


def test_search_resumes_then_retrain_exports_a_compact_table(supernet, repo: Path) -> None:
    cfg, tmp, result = supernet
    run = Path(result["run_dir"])
    first = search(cfg)
    state = json.loads((run / SEARCH_DIR / STATE_FILE).read_text())
    assert state["round"] == 1 and first["rounds"] == 1
    more = _config(tmp, "optembed.search.rounds=2")
    best = search(more)  # resumes at round 1 rather than starting over
    assert best["rounds"] == 2 and best["valid_auc"] >= first["valid_auc"]
    assert (run / SEARCH_DIR / CURVE_PNG).stat().st_size > 5_000
    assert json.loads((run / SEARCH_DIR / BEST_FILE).read_text())["dims"] == best["dims"]
    assert set(best["dims"]) == {f.name for f in cfg.features.sparse}

    retrained = retrain(more)
    assert retrained["metrics"]["valid_auc"] > 0.5
    summary = export(retrained["run_dir"], tmp / "compact")
    assert summary["bytes"] < summary["uncompacted_bytes"]
    data = tmp / "log" / HELD_OUT_DAY
    served = ServingModel(tmp / "compact").predict(data).column("prob").to_numpy()
    np.testing.assert_allclose(served, trained_probabilities(retrained["run_dir"], data), atol=1e-6)


def test_collisionless_storage_end_to_end(tmp_path: Path, repo: Path) -> None:
    """Supernet over collisionless storage on 2 workers (IDs routed to their owners),
    search, a retrain that admits only the kept IDs, and the compact export of those."""
    cfg = _config(tmp_path, "tables.0.storage=collisionless", "tables.0.capacity=3000")
    generate(cfg, rows=30_000, out=tmp_path / "log")
    supernet = train(cfg)
    assert supernet["metrics"]["tables"]  # the table report reads optembed's collections
    search(cfg)
    retrained = retrain(cfg)
    assert retrained["metrics"]["valid_auc"] > 0.5
    summary = export(retrained["run_dir"], tmp_path / "compact")
    assert summary["bytes"] < summary["uncompacted_bytes"]
    data = tmp_path / "log" / HELD_OUT_DAY
    served = ServingModel(tmp_path / "compact").predict(data).column("prob").to_numpy()
    np.testing.assert_allclose(served, trained_probabilities(retrained["run_dir"], data), atol=1e-6)
    ray.shutdown()
