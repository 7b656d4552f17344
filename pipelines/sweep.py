"""`recsys sweep`: train table variants at several parameter budgets and seeds, plot the
frontier of quality against memory.

A budget is a fraction of the parameters of full per-feature tables (vocabularies of the
training days). For each variant (`tables.budget.VARIANTS`), budget (once for the variants
a budget does not size) and seed, the config's tables are re-derived (`tables.budget`) and
trained by `pipelines.train.driver.train`; an OptEmbed arm is its whole recipe: supernet,
search, retrain and compact export. Each point is scored by its best checkpoint: on
`data.test` when the config names one, else the best validation. Its bytes are what the
tables hold: rows, optimizer state and ID maps (vocabularies, collisionless maps and
filters at their live rows, the compact export's kept IDs).

`<out>/frontier.csv` has a row per variant and budget (bytes, AUC and logloss as mean and
spread over the seeds), `<out>/frontier_seeds.csv` a row per seed, `<out>/frontier.png`
AUC and logloss against bytes with error bars. Runs live in `<out>/runs/`; a finished
point (`<out>/points/<run>.json`) is read back, and an unfinished one resumes where its run
stopped (training from its newest checkpoint, a search from its state), so an interrupted
sweep picks up where it stopped. Ray starts once for the whole sweep: every training,
search and retrain joins the same local Ray (or the cluster at `address`).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipelines.build import save_vocabularies
from pipelines.evaluate import evaluate
from pipelines.export.writer import export
from pipelines.optembed import BEST_FILE, SEARCH_DIR, retrain, retrain_config, search
from pipelines.train.driver import run_dir_of, start_ray, train
from pipelines.train.split import make_split
from pipelines.train.summary import best_validation
from recsys.config import ConfigError, ExperimentConfig, TableConfig, config_from_dict
from tables.budget import DEFAULT_MIN_COUNT, VARIANTS, budget_tables, full_parameters, full_tables
from tables.footprint import ID_BYTES, row_bytes
from tables.pooled import table_specs
from tables.vocab import build_vocabularies

FRONTIER_CSV = "frontier.csv"
SEEDS_CSV = "frontier_seeds.csv"
FRONTIER_PNG = "frontier.png"
POINTS_DIR = "points"
COMPACT_DIR = "compact"


def _variant_config(
    cfg: ExperimentConfig,
    variant: str,
    budget: float,
    seed: int,
    tables: list[TableConfig],
    out: Path,
) -> ExperimentConfig:
    doc = cfg.model_dump(mode="json")
    sized = f"-{budget:g}" if VARIANTS[variant].budgeted else ""
    doc["name"] = f"{cfg.name}-{variant}{sized}-s{seed}"
    doc["tables"] = [t.model_dump(mode="json", exclude_none=True) for t in tables]
    doc["train"]["run_dir"] = str(out / "runs")
    doc["train"]["seed"] = seed
    doc["optembed"]["search"]["seed"] = seed
    return config_from_dict(doc, f"sweep: {variant} at budget {budget:g}, seed {seed}")


def _vocabularies_of(cfg: ExperimentConfig, built: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The built vocabularies this run's tables read (by table name), when all are built."""
    names = [n for t in cfg.tables if t.uses_vocabulary for n in t.table_names().values()]
    return {n: built[n] for n in names} if all(n in built for n in names) else {}


def _trained(
    cfg: ExperimentConfig, vocabularies: dict[str, np.ndarray], address: str | None
) -> dict[str, Any]:
    """The run's final metrics, trained now (or resumed) unless it finished before."""
    run_dir = run_dir_of(cfg)
    done = run_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())["metrics"]
    if vocabularies:  # spare training a pass over the log for the same vocabularies
        run_dir.mkdir(parents=True, exist_ok=True)
        save_vocabularies(run_dir, vocabularies)
    return train(cfg, address)["metrics"]


def _score(cfg: ExperimentConfig, metrics: dict[str, Any]) -> dict[str, Any]:
    """AUC and logloss of the run's best checkpoint: on data.test when there is one, else
    its best validation."""
    run_dir = run_dir_of(cfg)
    best = best_validation(run_dir) or {}
    scores = {
        "valid_auc": best.get("valid_auc"),
        "valid_logloss": best.get("valid_logloss"),
        "best_step": best.get("step"),
        "epochs": metrics.get("epoch"),
    }
    if cfg.data.test is None:
        return {
            **scores,
            "scored_on": "valid",
            "auc": best.get("valid_auc"),
            "logloss": best.get("valid_logloss"),
        }
    report = evaluate(run_dir, report_dir=run_dir / "sweep_eval")
    return {**scores, "scored_on": "test", "auc": report["auc"], "logloss": report["logloss"]}


def _table_footprint(
    cfg: ExperimentConfig, vocabularies: dict[str, np.ndarray], metrics: dict[str, Any]
) -> dict[str, int]:
    """Parameters and bytes (rows, optimizer state, ID maps) of a trained run's tables. A
    table that reports live rows (an ID map's) counts those, its map and filter; a table
    read through a vocabulary counts its IDs."""
    live = metrics.get("tables") or {}
    optimizer = cfg.train.sparse_optimizer
    parameters = total = 0
    for spec in table_specs(cfg, vocabularies):
        if spec.name in live:
            report = live[spec.name]
            rows, extra = report["live_rows"], report["map_bytes"] + report["filter_bytes"]
        else:
            rows, extra = spec.num_rows, ID_BYTES * len(vocabularies.get(spec.name, ()))
        parameters += rows * spec.dim
        total += row_bytes(rows, spec.dim, optimizer) + extra
    return {"parameters": parameters, "bytes": total}


def _optembed_arm(
    cfg: ExperimentConfig, vocabularies: dict[str, np.ndarray], address: str | None
) -> dict[str, Any]:
    """Supernet, dimension search, retrain and compact export; the retrained model scored,
    the compact export's bytes (kept rows at their searched dims, their IDs, and the
    optimizer state they would keep training with)."""
    supernet = _trained(cfg, vocabularies, address)
    best_file = run_dir_of(cfg) / SEARCH_DIR / BEST_FILE
    best = json.loads(best_file.read_text()) if best_file.exists() else search(cfg, address)
    retrained_cfg = retrain_config(cfg, best["dims"], run_dir_of(cfg))
    retrain_dir = run_dir_of(retrained_cfg)
    if (retrain_dir / "result.json").exists():
        metrics = json.loads((retrain_dir / "result.json").read_text())["metrics"]
    else:
        metrics = retrain(cfg, address)["metrics"]
    compact = export(retrain_dir, retrain_dir / COMPACT_DIR)
    optimizer = cfg.train.sparse_optimizer
    kept, dims = best["kept_rows"], best["dims"]
    return {
        **_score(retrained_cfg, metrics),
        "parameters": sum(kept[f] * dims[f] for f in kept),
        "bytes": sum(row_bytes(kept[f], dims[f], optimizer) for f in kept) + compact["id_bytes"],
        "export_bytes": compact["bytes"] + compact["id_bytes"],
        "uncompacted_bytes": compact["uncompacted_bytes"],
        "dims": dims,
        "rows": best["rows"],
        "kept_rows": kept,
        "supernet_valid_auc": (best_validation(run_dir_of(cfg)) or {}).get("valid_auc"),
        "searched_valid_auc": best["valid_auc"],
        "steps": supernet.get("step"),
        "run": str(retrain_dir),
    }


def _point(
    cfg: ExperimentConfig,
    variant: str,
    budget: float,
    seed: int,
    tables: list[TableConfig],
    vocabularies: dict[str, np.ndarray],
    out: Path,
    address: str | None,
) -> dict[str, Any]:
    """One variant at one budget and seed, read back when it finished before."""
    run_cfg = _variant_config(cfg, variant, budget, seed, tables, out)
    path = out / POINTS_DIR / f"{run_cfg.name}.json"
    if path.exists():
        return json.loads(path.read_text())
    vocab = _vocabularies_of(run_cfg, vocabularies)
    if run_cfg.uses_optembed:
        result = _optembed_arm(run_cfg, vocab, address)
    else:
        metrics = _trained(run_cfg, vocab, address)
        result = {
            **_score(run_cfg, metrics),
            **_table_footprint(run_cfg, vocab, metrics),
            "steps": metrics.get("step"),
            "live_rows": {n: t["live_rows"] for n, t in (metrics.get("tables") or {}).items()},
            "run": str(run_dir_of(run_cfg)),
        }
    point = {"variant": variant, "budget": budget, "seed": seed, **result}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(point, indent=2, default=float))
    tmp.replace(path)  # a point file is whole or absent
    return point


def _spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (variant, budget): mean and standard deviation over its seeds."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault((p["variant"], p["budget"]), []).append(p)
    rows = []
    for (variant, budget), mine in groups.items():
        auc, auc_std = _spread([p["auc"] for p in mine])
        logloss, logloss_std = _spread([p["logloss"] for p in mine])
        size, size_std = _spread([p["bytes"] for p in mine])
        rows.append(
            {
                "variant": variant,
                "budget": budget,
                "parameters": round(statistics.fmean(p["parameters"] for p in mine)),
                "bytes": round(size),
                "bytes_std": round(size_std),
                "auc_mean": auc,
                "auc_std": auc_std,
                "auc_min": min(p["auc"] for p in mine),
                "auc_max": max(p["auc"] for p in mine),
                "logloss_mean": logloss,
                "logloss_std": logloss_std,
                "seeds": len(mine),
                "scored_on": mine[0]["scored_on"],
            }
        )
    return rows


def sweep(
    cfg: ExperimentConfig,
    budgets: list[float] | Mapping[str, list[float]],
    variants: list[str] | None,
    out: str | Path,
    address: str | None = None,
    seeds: list[int] | None = None,
    min_count: int = DEFAULT_MIN_COUNT,
) -> list[dict[str, Any]]:
    """Train every variant (default: all) at every budget (the unbudgeted ones once) and
    seed (default: the config's `train.seed`); returns the frontier's rows (`aggregate`).
    `budgets` may name each budgeted variant's own (a variant it leaves out gets none).

    `min_count` filters the IDs of `collisionless_filtered`.
    """
    variants = variants or list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; expected some of {list(VARIANTS)}")
    per_variant = budgets if isinstance(budgets, Mapping) else dict.fromkeys(variants, budgets)
    given = [b for v in variants if VARIANTS[v].budgeted for b in per_variant.get(v, [])]
    if not all(b > 0 for b in given) or (not given and any(VARIANTS[v].budgeted for v in variants)):
        raise ValueError(f"budgets must be positive fractions of the full tables, got {budgets}")
    seeds = seeds or [cfg.train.seed]
    if cfg.data.train is None or not cfg.tables:
        raise ConfigError("sweep: the config needs data.train and a tables section")
    if not cfg.data.has_validation:
        raise ConfigError("sweep: the variants are scored on validation; data.valid_days is 0")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    full = _variant_config(cfg, "full", 1.0, seeds[0], full_tables(cfg.tables), out)
    vocabularies = build_vocabularies(full, make_split(cfg).training_rows())
    rows = {feature: len(ids) + 1 for feature, ids in vocabularies.items()}
    total = full_parameters(cfg.tables, rows)
    start_ray(address, cfg.train.workers)  # once: every run below joins it

    points = []
    for variant in variants:
        for budget in sorted(per_variant.get(variant, [])) if VARIANTS[variant].budgeted else [1.0]:
            tables = budget_tables(
                cfg.tables, variant, int(budget * total), rows, cfg.train.workers, min_count
            )
            for seed in seeds:
                points.append(
                    _point(cfg, variant, budget, seed, tables, vocabularies, out, address)
                )
                _write_frontier(points, out, f"{cfg.name}: {total:,} full parameters")
    return aggregate(points)


def _write_frontier(points: list[dict[str, Any]], out: Path, title: str) -> None:
    columns = [
        "variant",
        "budget",
        "seed",
        "parameters",
        "bytes",
        "auc",
        "logloss",
        "valid_auc",
        "valid_logloss",
        "best_step",
        "epochs",
        "scored_on",
        "run",
    ]
    pl.DataFrame([{k: p.get(k) for k in columns} for p in points]).write_csv(out / SEEDS_CSV)
    rows = aggregate(points)
    pl.DataFrame(rows).write_csv(out / FRONTIER_CSV)
    plot_frontier(rows, out / FRONTIER_PNG, title)


def plot_frontier(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """AUC and logloss against bytes (log scale), a line per budgeted variant and a star per
    one-point variant, error bars one standard deviation over seeds.

    matplotlib's object API on the Agg canvas, as `recsys.metrics.plot_report`: no pyplot
    state, no display.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["bytes"])
        xs = [r["bytes"] for r in mine]
        for ax, key in zip(axes, ("auc", "logloss"), strict=True):
            ax.errorbar(
                xs,
                [r[f"{key}_mean"] for r in mine],
                yerr=[r[f"{key}_std"] for r in mine],
                marker="o" if VARIANTS[variant].budgeted else "*",
                markersize=5 if VARIANTS[variant].budgeted else 10,
                capsize=3,
                label=variant,
            )
    scored = rows[0]["scored_on"] if rows else "valid"
    for ax, name in zip(axes, ("AUC", "logloss"), strict=True):
        ax.set(
            xscale="log",
            xlabel="table bytes (rows + optimizer state + ID maps)",
            ylabel=f"{scored} {name} (mean ± std over seeds)",
        )
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    return path
