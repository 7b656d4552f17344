"""Arrays advised onto huge pages hold exactly what `torch.full` would."""

from __future__ import annotations

import pytest
import torch

from tables.collisionless import hugepages


@pytest.mark.parametrize("numel", [0, 1, 1000, hugepages.MIN_BYTES // 8 + 12345])
@pytest.mark.parametrize(
    ("value", "dtype"), [(0, torch.int64), (-1, torch.int32), (True, torch.bool)]
)
def test_full_matches_torch_full(numel: int, value: int | bool, dtype: torch.dtype) -> None:
    got = hugepages.full(numel, value, dtype)
    assert got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, torch.full((numel,), value, dtype=dtype))
