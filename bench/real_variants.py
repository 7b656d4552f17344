"""The table variants side by side at equal memory on a real log: MovieLens-100K CTR, DLRM
and DCN-v2, each paper's claim tested as a line of its own.

    .venv/bin/python bench/real_variants.py [--quick] [--seeds N] [--models DLRM,DCNv2]
        [--budgets 0.0625,0.25] [--epochs E] [--with-qr] [--fresh] [--workdir DIR]

Data: the MovieLens-100K CTR log of `recsys convert movielens` (cached, see
bench/real_logs.py), split by UTC day into train / valid / test (the newest ~10% of rows
test, the ~10% before valid). Recipe (bench/real_ctr.py's, as trained there): embedding dim
16, N(0, 1e-4^2) rows, row-wise Adagrad lr 0.01 with embedding L2 0.01, MLP [400, 400, 400]
with batch norm and dropout 0.2, dense Adam 1e-3, batch 4096, gradient norm clipped at 10,
validation every epoch, learning rates x0.1 on each plateau, early stopping, and the best
epoch's checkpoint scored on test. To fit 30 minutes on 2 cores the runs stop after
EPOCHS epochs or PATIENCE validations without a better AUC (the full tables peak at epoch
2-6 on valid), and OptEmbed's search runs SEARCH_ROUNDS rounds, not the paper's 30.

The arms (`recsys sweep`, pipelines/sweep.py, one embedded Ray for every run): full
vocabulary tables; hashing, and multiplexed (Unified Embedding: every entry's features in
one table, probes as the config's entries set them, 1) at the budgets (fractions of the full
tables' parameters), qr too with --with-qr; collisionless ID maps (Monolith) with room for
every ID, without and with `min_count: 2`; OptEmbed over full tables (supernet, dimension
search, retrain, compact export; the paper's alpha 1e-5 and threshold lr 1e-4); and hashing
again at the bytes of the collisionless tables. Bytes are rows + optimizer state + ID maps
(vocabularies' and collisionless maps' IDs, the compact export's kept IDs).

Claims (per model; `met=yes` only when every line holds, none tuned to pass):
  * Unified Embedding: at each budget <= 1/4, multiplexed mean test AUC >= hashing's (same
    parameters), and at the smallest budget above it by more than the seeds' spread (the
    larger of the two standard deviations).
  * OptEmbed: the retrained compact model's mean test AUC >= the full tables' - 0.002 with
    at most half their bytes; the pruned rows per feature and the searched dims are shown.
  * Monolith: collisionless matches full (mean test AUC within the seeds' spread); its
    bytes follow live IDs (bytes per live ID of the filtered tables within 10% of the
    unfiltered ones'); min_count 2 cuts live rows (fraction and AUC cost reported); hashing
    at the collisionless tables' bytes has a lower mean test AUC.
Last line: `RESULT real_variants ratio=<claims held / claims> goal=1 met=yes|no ...`.

The workdir (default <bench cache>/real_variants, `_quick` with --quick) keeps finished
runs: running again resumes an interrupted bench and reuses what finished (--fresh empties
it). `--quick`: the newest ~20k rows, DLRM, one seed, one epoch, budget 1/4, a two-round
search: a smoke run of the plumbing whose claims mean nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from real_logs import (
    bench_cache,
    load_avg,
    movielens_ctr_sections,
    movielens_log,
    table,
    time_split,
)

from pipelines.sweep import POINTS_DIR, sweep
from recsys.config import ExperimentConfig, config_from_dict
from tables.budget import VARIANTS

EMBEDDING_DIM = 16
EPOCHS, PATIENCE = 8, 1
SEARCH_ROUNDS = 8
QUICK_ROWS = 20_000
MODELS: dict[str, dict[str, Any]] = {
    "DLRM": {"name": "dlrm", "dropout": 0.2},
    "DCNv2": {"name": "dcnv2", "dropout": 0.2, "cross_layers": 5, "cross_structure": "parallel"},
}
SPREAD_TOLERANCE = 0.002  # OptEmbed: AUC the compact model may lose
BYTES_SHARE = 0.5  # OptEmbed: of the full tables' bytes
PROPORTIONAL = 0.10  # Monolith: bytes per live ID, filtered vs unfiltered


def experiment(model: str, split: dict[str, Path], rows: int, args: argparse.Namespace) -> Any:
    """The recipe on the three split files, as a validated config."""
    init = {"distribution": "normal", "std": 1e-4}
    doc = {
        "name": model.lower(),
        "data": {
            "train": str(split["train"]),
            "valid": str(split["valid"]),
            "test": str(split["test"]),
            "shuffle_buffer": rows,  # a full shuffle every epoch
        },
        **movielens_ctr_sections(EMBEDDING_DIM, init),
        "model": {**MODELS[model], "over_arch": [400, 400, 400], "batch_norm": True},
        "train": {
            "workers": 1,
            "batch_size": 4096,
            "epochs": args.epochs,
            "dense_optimizer": "adam",
            "dense_lr": 1e-3,
            "sparse_optimizer": "rowwise_adagrad",
            "sparse_lr": 0.01,
            "embedding_l2": 0.01,
            "clip_grad_norm": 10.0,
            "lr_decay": 0.1,
            "min_lr": 1e-6,
            "patience": PATIENCE,
            "monitor": "auc",
            "log_every": 10,
            "keep_checkpoints": 1,
        },
        "optembed": {
            "search": {
                "rounds": args.search_rounds,
                "mutations": 10,
                "crossovers": 10,
                "parents": 10,
                "workers": 2,
            }
        },
    }
    if args.quick:
        doc["optembed"]["search"].update(mutations=4, crossovers=4, parents=4)
    return config_from_dict(doc, f"bench real_variants {model}")


def hash_budget_at(frontier: dict[tuple[str, float], dict[str, Any]], bytes_: float) -> float:
    """The budget at which hashed tables (row-wise Adagrad: dim + 1 floats a row) hold
    `bytes_`."""
    full = frontier["full", 1.0]
    per_parameter = 4 * (EMBEDDING_DIM + 1) / EMBEDDING_DIM
    return float(f"{bytes_ / (full['parameters'] * per_parameter):.4g}")


def fmt(row: dict[str, Any], key: str, digits: int = 4) -> str:
    return f"{row[f'{key}_mean']:.{digits}f} ± {row[f'{key}_std']:.{digits}f}"


def show_frontier(model: str, rows: list[dict[str, Any]]) -> None:
    full = next(r for r in rows if r["variant"] == "full")
    lines = [
        [
            r["variant"],
            f"{r['budget']:g}",
            f"{r['bytes'] / 1024:,.0f}"
            + (f" ± {r['bytes_std'] / 1024:,.0f}" if r["bytes_std"] else ""),
            f"{r['bytes'] / full['bytes']:.3f}",
            fmt(r, "auc"),
            f"[{r['auc_min']:.4f}, {r['auc_max']:.4f}]",
            fmt(r, "logloss"),
            str(r["seeds"]),
        ]
        for r in sorted(rows, key=lambda r: (r["variant"], r["budget"]))
    ]
    header = ["variant", "budget", "KiB", "x full", "test AUC", "[min, max]", "logloss", "seeds"]
    print(f"\n{model}: frontier (test split, mean ± std over seeds)")
    print("\n".join(table(header, lines)))


def claims(
    model: str,
    frontier: dict[tuple[str, float], dict[str, Any]],
    points: list[dict[str, Any]],
    budgets: list[float],
    matched: float,
) -> list[tuple[str, bool]]:
    """Each paper's claim on this model's frontier: (the line to print, whether it holds)."""
    out = []
    full = frontier["full", 1.0]
    small = [b for b in sorted(budgets) if b <= 0.25]
    for b in small:
        mux, hashed = frontier["multiplexed", b], frontier["hash", b]
        gap = mux["auc_mean"] - hashed["auc_mean"]
        spread = max(mux["auc_std"], hashed["auc_std"])
        holds = gap >= 0 and (b != small[0] or gap > spread)
        need = f"> spread {spread:.4f}" if b == small[0] else ">= 0"
        out.append(
            (
                f"Unified Embedding, budget {b:g}: multiplexed {fmt(mux, 'auc')} "
                f"({mux['bytes'] / 1024:,.0f} KiB) vs hashing {fmt(hashed, 'auc')} "
                f"({hashed['bytes'] / 1024:,.0f} KiB): gap {gap:+.4f}, needs {need}",
                holds,
            )
        )
    compact = frontier["optembed", 1.0]
    share = compact["bytes"] / full["bytes"]
    loss = full["auc_mean"] - compact["auc_mean"]
    mine = [p for p in points if p["variant"] == "optembed"]
    features = list(mine[0]["rows"])
    pruned = {
        f: statistics.fmean(1 - p["kept_rows"][f] / p["rows"][f] for p in mine) for f in features
    }
    dims = {f: "/".join(str(p["dims"][f]) for p in mine) for f in features}
    out.append(
        (
            f"OptEmbed: compact {fmt(compact, 'auc')} vs full {fmt(full, 'auc')}: AUC lost "
            f"{loss:+.4f} (needs <= {SPREAD_TOLERANCE}), bytes {share:.3f} of full (needs <= "
            f"{BYTES_SHARE}); rows pruned per feature "
            + ", ".join(f"{f} {pruned[f]:.0%}" for f in features)
            + "; searched dims (per seed) "
            + ", ".join(f"{f} {dims[f]}" for f in features),
            loss <= SPREAD_TOLERANCE and share <= BYTES_SHARE,
        )
    )
    open_map, filtered = frontier["collisionless", 1.0], frontier["collisionless_filtered", 1.0]
    spread = max(open_map["auc_std"], full["auc_std"])
    gap = open_map["auc_mean"] - full["auc_mean"]
    out.append(
        (
            f"Monolith, matches full: collisionless {fmt(open_map, 'auc')} vs full "
            f"{fmt(full, 'auc')}: gap {gap:+.4f}, needs |gap| <= spread {spread:.4f}",
            abs(gap) <= spread,
        )
    )

    def live(variant: str) -> float:
        return statistics.fmean(
            sum(p["live_rows"].values()) for p in points if p["variant"] == variant
        )

    per_open, per_filtered = (
        open_map["bytes"] / live("collisionless"),
        filtered["bytes"] / live("collisionless_filtered"),
    )
    out.append(
        (
            f"Monolith, bytes follow live IDs: {per_open:.0f} bytes per live ID unfiltered, "
            f"{per_filtered:.0f} with min_count 2 (needs within {PROPORTIONAL:.0%}); full tables "
            f"{full['bytes'] / 1024:,.0f} KiB, collisionless {open_map['bytes'] / 1024:,.0f} KiB",
            abs(per_filtered / per_open - 1) <= PROPORTIONAL,
        )
    )
    cut = 1 - live("collisionless_filtered") / live("collisionless")
    cost = open_map["auc_mean"] - filtered["auc_mean"]
    out.append(
        (
            f"Monolith, min_count 2: live rows {live('collisionless'):,.0f} -> "
            f"{live('collisionless_filtered'):,.0f} (cut {cut:.1%}) at an AUC cost of {cost:+.4f} "
            f"({fmt(filtered, 'auc')}); needs a cut > 0",
            cut > 0,
        )
    )
    hashed = frontier["hash", matched]
    gap = open_map["auc_mean"] - hashed["auc_mean"]
    out.append(
        (
            f"Monolith, hashing at the collisionless bytes (budget {matched:g}, "
            f"{hashed['bytes'] / 1024:,.0f} KiB): {fmt(hashed, 'auc')} vs collisionless "
            f"{fmt(open_map, 'auc')}: loses {gap:+.4f} (needs > 0)",
            gap > 0,
        )
    )
    return [(f"{model} claim {text}", holds) for text, holds in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (see the docstring)")
    parser.add_argument("--seeds", type=int, help="seeds per point (default 3; quick 1)")
    parser.add_argument("--first-seed", type=int, default=2019)
    parser.add_argument("--models", help="comma-separated, of " + ",".join(MODELS))
    parser.add_argument("--budgets", help="fractions of the full tables (default 0.0625,0.25)")
    parser.add_argument("--epochs", type=int, help=f"most epochs (default {EPOCHS}; quick 1)")
    parser.add_argument("--search-rounds", type=int, help=f"default {SEARCH_ROUNDS}; quick 2")
    parser.add_argument("--with-qr", action="store_true", help="the qr arm too")
    parser.add_argument("--fresh", action="store_true", help="empty the workdir first")
    parser.add_argument("--workdir", type=Path, help="default <bench cache>/real_variants")
    args = parser.parse_args()
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.epochs = args.epochs or (1 if args.quick else EPOCHS)
    args.search_rounds = args.search_rounds or (2 if args.quick else SEARCH_ROUNDS)
    budgets = [
        float(b) for b in (args.budgets or ("0.25" if args.quick else "0.0625,0.25")).split(",")
    ]
    models = (args.models or ("DLRM" if args.quick else ",".join(MODELS))).split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {list(MODELS)}")
    seeds = [args.first_seed + i for i in range(args.seeds)]
    variants = [v for v in VARIANTS if args.with_qr or v != "qr"]

    began = time.perf_counter()
    workdir = (
        args.workdir or bench_cache() / ("real_variants_quick" if args.quick else "real_variants")
    ).resolve()
    if args.fresh:
        shutil.rmtree(workdir, ignore_errors=True)
    names = ("train", "valid", "test")
    files = {n: workdir / "split" / f"{n}.parquet" for n in names}
    if not all(f.exists() for f in files.values()):
        split = time_split(
            movielens_log("ctr"), workdir / "split", max_rows=QUICK_ROWS if args.quick else None
        )
        print("\n".join(split.describe()))
    import polars as pl

    train_rows = pl.scan_parquet(files["train"]).select(pl.len()).collect().item()
    print(
        f"MovieLens-100K CTR, {train_rows:,} training rows; models {models}, seeds {seeds}, "
        f"budgets {budgets}, variants {variants}, up to {args.epochs} epochs (patience "
        f"{PATIENCE}), search {args.search_rounds} rounds; runs under {workdir}; load "
        f"{load_avg()}",
        flush=True,
    )

    results: list[tuple[str, bool]] = []
    figures: list[str] = []
    for model in models:
        cfg: ExperimentConfig = experiment(model, files, train_rows, args)
        out = workdir / model.lower()
        started = time.perf_counter()
        per_variant = {v: budgets for v in variants if VARIANTS[v].budgeted}
        rows = sweep(cfg, per_variant, variants, out, seeds=seeds)
        frontier = {(r["variant"], r["budget"]): r for r in rows}
        matched = hash_budget_at(frontier, frontier["collisionless", 1.0]["bytes"])
        per_variant["hash"] = sorted({*budgets, matched})
        rows = sweep(cfg, per_variant, variants, out, seeds=seeds)  # the rest reused
        frontier = {(r["variant"], r["budget"]): r for r in rows}
        points = [json.loads(p.read_text()) for p in sorted((out / POINTS_DIR).glob("*.json"))]
        show_frontier(model, rows)
        print(
            f"({out / 'frontier.csv'}, frontier.png; {time.perf_counter() - started:.0f} s, "
            f"load {load_avg()})"
        )
        mine = claims(model, frontier, points, budgets, matched)
        for text, holds in mine:
            print(f"{text}: {'holds' if holds else 'does NOT hold'}")
        results += mine
        key = model.lower()
        smallest = min(budgets)
        gap = frontier["multiplexed", smallest]["auc_mean"] - frontier["hash", smallest]["auc_mean"]
        figures += [
            f"{key}_full_auc={frontier['full', 1.0]['auc_mean']:.4f}",
            f"{key}_optembed_auc={frontier['optembed', 1.0]['auc_mean']:.4f}",
            f"{key}_collisionless_auc={frontier['collisionless', 1.0]['auc_mean']:.4f}",
            f"{key}_mux_minus_hash_smallest={gap:+.4f}",
        ]
    held = sum(h for _, h in results)
    print(f"\nall runs: {time.perf_counter() - began:.0f} s; load average {load_avg()}")
    print(
        f"RESULT real_variants ratio={held / len(results):.2f} goal=1 "
        f"met={'yes' if held == len(results) else 'no'} claims_held={held}/{len(results)} "
        f"seeds={len(seeds)} epochs_max={args.epochs} " + " ".join(figures)
    )


if __name__ == "__main__":
    sys.exit(main())
