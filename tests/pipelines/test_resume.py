"""Data position of a resumed run: batches each worker skips, on the saved layout and on
another world size or batch size."""

from __future__ import annotations

import itertools

import pytest

from pipelines.train.resume import DataPosition, position, resume_position


def test_same_layout_skips_the_saved_batches_silently() -> None:
    saved = position(step=37, epoch=1, batches=12, pulled=12 * 256, world=2, batch_size=256)
    assert saved["examples_in_epoch"] == 2 * 12 * 256
    assert resume_position(saved, world=2, batch_size=256) == DataPosition(12)


def test_start_of_an_epoch_skips_nothing_on_any_layout() -> None:
    saved = position(step=40, epoch=2, batches=0, pulled=0, world=4, batch_size=128)
    assert resume_position(saved, world=1, batch_size=512) == DataPosition(0)


def test_fewer_workers_skip_what_all_workers_consumed() -> None:
    """Half an epoch on 2 workers (10 batches each) is 20 batches of 1 worker, not 10."""
    saved = position(step=10, epoch=0, batches=10, pulled=10 * 1024, world=2, batch_size=1024)
    resumed = resume_position(saved, world=1, batch_size=1024)
    assert resumed.batches == 20
    assert resumed.note is not None
    assert "20480 examples" in resumed.note and "2 workers" in resumed.note
    assert "0 consumed examples are read again" in resumed.note


@pytest.mark.parametrize(
    ("world", "batch_size", "skip", "reread"),
    [(3, 1024, 6, 2048), (4, 1024, 5, 0), (2, 1000, 10, 480), (1, 3000, 6, 2480)],
)
def test_other_layouts_round_down_to_whole_steps(
    world: int, batch_size: int, skip: int, reread: int
) -> None:
    saved = position(step=10, epoch=0, batches=10, pulled=10 * 1024, world=2, batch_size=1024)
    resumed = resume_position(saved, world=world, batch_size=batch_size)
    assert resumed.batches == skip
    assert f"{reread} consumed examples are read again" in (resumed.note or "")


def test_never_skips_more_than_was_consumed_nor_a_whole_step_less() -> None:
    for old_world, new_world, batches, old_b, new_b in itertools.product(
        (1, 2, 3, 8), (1, 2, 5, 8), (1, 7, 50), (64, 100), (64, 96)
    ):
        if (old_world, old_b) == (new_world, new_b):
            continue
        consumed = old_world * batches * old_b
        saved = position(batches, 0, batches, batches * old_b, old_world, old_b)
        skipped = resume_position(saved, new_world, new_b).batches * new_world * new_b
        assert consumed - new_world * new_b < skipped <= consumed


def test_a_checkpoint_without_a_world_size_resumes_as_saved_and_says_so() -> None:
    older = {"step": 5, "epoch": 0, "batches_in_epoch": 5}
    resumed = resume_position(older, world=3, batch_size=64)
    assert resumed.batches == 5
    assert resumed.note is not None and "no world size" in resumed.note
