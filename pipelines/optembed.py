"""OptEmbed after the supernet: `recsys search` (per-feature dims) and `recsys retrain`.

Search runs `tables.optembed.search.EvolutionarySearch` on the trained supernet with
validation AUC as fitness. Ray Data reads the validation split (the days `recsys train`
held out); Ray actors each load the supernet once and cache, per validation batch, the
embeddings at full width with the row masks applied. A candidate's dims only zero columns
of those pooled vectors (prefix masks commute with pooling), so scoring a candidate is one
column mask and one pass of the dense model, exactly what the model in search mode gives.
The round's candidates are dealt out to the actors and scored in parallel. After every
round the search state goes to `<run>/search/state.json`, so running again resumes; the
result is `best.json` (dims, AUC, rows kept, sparsity) and the curve (`curve.json`,
`curve.png`).

Retrain trains the base model again with the best dims and the supernet's row masks fixed,
as a run named `<name>-retrain` (its masks in `optembed_keep.npz`).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from pipelines.build import KEEP_FILE, VOCAB_FILE, load_trained
from pipelines.train.driver import run_dir_of, start_ray, train
from pipelines.train.split import make_split
from recsys.batch import BatchConverter
from recsys.config import ConfigError, ExperimentConfig, config_from_dict
from recsys.contract import validate_table
from recsys.metrics import auc
from tables.optembed.embeddings import OptEmbedEmbeddings
from tables.optembed.masks import prefix_masks, sparsity
from tables.optembed.search import EvolutionarySearch, SearchConfig

SEARCH_DIR = "search"
STATE_FILE = "state.json"
BEST_FILE = "best.json"
CURVE_JSON = "curve.json"
CURVE_PNG = "curve.png"


def column_mask(widths: list[int], dims: list[int] | tuple[int, ...]) -> torch.Tensor:
    """[sum(widths)]: per feature, ones on its first `dim` columns and zeros after."""
    return torch.cat([prefix_masks(w)[d - 1] for w, d in zip(widths, dims, strict=True)])


class CandidateScorer:
    """A Ray actor holding the supernet's masked full-width embeddings of the validation
    split; scores candidates (one dim per feature) by validation AUC."""

    def __init__(self, run: str, tables: list[pa.Table]) -> None:
        torch.set_num_threads(1)
        cfg, model, _ = load_trained(run)
        if not getattr(getattr(model, "sparse", None), "prunes_rows", False):
            raise ConfigError(f"{run}: not an optembed run (tables need variant: optembed)")
        self.dense = model.dense
        self.widths = model.sparse.feature_dims
        convert = BatchConverter(cfg.features)
        self.batches = []
        with torch.no_grad():  # eval(): supernet rows masked by thresholds, full width
            for table in tables:
                batch = convert(table)
                emb = model.sparse(batch.sparse).values()
                self.batches.append((batch.dense, emb, batch.labels.numpy()))
        self.labels = np.concatenate([b[2] for b in self.batches])

    def score(self, candidates: list[list[int]]) -> list[float]:
        scores = []
        with torch.no_grad():
            for dims in candidates:
                mask = column_mask(self.widths, dims)
                logits = [self.dense(d, e * mask) for d, e, _ in self.batches]
                scores.append(auc(self.labels, torch.cat(logits).numpy()))
        return scores


def validation_tables(cfg: ExperimentConfig) -> list[pa.Table]:
    """The validation split training used, read by Ray Data, validated."""
    if not cfg.data.has_validation:
        raise ConfigError("search: fitness is validation AUC, and data.valid_days is 0")
    valid = make_split(cfg).datasets(cfg.features.column_names())["valid"]
    tables = []
    for table in valid.iter_batches(batch_format="pyarrow", batch_size=cfg.train.batch_size):
        clean, _ = validate_table(
            table, cfg.features, "validation split", on_bad_rows=cfg.data.on_bad_rows
        )
        tables.append(clean)
    return tables


def _search_config(cfg: ExperimentConfig) -> SearchConfig:
    s = cfg.optembed.search
    return SearchConfig(
        rounds=s.rounds,
        mutations=s.mutations,
        crossovers=s.crossovers,
        parents=s.parents,
        mutate_prob=s.mutate_prob,
        seed=s.seed,
    )


def resume_or_start(
    path: Path, widths: list[int], config: SearchConfig, supernet: str
) -> EvolutionarySearch:
    """The stored search of this supernet checkpoint if there is one (it may be given more
    rounds), else a new one."""
    if not path.exists():
        return EvolutionarySearch(widths, config)
    state = json.loads(path.read_text())
    stored = {
        **state["config"],
        "rounds": config.rounds,
        "field_dims": state["field_dims"],
        "supernet": state.get("supernet"),
    }
    wanted = {**asdict(config), "field_dims": list(widths), "supernet": supernet}
    if stored != wanted:
        raise ConfigError(
            f"{path}: a search with other settings ({stored}) is stored; delete the file to "
            f"start a new one with {wanted}"
        )
    evo = EvolutionarySearch.from_state_dict(state)
    evo.config = replace(evo.config, rounds=config.rounds)
    return evo


def search(cfg: ExperimentConfig, address: str | None = None) -> dict[str, Any]:
    """Search per-feature dims on the experiment's trained supernet; returns `best.json`."""
    if not cfg.uses_optembed or cfg.optembed.stage != "supernet":
        raise ConfigError("search: needs tables of variant 'optembed' and optembed.stage supernet")
    run = run_dir_of(cfg)
    _, model, progress = load_trained(run)
    sparse = model.sparse
    features, widths = sparse.feature_names, sparse.feature_dims
    out = run / SEARCH_DIR
    out.mkdir(parents=True, exist_ok=True)
    evo = resume_or_start(out / STATE_FILE, widths, _search_config(cfg), progress["checkpoint"])

    start_ray(address, cfg.optembed.search.workers)
    tables = ray.put(validation_tables(cfg))
    actor = ray.remote(num_cpus=1)(CandidateScorer)
    workers = cfg.optembed.search.workers
    scorers = [actor.remote(str(run), tables) for _ in range(workers)]

    def fitness(candidates: list[tuple[int, ...]]) -> list[float]:
        shares = [candidates[i::workers] for i in range(workers)]
        futures = [
            s.score.remote([list(c) for c in share])
            for s, share in zip(scorers, shares, strict=True)
        ]
        scored = ray.get(futures)  # actor w scored candidates w, w + workers, ...
        return [scored[i % workers][i // workers] for i in range(len(candidates))]

    def checkpoint(state: EvolutionarySearch) -> None:
        stats = state.history[-1]
        print(
            f"search round {stats.round + 1}/{state.config.rounds}: best {stats.best:.5f} "
            f"mean {stats.mean:.5f} best so far {stats.best_so_far:.5f} "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        _write_json(out / STATE_FILE, {**state.state_dict(), "supernet": progress["checkpoint"]})

    started = time.perf_counter()
    full_auc = ray.get(scorers[0].score.remote([widths]))[0]
    best, best_auc = evo.run(fitness, on_round=checkpoint)
    for s in scorers:
        ray.kill(s)

    masks = _keep_masks(sparse)
    kept = {f: int(m.sum()) for f, m in masks.items()}
    rows = {f: len(m) for f, m in masks.items()}
    result = {
        "supernet": progress["checkpoint"],
        "dims": dict(zip(features, best, strict=True)),
        "valid_auc": best_auc,
        "valid_auc_full_dims": full_auc,
        "rows": rows,
        "kept_rows": kept,
        "thresholds": {f: float(sparse.threshold_of(f)) for f in features},
        "sparsity": sparsity(
            [kept[f] for f in features], list(best), [rows[f] for f in features], widths
        ),
        "rounds": evo.round,
    }
    _write_json(out / BEST_FILE, result)
    curve = [h.__dict__ for h in evo.history]
    _write_json(out / CURVE_JSON, curve)
    plot_curve(curve, full_auc, out / CURVE_PNG, title=f"{cfg.name}: evolutionary search")
    return result


def _write_json(path: Path, doc: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)  # a crash mid-write never leaves a torn state file


def plot_curve(curve: list[dict[str, Any]], full_auc: float, path: Path, title: str) -> Path:
    """Best, mean and best-so-far validation AUC per round, the full-width AUC as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    rounds = [c["round"] + 1 for c in curve]
    for key, style in (("best", "o-"), ("mean", ".--"), ("best_so_far", "-")):
        ax.plot(rounds, [c[key] for c in curve], style, label=key.replace("_", " "))
    ax.axhline(full_auc, color="grey", linestyle=":", label="supernet, full dims")
    ax.set(xlabel="round", ylabel="validation AUC", title=title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100)
    return path


# ----------------------------------------------------------------------------- retrain


def retrain_config(cfg: ExperimentConfig, dims: dict[str, int], supernet: Path) -> ExperimentConfig:
    doc = cfg.model_dump(mode="json")
    doc["name"] = f"{cfg.name}-retrain"
    doc["optembed"].update(stage="retrain", dims=dims, supernet_run=str(supernet))
    return config_from_dict(doc, f"retrain of {cfg.name}")


def _keep_masks(sparse: OptEmbedEmbeddings) -> dict[str, np.ndarray]:
    """Per feature, the rows of its table whose norm exceeds the feature's threshold (for
    a collisionless table, the live IDs of those rows)."""
    return {f: sparse.keep_mask(f).numpy() for f in sparse.feature_names}


def retrain(cfg: ExperimentConfig, address: str | None = None) -> dict[str, Any]:
    """Train `<name>-retrain` with the searched dims and the supernet's row masks fixed."""
    supernet = run_dir_of(cfg)
    best = supernet / SEARCH_DIR / BEST_FILE
    if not best.exists():
        raise ConfigError(f"{best}: no search result; run `recsys search` first")
    retrain_cfg = retrain_config(cfg, json.loads(best.read_text())["dims"], supernet)
    run = run_dir_of(retrain_cfg)
    run.mkdir(parents=True, exist_ok=True)
    if not (run / KEEP_FILE).exists():
        np.savez(run / KEEP_FILE, **_keep_masks(load_trained(supernet)[1].sparse))
        if (supernet / VOCAB_FILE).exists():  # the rows the masks index
            shutil.copy(supernet / VOCAB_FILE, run / VOCAB_FILE)
    return train(retrain_cfg, address)
