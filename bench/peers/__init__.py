"""Peer libraries the benchmarks measure the engine against, each run in a venv of its own.

Nothing here imports a peer: the peer runs in a subprocess with its own interpreter, so the
engine never depends on it. Import as `peers` from a script in bench/ (bench/ is then on
sys.path) and call `run_fuxictr(job, workdir)`; fuxictr_run.py documents the job's keys.

Smoke run (synthetic 20k-row split, DeepFM and DCNv2 side by side, 2 epochs, dim 10):

    cd /work/main && .venv/bin/python -c "import sys, json; sys.path.insert(0, 'bench'); \
import peers; print(json.dumps(peers.smoke('/tmp/fuxictr_smoke'), indent=1))"
"""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .fuxictr_venv import FUXICTR_VERSION, ensure_fuxictr_venv

__all__ = ["FUXICTR_VERSION", "ensure_fuxictr_venv", "run_fuxictr", "smoke"]

RUN_SCRIPT = Path(__file__).with_name("fuxictr_run.py")


def _tail(path: Path, lines: int = 60) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_fuxictr(job: dict[str, Any], workdir: Path | str) -> dict[str, Any]:
    """Run one FuxiCTR job in the peer venv and return its result dict.

    The job is written to workdir/job.json (output_dir defaults to workdir); FuxiCTR's and
    Ray's console output goes to workdir/fuxictr.log, whose tail a failure carries. The
    environment is scrubbed of the engine's venv and RAY_ADDRESS, so the peer neither
    imports the engine's packages nor joins a Ray cluster the engine's tests started.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "fuxictr.log"
    python = ensure_fuxictr_venv(log=log)
    job = {**job, "output_dir": str(Path(job.get("output_dir", workdir)).resolve())}
    result_path = Path(job["output_dir"]) / "result.json"
    result_path.unlink(missing_ok=True)
    job_path = workdir / "job.json"
    job_path.write_text(json.dumps(job, indent=1))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["RAY_ADDRESS"] = "local"
    with open(log, "a") as out:
        proc = subprocess.run(
            [str(python), str(RUN_SCRIPT), str(job_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
            check=False,
        )
    if proc.returncode != 0 or not result_path.exists():
        raise RuntimeError(
            f"FuxiCTR {job.get('model')} failed (exit {proc.returncode}); "
            f"log {log}, last lines:\n{_tail(log)}"
        )
    return json.loads(result_path.read_text())


def smoke(
    workdir: Path | str,
    models: tuple[str, ...] = ("DeepFM", "DCNv2"),
    rows: int = 20_000,
    epochs: int = 2,
    loader: str = "ray",
) -> dict[str, dict[str, Any]]:
    """The harness end to end on a synthetic split: models in parallel, one thread each.

    Recipe as BARS' MovieLens runs except batch 512 (the split is small) and `epochs`.
    """
    workdir = Path(workdir).resolve()
    python = ensure_fuxictr_venv()
    data = workdir / "data"
    subprocess.run(
        [str(python), str(RUN_SCRIPT), "--synthetic", str(data), "--rows", str(rows)],
        check=True,
        capture_output=True,
    )
    template = json.loads((data / "job_template.json").read_text())
    common = {
        "embedding_dim": 10,
        "hidden_units": [400, 400, 400],
        "batch_norm": True,
        "embedding_regularizer": 0.01,
        "net_regularizer": 0.0,
        "learning_rate": 1e-3,
        "batch_size": 512,
        "epochs": epochs,
        "early_stop_patience": 2,
        "monitor": "AUC",
        "seed": 2019,
    }
    recipes = {
        "DeepFM": {"net_dropout": 0.3},
        "DCNv2": {"net_dropout": 0.2, "model_structure": "parallel", "num_cross_layers": 5},
        "DLRM": {"net_dropout": 0.2, "interaction_op": "cat", "bottom_mlp_units": []},
    }

    def one(model: str) -> dict[str, Any]:
        job = {
            **template,
            "model": model,
            "loader": loader,
            "torch_threads": 1,
            "params": {**common, **recipes[model]},
        }
        return run_fuxictr(job, workdir / f"{model}_{loader}")

    with ThreadPoolExecutor(len(models)) as pool:
        return dict(zip(models, pool.map(one, models), strict=True))
