"""Sequence models on a real behaviour log: DIN, TWIN and DARE against a no-history DLRM on
MovieLens-100K.

    .venv/bin/python bench/real_sequence.py [--quick] [--seeds N] [--first-seed S]
        [--models DIN,TWIN,DARE,DLRM] [--epochs E] [--workdir DIR]

Data: `recsys convert movielens` (cached under $RECSYS_BENCH_CACHE or ~/.cache/recsys-bench,
reused) writes the sequence log: each rating (>= 4 is a click) with the user's up to 200
strictly earlier ratings as (item, category = first genre, timestamp) history, as in
conf/movielens_sequence.yaml. One fixed time split by UTC day: test = the newest days
holding about 10% of rows, valid = the days before holding about 10% (`data.valid`, which
validates every epoch, picks the best checkpoint and stops early), train = the rest.

Models (conf/movielens_sequence.yaml's features and tables: item and category 16 wide, the
user-side table 8 wide): DIN (attends over its din_length 200 most recent behaviours, here
the whole history), TWIN (top-20 two-stage search, then attention), DARE (TWIN's search
and attention on decoupled tables: attention and representation embeddings of 16 each, as
in the paper's Table 1 at d16) and DLRM over the same features minus the history (item,
category, user, age, gender, occupation; top MLP [200, 80] like the sequence models'
head; all its tables 16 wide, since the engine's DLRM takes one width for all tables, so
its user side gets more room than the sequence models', not less). The same training for
all (TRAINING), not tuned per model and never on test: batch 512, dense Adam 1e-3,
row-wise Adagrad 0.05 on the tables, up to EPOCHS epochs with patience 1 on valid AUC;
the best epoch is scored on test by `recsys evaluate`.

Each run is `recsys train` then `recsys evaluate --data test.parquet` (subprocesses, output
in the workdir's logs); wall = both. Metrics on test: AUC and GAUC (grouped by user, users
with one class skipped), mean ± std [min, max] over seeds, and per-seed differences to
DLRM. Whether the paper's order (DARE > TWIN > DIN on AUC) held is printed as observed, not
assumed: MovieLens histories (<= 200) fit DIN's window, which is not the long-sequence
setting the paper ranks the models in.

Goal: each history model's mean test AUC above the no-history DLRM's. Last line:
`RESULT real_sequence ratio=<smallest (history model mean AUC - DLRM mean AUC)> goal=>0
met=yes|no ...`. Default: 3 seeds x 4 models, about 30 minutes on 2 idle cores. `--quick`:
the newest ~20k rows, DIN only, one seed, one epoch: a smoke run of the plumbing, which
cannot answer the goal (met=no).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from real_logs import (
    REPO,
    EngineRun,
    TimeSplit,
    all_runs_line,
    engine_runs,
    fresh_split,
    load_avg,
    run_line,
    spread,
    table,
)

CONF = REPO / "conf" / "movielens_sequence.yaml"
EPOCHS = 5  # patience 1 usually stops them sooner; caps the default near 30 minutes
TRAINING: dict[str, Any] = {
    "workers": 1,
    "batch_size": 512,
    "dense_optimizer": "adam",
    "dense_lr": 1e-3,
    "sparse_optimizer": "rowwise_adagrad",
    "sparse_lr": 0.05,
    "patience": 1,
    "monitor": "auc",
    "log_every": 50,
}
HISTORY_MODELS = ("DIN", "TWIN", "DARE")
BASELINE = "DLRM"
MODELS = (*HISTORY_MODELS, BASELINE)
PAPER_ORDER = ("DARE", "TWIN", "DIN")
QUICK_ROWS = 20_000


def engine_config(
    model: str, seed: int, split: TimeSplit, run_dir: Path, epochs: int
) -> dict[str, Any]:
    """conf/movielens_sequence.yaml on the split files, as `model`."""
    cfg = copy.deepcopy(yaml.safe_load(CONF.read_text()))
    cfg["name"] = f"{model.lower()}_seed{seed}"
    cfg["data"] = {
        "train": str(split.files["train"]),
        "valid": str(split.files["valid"]),
        "test": str(split.files["test"]),
        "shuffle_buffer": split.rows["train"],  # a full shuffle every epoch
    }
    cfg["train"] = {**TRAINING, "epochs": epochs, "seed": seed, "run_dir": str(run_dir)}
    if model == "DIN":
        cfg["model"] = {"name": "din", "din_length": 200}
    elif model == "TWIN":
        cfg["model"] = {"name": "twin", "top_k": 20}
    elif model == "DARE":
        cfg["model"] = {"name": "dare", "top_k": 20}
        for t in cfg["tables"]:
            if t.get("name") in ("item", "category"):
                t.update(variant="decoupled", storage="full", attention_dim=t["embedding_dim"])
    elif model == BASELINE:
        cfg["model"] = {"name": "dlrm", "over_arch": [200, 80]}
        del cfg["features"]["sequences"], cfg["features"]["sequence_timestamps"]
        for t in cfg["tables"]:  # the engine's DLRM takes one width for all tables
            t["embedding_dim"] = 16
    return cfg


def order_of(means: dict[str, float]) -> str:
    return " > ".join(sorted(means, key=lambda m: -means[m]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (see the docstring)")
    parser.add_argument("--seeds", type=int, help="seeds per model (default 3; quick 1)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--models", help="comma-separated, of " + ",".join(MODELS))
    parser.add_argument("--epochs", type=int, help=f"most epochs (default {EPOCHS}; quick 1)")
    parser.add_argument(
        "--workdir", type=Path, help="default <bench cache>/real_sequence (_quick); emptied first"
    )
    args = parser.parse_args()
    seeds_n = args.seeds or (1 if args.quick else 3)
    epochs = args.epochs or (1 if args.quick else EPOCHS)
    models = (args.models or ("DIN" if args.quick else ",".join(MODELS))).split(",")
    if unknown := [m for m in models if m not in MODELS]:
        parser.error(f"unknown models {unknown}; known: {list(MODELS)}")
    seeds = [args.first_seed + i for i in range(seeds_n)]

    began = time.perf_counter()
    workdir, split = fresh_split("sequence", "sequence", args.workdir, args.quick, QUICK_ROWS)
    print(
        f"up to {epochs} epochs, patience {TRAINING['patience']} on valid AUC; seeds {seeds}; "
        f"models {models}; logs and runs under {workdir}; load average {load_avg()}"
    )

    runs: dict[str, list[EngineRun]] = {m: [] for m in models}
    # Models alternate within a seed, so that load hits each alike.
    cases = [(model, seed) for seed in seeds for model in models]
    configure = partial(engine_config, split=split, run_dir=workdir / "runs", epochs=epochs)
    for model, seed, run in engine_runs(cases, configure, workdir, split.files["test"]):
        runs[model].append(run)
        print(
            f"{model} seed {seed}: {run_line(run, ('auc', 'gauc', 'logloss'))}; load {load_avg()}",
            flush=True,
        )

    def mean(model: str, key: str) -> float:
        return statistics.fmean(r.report[key] for r in runs[model])

    print(all_runs_line(began))
    print(f"test split, {len(seeds)} seeds: mean ± std [min, max]")
    rows = [
        [
            model,
            spread([r.report["auc"] for r in rs]),
            spread([r.report["gauc"] for r in rs]),
            spread([r.report["logloss"] for r in rs], 4, False),
            ",".join(str(r.epochs) for r in rs),
            spread([r.wall_s for r in rs], 0, False),
            spread([r.peak_pss_mib for r in rs], 0, False),
        ]
        for model, rs in runs.items()
    ]
    header = ["model", "test AUC", "test GAUC", "logloss", "epochs", "wall s", "peak PSS MiB"]
    print("\n".join(table(header, rows)))

    yn = {True: "yes", False: "no"}
    history = [m for m in HISTORY_MODELS if m in runs]
    if BASELINE in runs:
        for model in history:  # paired by seed: same split, same seed
            diffs = {
                k: [
                    a.report[k] - b.report[k]
                    for a, b in zip(runs[model], runs[BASELINE], strict=True)
                ]
                for k in ("auc", "gauc")
            }
            print(
                f"{model} - {BASELINE} per seed: AUC {spread(diffs['auc'])}, "
                f"GAUC {spread(diffs['gauc'])}"
            )
    if all(m in runs for m in PAPER_ORDER):
        for key in ("auc", "gauc"):
            means = {m: mean(m, key) for m in PAPER_ORDER}
            held = means["DARE"] > means["TWIN"] > means["DIN"]
            print(
                f"paper's order DARE > TWIN > DIN on mean test {key.upper()}: "
                f"{'held' if held else 'did not hold'} (observed {order_of(means)})"
            )
    means = {m: mean(m, "auc") for m in runs}
    if means:
        print(f"best on mean test AUC: {order_of(means).split(' > ')[0]} ({order_of(means)})")

    if BASELINE not in runs or not history:
        print(f"goal needs {BASELINE} and a history model: not measured")
        print(f"RESULT real_sequence ratio=nan goal=>0 met=no models={','.join(models)}")
        return
    gaps = {m: means[m] - means[BASELINE] for m in history}
    for model, gap in gaps.items():
        print(f"goal {model} mean test AUC > {BASELINE}'s: {yn[gap > 0]} ({gap:+.4f})")
    worst = min(gaps, key=lambda m: gaps[m])
    met = all(g > 0 for g in gaps.values()) and len(history) == len(HISTORY_MODELS)
    print(
        f"RESULT real_sequence ratio={gaps[worst]:+.4f} goal=>0 met={yn[met]} worst={worst} "
        f"seeds={len(seeds)} epochs_max={epochs} "
        + " ".join(f"{m.lower()}_auc={means[m]:.4f}" for m in runs)
        + " "
        + " ".join(f"{m.lower()}_gauc={mean(m, 'gauc'):.4f}" for m in runs)
    )


if __name__ == "__main__":
    main()
