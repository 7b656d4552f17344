"""Embedding L2 on the rows a batch looks up, against a per-row dict reference."""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from models.ranking import lookup_l2

# feature a: single-valued, 3 twice; feature b: bags [1, 2], [4], [], [4]
A_IDS = [3, 3, 5, 7]
B_BAGS = [[1, 2], [4], [], [4]]


def _pooled(table: torch.Tensor) -> tuple[KeyedJaggedTensor, KeyedTensor]:
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"],
        values=torch.tensor(A_IDS + [i for bag in B_BAGS for i in bag]),
        lengths=torch.tensor([1] * 4 + [len(bag) for bag in B_BAGS]),
    )
    a = table[torch.tensor(A_IDS)]
    b = torch.stack([table[bag].sum(dim=0) if bag else table.new_zeros(4) for bag in B_BAGS])
    return features, KeyedTensor.from_tensor_list(["a", "b"], [a, b])


def test_each_distinct_single_id_counts_once_and_longer_bags_are_averaged() -> None:
    torch.manual_seed(0)
    table = torch.randn(10, 4, requires_grad=True)
    features, pooled = _pooled(table)
    norms = {i: float(table[i].pow(2).sum()) for i in range(10)}
    expected = sum(norms[i] for i in set(A_IDS))  # 3 once, 5, 7
    # b: bags of one ID ([4] twice) count once; [1, 2] and [] pooled, weighted 1/4
    expected += norms[4] + float((table[1] + table[2]).pow(2).sum()) / 4
    penalty = lookup_l2(features, pooled)
    assert abs(float(penalty) - expected) < 1e-5
    (0.5 * penalty).backward()
    grad = table.grad
    assert grad is not None
    # a row read by single-ID samples only gets exactly w: lambda * w under lambda / 2 * L2
    torch.testing.assert_close(grad[[3, 5, 7]], table.detach()[[3, 5, 7]])
    torch.testing.assert_close(grad[[0, 6, 8, 9]], torch.zeros(4, 4))  # not read: untouched
