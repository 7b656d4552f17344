"""Training state in `torch.distributed.checkpoint` format inside Ray Train checkpoints.

Each rank writes its own shards (tables, optimizer state) into its local checkpoint
directory; Ray merges the ranks' directories into one checkpoint in the run's storage.
DCP reshards on load, so a run can resume on a different number of workers.

Collisionless tables keep their ID maps in per-shard files next to the DCP files
(`tables.collisionless`). Resumed on another number of workers (or capacity), a live ID's
row moves to a slot of its new owner, which DCP's row-range resharding knows nothing of:
those tables' rows and optimizer state are left out of the DCP load, read whole as they
were saved (a plain tensor on every rank: old rows x (dim + optimizer values per row) x
their bytes, freed after the restore) and copied row by row to their new places.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from tables.collisionless import RowMoves, load_id_maps, save_id_maps, table_weight_key

PROGRESS_FILE = "progress.json"
KeyPath = tuple[str, ...]  # keys from the state's root to one tensor


def training_state(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def save_checkpoint(
    directory: Path, model: nn.Module, optimizer: Any, progress: dict[str, Any]
) -> None:
    dcp.save(training_state(model, optimizer), checkpoint_id=str(directory))
    save_id_maps(model, directory)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        (directory / PROGRESS_FILE).write_text(json.dumps(progress))


def load_checkpoint(directory: Path, model: nn.Module, optimizer: Any) -> dict[str, Any]:
    """Restore model and optimizer in place; return the saved progress (step, epoch, ...)."""
    optimizer.init_state()  # optimizer state must exist before DCP can load into it
    moves = load_id_maps(model, directory)
    state = training_state(model, optimizer)
    _load(state, directory, moves, no_dist=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return json.loads((directory / PROGRESS_FILE).read_text())


def load_model_weights(directory: Path, model: nn.Module) -> dict[str, Any]:
    """Load only the model (unsharded, one process) from a training checkpoint."""
    moves = load_id_maps(model, directory)
    state = {"model": model.state_dict()}
    _load(state, directory, moves, no_dist=True)
    model.load_state_dict(state["model"])
    return json.loads((directory / PROGRESS_FILE).read_text())


def _load(
    state: dict[str, Any], directory: Path, moves: dict[str, RowMoves], no_dist: bool
) -> None:
    """DCP-load `state` in place; the rows of resharded collisionless tables are moved."""
    moved = _moved_entries(state, moves)
    for path in moved:
        _nested(state, path[:-1]).pop(path[-1])
    dcp.load(state, checkpoint_id=str(directory), no_dist=no_dist)
    if not moved:
        return
    saved = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    whole: dict[str, Any] = {}
    for path in moved:
        meta = saved[".".join(path)]
        _nested(whole, path[:-1], create=True)[path[-1]] = torch.empty(
            meta.size, dtype=meta.properties.dtype
        )
    dcp.load(whole, checkpoint_id=str(directory), no_dist=no_dist)
    for path, (entry, table) in moved.items():
        _move_rows(entry, _nested(whole, path[:-1])[path[-1]], moves[table])
        _nested(state, path[:-1])[path[-1]] = entry


def _moved_entries(
    state: dict[str, Any], moves: dict[str, RowMoves]
) -> dict[KeyPath, tuple[Any, str]]:
    """{path: (tensor, table)} of every row-indexed tensor of a resharded table: its rows
    in the model and the per-row optimizer state of its fused optimizer."""
    found: dict[KeyPath, tuple[Any, str]] = {}
    for table in moves:
        key = table_weight_key(state["model"], table)
        weight = state["model"][key]
        found[("model", key)] = (weight, table)
        per_param = state.get("optimizer", {}).get("state", {})
        for param, values in per_param.items():
            if param != key and not param.endswith(f".{key}"):
                continue
            for name, value in values.items():
                shape = value.size() if isinstance(value, torch.Tensor) else ()
                if len(shape) and shape[0] == weight.size(0):
                    found[("optimizer", "state", param, name)] = (value, table)
    return found


def _nested(tree: dict[str, Any], path: KeyPath, create: bool = False) -> dict[str, Any]:
    for key in path:
        tree = tree.setdefault(key, {}) if create else tree[key]
    return tree


@torch.no_grad()
def _move_rows(entry: Any, saved: torch.Tensor, moves: RowMoves) -> None:
    """Row `moves.old` of the saved tensor -> row `moves.new` of `entry`, for the rows of
    `entry` held here (its local shards, or all of a plain tensor)."""
    if hasattr(entry, "local_shards"):
        parts = [(s.tensor, s.metadata.shard_offsets[0]) for s in entry.local_shards()]
    else:
        parts = [(entry, 0)]
    for local, first in parts:
        inside = (moves.new >= first) & (moves.new < first + len(local))
        rows = saved.index_select(0, moves.old[inside])
        local.index_copy_(0, (moves.new[inside] - first).to(local.device), rows.to(local))
