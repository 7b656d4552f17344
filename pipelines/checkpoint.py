"""Training state in `torch.distributed.checkpoint` format inside Ray Train checkpoints.

Each rank writes its own shards (tables, optimizer state) into its local checkpoint
directory; Ray merges the ranks' directories into one checkpoint in the run's storage.
DCP reshards on load, so a run can resume on a different number of workers (collisionless
tables excepted: their ID maps are per-rank files next to the DCP files, see
`tables.collisionless`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from tables.collisionless import load_id_maps, save_id_maps

PROGRESS_FILE = "progress.json"


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
    state = training_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(directory))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    load_id_maps(model, directory)
    return json.loads((directory / PROGRESS_FILE).read_text())


def load_model_weights(directory: Path, model: nn.Module) -> dict[str, Any]:
    """Load only the model (unsharded, one process) from a training checkpoint."""
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    model.load_state_dict(state["model"])
    load_id_maps(model, directory)
    return json.loads((directory / PROGRESS_FILE).read_text())
