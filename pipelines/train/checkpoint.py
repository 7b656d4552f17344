"""Training state in `torch.distributed.checkpoint` format inside Ray Train checkpoints.

Each rank writes its own shards (tables, optimizer state) into its local checkpoint
directory; Ray merges the ranks' directories into one checkpoint in the run's storage.
DCP reshards on load, so a run can resume on a different number of workers.

A checkpoint is complete when every rank's manifest (`manifests/rank<r>.json`: its files
and their sizes) is there and every file it lists has that size: Ray copies the ranks'
files into storage one by one, so a run killed mid-copy leaves a folder that is not.
Readers take the newest complete checkpoint (`newest_complete`) and name the ones skipped.
Each rank also saves its RNG states (`rng/rank<r>.pt`): dropout masks, sampled dims and
anything else drawn after a resume continue as if the run had never stopped.

Collisionless tables keep their ID maps in per-shard files next to the DCP files
(`tables.collisionless.state`). Resumed on another number of workers (or capacity), a live ID's
row moves to a slot of its new owner, which DCP's row-range resharding knows nothing of:
those tables' rows and optimizer state are left out of the DCP load, read whole as they
were saved (a plain tensor on every rank: old rows x (dim + optimizer values per row) x
their bytes, freed after the restore) and copied row by row to their new places.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from tables.collisionless.state import RowMoves, load_id_maps, save_id_maps, table_weight_key

PROGRESS_FILE = "progress.json"
MANIFEST_DIR = "manifests"
RNG_DIR = "rng"
KeyPath = tuple[str, ...]  # keys from the state's root to one tensor
log = logging.getLogger(__name__)


def training_state(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def save_checkpoint(
    directory: Path, model: nn.Module, optimizer: Any, progress: dict[str, Any]
) -> None:
    """This rank's part of a checkpoint, its manifest last (what makes the part complete)."""
    before = set(directory.rglob("*"))
    dcp.save(training_state(model, optimizer), checkpoint_id=str(directory))
    save_id_maps(model, directory)
    rank = _rank()
    (directory / RNG_DIR).mkdir(exist_ok=True)
    torch.save(rng_state(), directory / RNG_DIR / f"rank{rank}.pt")
    if rank == 0:
        (directory / PROGRESS_FILE).write_text(json.dumps(progress))
    write_manifest(directory, set(directory.rglob("*")) - before)


def write_manifest(directory: Path, written: set[Path]) -> None:
    """This rank's manifest of the files it wrote into `directory`, with their sizes;
    written last, it is what makes the rank's part of the checkpoint complete."""
    files = {
        str(p.relative_to(directory)): p.stat().st_size for p in sorted(written) if p.is_file()
    }
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    (directory / MANIFEST_DIR).mkdir(exist_ok=True)
    manifest = {"rank": _rank(), "world_size": world, "files": files}
    (directory / MANIFEST_DIR / f"rank{_rank()}.json").write_text(json.dumps(manifest))


def rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from (CUDA's when present)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(directory: Path) -> bool:
    """Restore this rank's generators as saved; False when the checkpoint holds none for it
    (another number of workers: the draws then differ from an uninterrupted run's)."""
    path = directory / RNG_DIR / f"rank{_rank()}.pt"
    if not path.exists():
        return False
    state = torch.load(path, weights_only=False)
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return True


def incomplete_reason(checkpoint: Path) -> str | None:
    """Why `checkpoint` is not a complete checkpoint, or None when it is."""
    if not (checkpoint / PROGRESS_FILE).is_file():
        return f"no {PROGRESS_FILE}"
    manifests = sorted((checkpoint / MANIFEST_DIR).glob("rank*.json"))
    if not manifests:
        return "no manifests"
    try:
        parts = [json.loads(m.read_text()) for m in manifests]
    except (OSError, json.JSONDecodeError) as err:
        return f"unreadable manifest ({err})"
    world = parts[0]["world_size"]
    if len(parts) != world:
        return f"{len(parts)} of {world} ranks' manifests"
    for part in parts:
        for name, size in part["files"].items():
            path = checkpoint / name
            if not path.is_file():
                return f"rank {part['rank']}'s {name} is missing"
            if path.stat().st_size != size:
                return f"rank {part['rank']}'s {name} has {path.stat().st_size} of {size} bytes"
    return None


def checkpoint_name(step: int, token: str) -> str:
    """The folder name of a worker group's checkpoint of `step` (see `checkpoint_step`)."""
    return f"checkpoint_step{step:08d}_{token}"


def checkpoint_step(checkpoint: Path) -> int:
    """The step in a checkpoint folder's name (`checkpoint_step<step>[_<token>]`)."""
    digits = checkpoint.name.removeprefix("checkpoint_step").split("_")[0]
    return int(digits) if digits.isdigit() else -1


def checkpoint_folders(run: Path) -> list[Path]:
    """`run`'s `checkpoint_step*` folders by step, then age (Ray's own `checkpoint_*`
    files beside them are not checkpoints)."""
    found = [c for c in run.glob("checkpoint_step*") if c.is_dir()]
    return sorted(found, key=lambda c: (checkpoint_step(c), c.stat().st_mtime))


def newest_complete(run: Path) -> Path:
    """The complete checkpoint of the highest step (then the newest) among `run`'s
    checkpoint folders; each newer incomplete one is skipped with a warning."""
    found = checkpoint_folders(run)
    for checkpoint in reversed(found):
        reason = incomplete_reason(checkpoint)
        if reason is None:
            return checkpoint
        log.warning("skipping incomplete checkpoint %s: %s", checkpoint, reason)
    raise FileNotFoundError(
        f"{run}: no complete checkpoint_* folder "
        f"({len(found)} incomplete); did training finish a step?"
    )


def prune_checkpoints(run: Path, keep: int, protect: str | None) -> list[Path]:
    """Delete `run`'s checkpoints but the newest `keep` complete ones and `protect` (the
    best); an incomplete one goes once a complete one of a higher step exists (nothing
    writes into it any more), the one being written never. Returns what was deleted."""
    found = checkpoint_folders(run)
    complete = [c for c in found if incomplete_reason(c) is None]
    if not complete:
        return []
    kept = {*complete[-keep:], *([run / protect] if protect else [])}
    newest = checkpoint_step(complete[-1])
    doomed = [c for c in found if c not in kept and (c in complete or checkpoint_step(c) < newest)]
    for checkpoint in doomed:
        shutil.rmtree(checkpoint, ignore_errors=True)
        log.info("deleted checkpoint %s (train.keep_checkpoints=%d)", checkpoint, keep)
    return doomed


def chosen_checkpoint(run: Path, newest: bool = False) -> Path:
    """What readers load from a run folder: its best checkpoint by the validation monitor
    (as the newest complete one records it) unless `newest`, else the newest complete."""
    last = newest_complete(run)
    if newest:
        return last
    best = json.loads((last / PROGRESS_FILE).read_text()).get("monitor", {}).get("best_checkpoint")
    if best is None or (run / best) == last:
        return last
    reason = incomplete_reason(run / best)
    if reason is not None:
        log.warning("best checkpoint %s is unusable (%s); taking %s", run / best, reason, last)
        return last
    return run / best


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
