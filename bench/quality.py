"""Quality on the synthetic Criteo-like log: DLRM with full tables against the generator's
oracle AUC, and against the hashing trick at a quarter of each feature's rows.

    python bench/quality.py [--rows N] [--quick] [--out DIR] [key=value ...]

Generates the log (conf/demo.yaml's generator), trains both arms with `recsys train`'s
pipeline on the embedded Ray (same data, same model, same steps), and reads each run's
held-out AUC (the last day). `key=value` overrides change the experiment as on the
command line, e.g. the generator's vocabularies and drift (`data.synthetic.vocab_max=1000
data.synthetic.daily_drift=0`): IDs first seen on the held-out day carry planted effects no
model can know, so the gap to the oracle depends on the log as much as on the model.
Last line: `RESULT quality ratio=<full AUC / oracle AUC> ...`; the goal from the issue is
full AUC within 0.01 of the oracle.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from pipelines.build import load_vocabularies
from pipelines.train.driver import train
from recsys.config import ExperimentConfig, load_config
from recsys.synth import generate

REPO = Path(__file__).resolve().parents[1]
GOAL_GAP = 0.01


def _hashed_at_quarter(cfg: ExperimentConfig, vocab_rows: dict[str, int]) -> ExperimentConfig:
    """One hashing-trick table per feature with a quarter of its full table's rows."""
    data = cfg.model_dump(mode="json")
    template = data["tables"][0]
    data["tables"] = [
        {
            **template,
            "features": [feature],
            "variant": "hash",
            "num_embeddings": max(1, vocab_rows[feature] // 4),
        }
        for feature in template["features"]
    ]
    data["train"]["run_dir"] = str(Path(cfg.train.run_dir).parent / "hash_quarter")
    return ExperimentConfig.model_validate(data)


def _run(cfg: ExperimentConfig) -> tuple[dict, float]:
    start = time.perf_counter()
    result = train(cfg)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--quick", action="store_true", help="100k rows")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench_quality")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    rows = 100_000 if args.quick else args.rows

    shutil.rmtree(args.out, ignore_errors=True)
    log = args.out / "log"
    overrides = [*args.overrides, f"data.train={log}", f"train.run_dir={args.out / 'full'}"]
    cfg = load_config(REPO / "conf" / "demo.yaml", overrides)
    generated = generate(cfg, rows=rows, out=log)
    held_out_day = sorted(generated["oracle_auc_per_day"])[-1]
    oracle = generated["oracle_auc_per_day"][held_out_day]

    full, full_s = _run(cfg)
    vocab = load_vocabularies(Path(full["run_dir"]))
    vocab_rows = {name: len(ids) + 1 for name, ids in vocab.items()}
    hashed, hashed_s = _run(_hashed_at_quarter(cfg, vocab_rows))

    full_auc = full["metrics"]["valid_auc"]
    hash_auc = hashed["metrics"]["valid_auc"]
    dim = cfg.tables[0].embedding_dim
    full_bytes = sum(vocab_rows.values()) * dim * 4
    hash_bytes = sum(max(1, r // 4) for r in vocab_rows.values()) * dim * 4
    report = {
        "rows": rows,
        "held_out_day": held_out_day,
        "oracle_auc": oracle,
        "full": {"auc": full_auc, "logloss": full["metrics"]["valid_logloss"]},
        "hash_quarter": {"auc": hash_auc, "logloss": hashed["metrics"]["valid_logloss"]},
        "table_bytes": {"full": full_bytes, "hash_quarter": hash_bytes},
        "seconds": {"full": round(full_s, 1), "hash_quarter": round(hashed_s, 1)},
        "median_vocab_rows": int(np.median(list(vocab_rows.values()))),
    }
    (args.out / "quality.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    gap = oracle - full_auc
    print(
        f"RESULT quality ratio={full_auc / oracle:.4f} goal={1 - GOAL_GAP / oracle:.4f} "
        f"met={'yes' if gap <= GOAL_GAP else 'no'} full_auc={full_auc:.4f} "
        f"oracle_auc={oracle:.4f} gap={gap:.4f} hash_quarter_auc={hash_auc:.4f} "
        f"hash_loss={full_auc - hash_auc:.4f} full_mib={full_bytes / 2**20:.1f} "
        f"hash_mib={hash_bytes / 2**20:.1f} rows={rows}"
    )


if __name__ == "__main__":
    main()
