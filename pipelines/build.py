"""Building the model of an experiment, the same way in training, evaluation and export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.ctr import build_ctr_model
from models.ranking import RankingModel
from models.sequence import FieldDims, build_sequence_model
from models.sequence_ranking import SequenceRankingModel
from pipelines.train.checkpoint import (
    PROGRESS_FILE,
    chosen_checkpoint,
    incomplete_reason,
    load_model_weights,
)
from recsys.config import ExperimentConfig, load_config
from tables.footprint import table_bytes
from tables.optembed.embeddings import OptEmbedEmbeddings
from tables.pooled import PooledEmbeddings, make_transforms, table_specs
from tables.sequence import ATTENTION, REPRESENTATION, build_sequence_embeddings

VOCAB_FILE = "vocabularies.npz"
KEEP_FILE = "optembed_keep.npz"  # retrain: the supernet's row masks, per feature


def save_vocabularies(run_dir: Path, vocabularies: dict[str, np.ndarray]) -> None:
    np.savez(run_dir / VOCAB_FILE, **vocabularies)


def load_vocabularies(run_dir: Path) -> dict[str, np.ndarray]:
    path = run_dir / VOCAB_FILE
    if not path.exists():
        return {}
    with np.load(path) as archive:
        return {name: archive[name] for name in archive.files}


def load_keep_masks(run_dir: Path) -> dict[str, np.ndarray]:
    """The fixed row masks of an optembed retrain run ({} for other runs)."""
    path = run_dir / KEEP_FILE
    if not path.exists():
        return {}
    with np.load(path) as archive:
        return {name: archive[name] for name in archive.files}


def build_model(
    cfg: ExperimentConfig,
    vocabularies: dict[str, np.ndarray],
    table_device: torch.device | None = None,
    keep: dict[str, np.ndarray] | None = None,
) -> RankingModel | SequenceRankingModel:
    """Tables on `table_device` (meta: DMP materializes only the local shards); ID
    transforms and dense layers on the CPU, where their buffers and weights are real.

    `keep` holds an optembed retrain run's row masks (see `load_keep_masks`)."""
    if cfg.model.is_sequence:
        return build_sequence_ranking(cfg, vocabularies, table_device)
    specs = table_specs(cfg, vocabularies)
    transforms = make_transforms(cfg, specs, vocabularies)
    sparse: PooledEmbeddings | OptEmbedEmbeddings
    if cfg.uses_optembed:
        sparse = _optembed_embeddings(cfg, specs, transforms, table_device, keep or {})
    else:
        sparse = PooledEmbeddings(specs, transforms, device=table_device)
    dense = build_ctr_model(cfg.model, len(cfg.features.dense), sparse.feature_dims)
    return RankingModel(sparse, dense, cfg.train.embedding_l2)


def build_sequence_ranking(
    cfg: ExperimentConfig,
    vocabularies: dict[str, np.ndarray],
    table_device: torch.device | None = None,
) -> SequenceRankingModel:
    """Sequence tables for the targets and histories, pooled tables for any other sparse
    features, and the sequence model over both (dense features join `other`)."""
    sequence = build_sequence_embeddings(cfg, vocabularies, device=table_device)
    targets = frozenset(s.target for s in cfg.features.sequences)
    specs = table_specs(cfg, vocabularies, exclude=targets)
    pooled = None
    if specs:
        transforms = make_transforms(cfg, specs, vocabularies)
        pooled = PooledEmbeddings(specs, transforms, device=table_device)
    num_dense = len(cfg.features.dense)
    other_dim = num_dense + (sum(pooled.feature_dims) if pooled is not None else 0)
    m = cfg.model
    representation = FieldDims(*sequence.dims[REPRESENTATION])
    attention = FieldDims(*sequence.dims[ATTENTION])
    model = build_sequence_model(
        m.name,
        representation,
        attention_dims=attention if m.name == "dare" else None,
        other_dim=other_dim,
        top_k=m.top_k,
        din_length=m.din_length,
        time_gaps=bool(cfg.features.sequence_timestamps),
    )
    return SequenceRankingModel(sequence, model, pooled, num_dense)


def _optembed_embeddings(
    cfg: ExperimentConfig,
    specs: list,
    transforms: dict,
    table_device: torch.device | None,
    keep: dict[str, np.ndarray],
) -> OptEmbedEmbeddings:
    o = cfg.optembed
    single = {f.name for f in cfg.features.sparse if not f.multi_valued}
    sparse = OptEmbedEmbeddings(specs, transforms, single, o.alpha, o.norm, device=table_device)
    if o.stage == "retrain":
        missing = sorted(set(sparse.feature_names) - keep.keys())
        if missing:
            raise ValueError(f"optembed retrain: no row masks ({KEEP_FILE}) for {missing}")
        dims = [o.dims[f] for f in sparse.feature_names]  # type: ignore[index]
        sparse.use_retrain(dims, {f: torch.from_numpy(keep[f]) for f in sparse.feature_names})
    return sparse


def planned_table_bytes(cfg: ExperimentConfig, run_dir: Path) -> dict[str, int]:
    """Bytes of each table's rows and optimizer state for the run in `run_dir` (its
    vocabularies and row masks), over all workers; the tables are built on the meta
    device, so nothing is allocated."""
    model = build_model(
        cfg,
        load_vocabularies(run_dir),
        table_device=torch.device("meta"),
        keep=load_keep_masks(run_dir),
    )
    return table_bytes(model, cfg.train.sparse_optimizer)


def run_checkpoint(run: Path, newest: bool = False) -> Path:
    """A checkpoint directory itself (refused unless complete), or of a run directory the
    best complete checkpoint (the newest with `newest`; see `chosen_checkpoint`)."""
    if run.name.startswith("checkpoint_") or (run / PROGRESS_FILE).exists():
        reason = incomplete_reason(run)
        if reason is not None:
            raise FileNotFoundError(f"{run}: not a complete checkpoint: {reason}")
        return run
    return chosen_checkpoint(run, newest)


def load_trained(
    run: str | Path, newest: bool = False
) -> tuple[ExperimentConfig, RankingModel, dict]:
    """The run's config and its model, unsharded on the CPU, with the weights of its best
    checkpoint (its newest with `newest`, or the checkpoint folder `run` names)."""
    run = Path(run)
    checkpoint = run_checkpoint(run, newest)
    run_dir = checkpoint if (checkpoint / "config.yaml").exists() else checkpoint.parent
    cfg = load_config(run_dir / "config.yaml")
    model = build_model(cfg, load_vocabularies(run_dir), keep=load_keep_masks(run_dir))
    progress = load_model_weights(checkpoint, model)
    model.eval()
    return cfg, model, {**progress, "checkpoint": str(checkpoint), "run_dir": str(run_dir)}
