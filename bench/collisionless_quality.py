"""Quality of collisionless tables against the hashing trick at equal rows, and what the
frequency filter saves, on the drifting synthetic Criteo-like log.

    python bench/collisionless_quality.py [--rows N] [--rows-per-table R] [--quick]

Generates conf/demo.yaml's log with vocabularies much larger than the tables, then trains
DLRM in one process through torchrec DMP (a one-rank gloo group: the fused fbgemm TBE path
of training) on all days but the last, in time order, one epoch, and scores the last day.
Arms, same data, model and steps: `hash` (the hashing trick, R rows per feature: the named
baseline), `collisionless` (R rows per feature, LRU eviction, expiry after 2 days), and for
the frequency filter, `collisionless_8x` (8R rows, rarely full) against
`collisionless_8x_min2` (the same behind min_count 2): live rows and AUC. Last line:
`RESULT collisionless_quality ratio=<AUC collisionless / AUC hash> goal=>1 met=...`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from harness import init_single_rank_group, shard_for_training, train_in_order

from pipelines.build import build_model
from recsys.batch import BatchConverter
from recsys.config import ExperimentConfig, config_from_dict, load_config
from recsys.logs import read_validated
from recsys.metrics import auc
from recsys.synth import generate
from tables.collisionless.report import table_report
from tables.collisionless.transform import bind_ownership

REPO = Path(__file__).resolve().parents[1]


def _arm(cfg: ExperimentConfig, variant: str, rows: int, **extra: object) -> ExperimentConfig:
    doc = cfg.model_dump(mode="json")
    table = doc["tables"][0]
    table.update({"variant": variant, "min_count": 1, **extra})
    if variant == "hash":
        table["num_embeddings"] = rows
    else:
        table.update(capacity=rows, ttl=2 * 86_400, evict_every=3_600)
    return config_from_dict(doc, f"arm {variant}")


def _train_and_score(cfg: ExperimentConfig, log: Path, days: list[Path]) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(cfg, {}, table_device=torch.device("meta"))
    bind_ownership(model, 0, dist.new_group(backend="gloo"))
    t = cfg.train
    sharding = {s.name: s.sharding for s in model.sparse.specs}
    dmp, optimizer = shard_for_training(model, cfg, sharding)
    tables = (part for day in days[:-1] for part in read_validated(day, cfg.features, t.batch_size))
    examples, seconds = train_in_order(dmp, optimizer, cfg, tables)
    report = table_report(dmp.module.sparse)
    convert = BatchConverter(cfg.features)
    dmp.eval()
    scores, labels = [], []
    with torch.no_grad():
        for table in read_validated(days[-1], cfg.features, batch_size=65_536):
            batch = convert(table)
            scores.append(torch.sigmoid(dmp(batch)).numpy())
            labels.append(batch.labels.numpy())
    specs = dmp.module.sparse.specs
    result = {
        "auc": auc(np.concatenate(labels), np.concatenate(scores)),
        "examples_per_s": examples / seconds,
        "table_rows": sum(s.num_rows for s in specs),
        "row_mib": sum(s.bytes for s in specs) / 2**20,
    }
    if report:
        result["live_rows"] = sum(r["live_rows"] for r in report.values())
        result["map_mib"] = sum(r["map_bytes"] for r in report.values()) / 2**20
        result["filter_mib"] = sum(r["filter_bytes"] for r in report.values()) / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000, help="log rows")
    parser.add_argument("--rows-per-table", type=int, default=2048)
    parser.add_argument("--quick", action="store_true", help="40k rows, 512 rows per table")
    args = parser.parse_args()
    rows, per_table = (40_000, 512) if args.quick else (args.rows, args.rows_per_table)
    torch.set_num_threads(1)
    base = load_config(
        REPO / "conf" / "demo.yaml",
        [
            "data.synthetic.vocab_max=200000",
            "data.synthetic.days=4",
            "train.workers=1",
            "train.batch_size=1024",
        ],
    )
    arms = {
        "hash": _arm(base, "hash", per_table),
        "collisionless": _arm(base, "collisionless", per_table),
        "collisionless_8x": _arm(base, "collisionless", 8 * per_table),
        "collisionless_8x_min2": _arm(base, "collisionless", 8 * per_table, min_count=2),
    }
    init_single_rank_group()
    out = Path(tempfile.mkdtemp(prefix="cl_quality_"))
    try:
        generate(base, rows=rows, out=out / "log")
        days = sorted((out / "log").glob("day=*"))
        results = {}
        for name, cfg in arms.items():
            results[name] = _train_and_score(cfg, out / "log", days)
            fields = " ".join(f"{k}={v:.4g}" for k, v in results[name].items())
            print(f"{name}: {fields}", flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        dist.destroy_process_group()
    cl, hashed = results["collisionless"], results["hash"]
    big, filtered = results["collisionless_8x"], results["collisionless_8x_min2"]
    ratio = cl["auc"] / hashed["auc"]
    print(
        f"RESULT collisionless_quality ratio={ratio:.4f} goal=>1 "
        f"met={'yes' if ratio > 1 else 'no'} auc_collisionless={cl['auc']:.4f} "
        f"auc_hash={hashed['auc']:.4f} auc_8x={big['auc']:.4f} auc_8x_min2={filtered['auc']:.4f} "
        f"live_rows_8x={big['live_rows']} live_rows_8x_min2={filtered['live_rows']} "
        f"rows_per_table={per_table} log_rows={rows}"
    )


if __name__ == "__main__":
    main()
