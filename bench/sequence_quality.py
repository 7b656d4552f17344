"""Quality on the synthetic long-sequence log: DIN, TWIN, TWIN with projections and DARE.

    python bench/sequence_quality.py [--quick] [--rows N] [--seeds N] [--first-seed S]
                                      [--arms A,B] [--keep DIR] [key=value ...]

For each seed, generates a Taobao-shaped log (conf/taobao_synth.yaml's generator at SCALE,
the generator and training seeded alike), then trains every model in one process through
torchrec DMP on a one-rank gloo group (the fused fbgemm table path of `recsys train`) on all
days but the last, in time order, and scores the last day: AUC, GAUC over target categories
(the paper's grouping) and logloss, next to the generator's oracle AUC on that day and the
paper's Taobao d16 figures. Same data, dims (16 per field; DARE's attention and
representation tables both 16, as in the paper's Table 1), optimizers and steps for every
model. `key=value` overrides change the experiment for every model alike.

Scale: 5,000 items in 100 categories, so that the log shows a target item several times
(at 50,000 items, about once: no model learned the item factors, and every model sat near
the AUC of mean pooling). Histories of 300-1,000 behaviours, longer than the 200 recent
ones DIN attends over, so that the comparison is the long-sequence one: with histories of
50-200 DIN sees every behaviour and tied DARE (seeds 0-2, 60,000 rows: AUC 0.7937 vs
0.7921). The training settings (TRAINING) were chosen on held-out days of logs with other
generator seeds (100+), never per model; the history lengths were then set for the reason
above, and the outcome was checked on seeds 100-102 as well as 0-2.
About 4 minutes on 2 cores by default (3 seeds of 20,000 rows), under a minute with --quick,
which is a smoke run: one small seed, where DARE's lead over TWIN is within the per-seed
spread and can come out negative (met=no), so only the default run answers the goal.

Goal (SPECS 4, issue 7): DARE above TWIN and DIN on mean AUC and mean GAUC, and above TWIN
with projections on mean AUC (projections do not close the gap). Last line:
`RESULT sequence_quality ratio=<DARE AUC - best of DIN, TWIN AUC> goal=>0 met=yes|no ...`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.distributed as dist
from harness import init_single_rank_group, shard_for_training, train_in_order

from pipelines.build import build_model
from recsys.batch import BatchConverter
from recsys.config import ExperimentConfig, load_config
from recsys.logs import parquet_files, read_validated
from recsys.metrics import auc, gauc, logloss
from recsys.synth import generate
from tables.vocab import build_vocabularies

REPO = Path(__file__).resolve().parents[1]
SCALE = [
    "data.synthetic.num_users=2000",
    "data.synthetic.num_items=5000",
    "data.synthetic.num_categories=100",
    "data.synthetic.min_history=300",  # longer than DIN's window (model.din_length 200)
    "data.synthetic.max_history=1000",
]
TRAINING = [
    "train.batch_size=128",
    "train.sparse_lr=0.2",  # rowwise Adagrad; 0.05 was worse for every model
    "train.dense_lr=0.003",
    "train.epochs=1",
]
# Item vocabularies instead of the 1M-row hashed table: rows the small log actually uses.
COUPLED = ["tables.0.variant=full", "tables.0.num_embeddings=null"]
DECOUPLED = ["tables.0.storage=full", "tables.0.num_embeddings=null"]
ARMS = {
    "DIN": ("taobao_synth", ["model.name=din", *COUPLED]),
    "TWIN": ("taobao_synth", ["model.name=twin", *COUPLED]),
    "TWIN w/ proj": ("taobao_synth", ["model.name=twin_proj", *COUPLED]),
    "DARE": ("taobao_dare", DECOUPLED),
}
BASELINES = ("DIN", "TWIN")
PAPER_TAOBAO_D16 = {"DIN": 0.90442, "TWIN": 0.91688, "TWIN w/ proj": 0.89642, "DARE": 0.92568}
DEFAULT_ROWS, QUICK_ROWS = 20_000, 6_000


def _train_and_score(cfg: ExperimentConfig, log: Path) -> dict[str, float]:
    """Train on every day but the last, in time order; metrics on the last day."""
    *train_days, test_day = sorted(log.glob("day=*"))
    torch.manual_seed(cfg.train.seed)
    train_files = [str(p) for day in train_days for p in parquet_files(day)]
    vocabularies = build_vocabularies(cfg, pl.scan_parquet(train_files, hive_partitioning=False))
    model = build_model(cfg, vocabularies, torch.device("meta"))
    t = cfg.train
    dmp, optimizer = shard_for_training(model, cfg, model.table_sharding())
    tables = (
        part
        for _ in range(t.epochs)
        for day in train_days
        for part in read_validated(day, cfg.features, t.batch_size)
    )
    examples, seconds = train_in_order(dmp, optimizer, cfg, tables)
    convert = BatchConverter(cfg.features)
    dmp.eval()
    probs, labels, groups = [], [], []
    with torch.no_grad():
        for table in read_validated(test_day, cfg.features, batch_size=8192):
            probs.append(torch.sigmoid(dmp(convert(table))).numpy())
            labels.append(table[cfg.features.label].to_numpy())
            groups.append(table[cfg.data.synthetic.category_feature].to_numpy())
    y, p, g = (np.concatenate(x) for x in (labels, probs, groups))
    return {
        "auc": auc(y, p),
        "gauc": gauc(y, p, g).value,
        "logloss": logloss(y, p),
        "examples_per_s": examples / seconds,
        "train_s": seconds,
    }


def _oracle_auc(summary: dict) -> float:
    per_day = summary["oracle_auc_per_day"]
    return per_day[sorted(per_day)[-1]]


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{mean:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--seeds", type=int, default=3, help="generator and training seeds")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ROWS} rows, one seed")
    parser.add_argument("--keep", type=Path, help="write the logs here instead of a temp dir")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset")
    parser.add_argument("overrides", nargs="*", help="config key=value for every model")
    args = parser.parse_args()
    rows, seeds = (QUICK_ROWS, 1) if args.quick else (args.rows, args.seeds)
    arms = args.arms.split(",")
    if unknown := set(arms) - set(ARMS):
        parser.error(f"--arms: unknown {sorted(unknown)}; known: {list(ARMS)}")
    torch.set_num_threads(1)
    init_single_rank_group()
    out = args.keep or Path(tempfile.mkdtemp(prefix="seq_quality_"))
    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in arms}
    oracles = []
    began = time.perf_counter()
    try:
        for seed in range(args.first_seed, args.first_seed + seeds):
            common = [*SCALE, *TRAINING, *args.overrides]
            common += [f"data.synthetic.seed={seed}", f"train.seed={seed}"]
            log = out / f"log_seed{seed}"
            base = load_config(REPO / "conf" / "taobao_synth.yaml", common)
            oracles.append(_oracle_auc(generate(base, rows=rows, out=log)))
            print(f"seed {seed}: {rows} rows, oracle AUC {oracles[-1]:.4f}", flush=True)
            for arm in arms:
                conf, overrides = ARMS[arm]
                cfg = load_config(REPO / "conf" / f"{conf}.yaml", [*common, *overrides])
                results[arm].append(_train_and_score(cfg, log))
                fields = " ".join(f"{k}={v:.4f}" for k, v in results[arm][-1].items())
                print(f"  {arm}: {fields}", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(out, ignore_errors=True)
        dist.destroy_process_group()

    def mean(arm: str, key: str) -> float:
        return statistics.fmean(r[key] for r in results[arm])

    print(
        f"\nlast day held out; {rows} rows per seed, seeds {args.first_seed}.."
        f"{args.first_seed + seeds - 1}; oracle AUC {_spread(oracles)}; "
        f"{time.perf_counter() - began:.0f} s; overrides: {' '.join(args.overrides) or '-'}"
    )
    print(
        "| model | AUC | GAUC (category) | logloss | examples/s | AUC - TWIN "
        "| paper Taobao d16 AUC | paper AUC - TWIN |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    twin = mean("TWIN", "auc") if "TWIN" in results else float("nan")
    for arm, runs in results.items():
        cells = [_spread([r[k] for r in runs]) for k in ("auc", "gauc", "logloss")]
        paper, paper_twin = PAPER_TAOBAO_D16[arm], PAPER_TAOBAO_D16["TWIN"]
        print(
            f"| {arm} | {' | '.join(cells)} | {mean(arm, 'examples_per_s'):.0f} "
            f"| {mean(arm, 'auc') - twin:+.4f} | {paper} | {paper - paper_twin:+.4f} |"
        )
    if not set(ARMS) <= set(results):
        return
    for arm in ("DIN", "TWIN", "TWIN w/ proj"):  # paired by seed: same data, same init seed
        diffs = {
            k: _spread([d[k] - b[k] for d, b in zip(results["DARE"], results[arm], strict=True)])
            for k in ("auc", "gauc")
        }
        print(f"DARE - {arm}, per seed: AUC {diffs['auc']}, GAUC {diffs['gauc']}")
    best = max(BASELINES, key=lambda b: mean(b, "auc"))
    gap = mean("DARE", "auc") - mean(best, "auc")
    met = all(mean("DARE", k) > mean(b, k) for k in ("auc", "gauc") for b in BASELINES)
    met = met and mean("DARE", "auc") > mean("TWIN w/ proj", "auc")
    keys = {arm: arm.replace(" w/ ", "_").lower() for arm in results}
    print(
        f"RESULT sequence_quality ratio={gap:.4f} goal=>0 met={'yes' if met else 'no'} "
        f"best_baseline={keys[best]} oracle_auc={statistics.fmean(oracles):.4f} seeds={seeds} "
        + " ".join(
            f"{keys[arm]}_auc={mean(arm, 'auc'):.4f} {keys[arm]}_gauc={mean(arm, 'gauc'):.4f}"
            for arm in results
        )
    )


if __name__ == "__main__":
    main()
