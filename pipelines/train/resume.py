"""Where a resumed run picks up its epoch's data, on the same or another number of workers.

Ray Train hands each worker `streaming_split(world, equal=True)` of the training log, read
in order (`preserve_order`) and shuffled by each worker through a buffer seeded by (seed,
epoch, rank). With one worker the stream is the same on every run; with more, the split's
coordinator gives each block to whichever worker asks first, so which rows a worker's
first k batches hold can differ from run to run; what is determinable is how many rows
were consumed: `world * rows pulled by one worker`, since all workers step together on
equal shares.

So the position is recorded as examples consumed in the epoch, the world size and the
batch size. On the layout it was saved from, each worker skips the batches it had
consumed, as before: the same rows whenever the blocks arrive in the same order, as they
do on one node reading a fixed log. On another layout the same rows cannot be singled
out; each worker skips whole batches up to the consumed count, rounded down to a step of
the new layout, so no more examples are skipped than were consumed. The rows skipped are
the new workers' first rows, not necessarily the ones consumed before; rank 0 logs the
counts and this reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DataPosition:
    """Batches each worker skips at the start of the resumed epoch; `note` is for the log."""

    batches: int
    note: str | None = None


def position(
    step: int, epoch: int, batches: int, pulled: int, world: int, batch_size: int
) -> dict[str, Any]:
    """Progress as checkpointed: `pulled` is the rows this worker read in the epoch."""
    return {
        "step": step,
        "epoch": epoch,
        "batches_in_epoch": batches,
        "examples_in_epoch": pulled * world,
        "world_size": world,
        "batch_size": batch_size,
    }


def resume_position(progress: dict[str, Any], world: int, batch_size: int) -> DataPosition:
    """Batches to skip in epoch `progress["epoch"]` when resuming on `world` workers."""
    batches = int(progress.get("batches_in_epoch", 0))
    if batches == 0:
        return DataPosition(0)
    saved_world, saved_batch = progress.get("world_size"), progress.get("batch_size")
    epoch = progress["epoch"]
    if saved_world is None:
        return DataPosition(
            batches,
            f"epoch {epoch}: the checkpoint records no world size (an older run); each worker "
            f"skips {batches} batches as saved, which is exact only on the same layout",
        )
    if (saved_world, saved_batch) == (world, batch_size):
        return DataPosition(batches)
    consumed = int(progress["examples_in_epoch"])
    per_step = world * batch_size
    skip = consumed // per_step
    return DataPosition(
        skip,
        f"epoch {epoch}: the checkpoint consumed {consumed} examples on {saved_world} workers "
        f"x batch {saved_batch}; resuming on {world} x {batch_size}, each worker skips its "
        f"first {skip} batches ({skip * per_step} examples) and {consumed - skip * per_step} "
        "consumed examples are read again. Ray Data's streaming split does not keep row "
        "order, so the rows skipped are the same number, not the same rows.",
    )
