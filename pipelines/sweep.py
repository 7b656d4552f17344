"""`recsys sweep`: train table variants at several parameter budgets, plot the frontier.

A budget is a fraction of the parameters of full per-feature tables (vocabularies of the
training days). For each variant and budget the config's tables are re-derived
(`tables.budget`) and trained by `pipelines.train.driver.train`; validation AUC and logloss
against the embedding parameters go to `<out>/frontier.csv` and `<out>/frontier.png`, so
the Pareto frontier of each variant shows at a glance. Runs live in `<out>/runs/`; a run
whose `result.json` exists is read back rather than trained again, so an interrupted sweep
picks up where it stopped (delete a run's directory to retrain it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipelines.build import save_vocabularies
from pipelines.train.driver import run_dir_of, train
from pipelines.train.split import make_split
from recsys.config import ConfigError, ExperimentConfig, TableConfig, config_from_dict
from tables.budget import VARIANTS, budget_tables, full_parameters, full_tables
from tables.pooled import table_specs
from tables.vocab import build_vocabularies

FRONTIER_CSV = "frontier.csv"
FRONTIER_PNG = "frontier.png"


def _variant_config(
    cfg: ExperimentConfig, variant: str, budget: float, tables: list[TableConfig], out: Path
) -> ExperimentConfig:
    doc = cfg.model_dump(mode="json")
    doc["name"] = f"{cfg.name}-{variant}" + ("" if variant == "full" else f"-{budget:g}")
    doc["tables"] = [t.model_dump(mode="json", exclude_none=True) for t in tables]
    doc["train"]["run_dir"] = str(out / "runs")
    return config_from_dict(doc, f"sweep: {variant} at budget {budget:g}")


def _metrics(
    cfg: ExperimentConfig, vocabularies: dict[str, np.ndarray], address: str | None
) -> dict[str, Any]:
    """The final metrics of the run, trained now unless a finished one is on disk."""
    run_dir = run_dir_of(cfg)
    done = run_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())["metrics"]
    if vocabularies:  # spare training a second pass over the log for the same vocabularies
        run_dir.mkdir(parents=True, exist_ok=True)
        save_vocabularies(run_dir, vocabularies)
    return train(cfg, address)["metrics"]


def sweep(
    cfg: ExperimentConfig,
    budgets: list[float],
    variants: list[str],
    out: str | Path,
    address: str | None = None,
) -> list[dict[str, Any]]:
    """Train every variant at every budget (`full` once); returns the frontier's points."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; expected some of {list(VARIANTS)}")
    if not budgets or not all(0 < b <= 1 for b in budgets):
        raise ValueError(f"budgets must be fractions in (0, 1], got {budgets}")
    if cfg.data.train is None or not cfg.tables:
        raise ConfigError("sweep: the config needs data.train and a tables section")
    if not cfg.data.has_validation:
        raise ConfigError("sweep: the variants are scored on validation; data.valid_days is 0")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    full = _variant_config(cfg, "full", 1.0, full_tables(cfg.tables), out)
    vocabularies = build_vocabularies(full, make_split(cfg).training_rows())
    rows = {feature: len(ids) + 1 for feature, ids in vocabularies.items()}
    total = full_parameters(cfg.tables, rows)

    points = []
    for variant in variants:
        for budget in [1.0] if variant == "full" else sorted(budgets):
            tables = budget_tables(cfg.tables, variant, int(budget * total), rows)
            run_cfg = _variant_config(cfg, variant, budget, tables, out)
            vocab = vocabularies if variant == "full" else {}
            metrics = _metrics(run_cfg, vocab, address)
            specs = table_specs(run_cfg, vocab)
            points.append(
                {
                    "variant": variant,
                    "budget": budget,
                    "parameters": sum(s.parameters for s in specs),
                    "bytes": sum(s.bytes for s in specs),
                    "valid_auc": metrics.get("valid_auc"),
                    "valid_logloss": metrics.get("valid_logloss"),
                    "steps": metrics.get("step"),
                    "run": str(run_dir_of(run_cfg)),
                }
            )
    pl.DataFrame(points).write_csv(out / FRONTIER_CSV)
    plot_frontier(points, out / FRONTIER_PNG, title=f"{cfg.name}: {total:,} full parameters")
    return points


def plot_frontier(points: list[dict[str, Any]], path: Path, title: str) -> Path:
    """AUC and logloss against parameters (log scale), one line per variant.

    matplotlib's object API on the Agg canvas, as `recsys.metrics.plot_report`: no pyplot
    state, no display.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for variant in dict.fromkeys(p["variant"] for p in points):
        mine = sorted((p for p in points if p["variant"] == variant), key=lambda p: p["parameters"])
        xs = [p["parameters"] for p in mine]
        for ax, key in zip(axes, ("valid_auc", "valid_logloss"), strict=True):
            ax.plot(
                xs, [p[key] for p in mine], marker="*" if len(mine) == 1 else "o", label=variant
            )
    for ax, name in zip(axes, ("validation AUC", "validation logloss"), strict=True):
        ax.set(xscale="log", xlabel="embedding parameters", ylabel=name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    return path
