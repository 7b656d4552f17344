"""Building blocks of the CTR models: MLPs and the three feature-interaction operators.

Each block is a plain `nn.Module` over dense tensors with static shapes known at build
time, so whole models trace cleanly through `torch.export` with a symbolic batch size:
nothing here branches on tensor values or on the batch dimension.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MLP(nn.Sequential):
    """Linear -> [BatchNorm] -> ReLU -> [Dropout] per layer; `layer_sizes` are the output
    widths in order (the order of FuxiCTR's MLP block, which the BARS recipes tune).

    `relu_last=False` leaves the last layer linear (a logit head or a residual input);
    DLRM's bottom MLP keeps it, as in the paper, so its output is a nonnegative embedding.
    In eval mode BatchNorm uses its running statistics, so any batch size scores alike.
    """

    def __init__(
        self,
        in_features: int,
        layer_sizes: list[int],
        dropout: float = 0.0,
        relu_last: bool = True,
        batch_norm: bool = False,
    ) -> None:
        layers: list[nn.Module] = []
        width = in_features
        for i, size in enumerate(layer_sizes):
            layers.append(nn.Linear(width, size))
            if relu_last or i < len(layer_sizes) - 1:
                if batch_norm:
                    layers.append(nn.BatchNorm1d(size))
                layers.append(nn.ReLU())
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
            width = size
        super().__init__(*layers)
        self.out_features = width


class DotInteraction(nn.Module):
    """DLRM's pairwise dot products of `num_vectors` equal-width vectors per example.

    The strict upper triangle of the Gram matrix, flattened row-major: (0,1), (0,2), ...,
    (1,2), ... The indices are a buffer computed once, so the forward pass is one batched
    matmul plus one gather regardless of the number of features.
    """

    def __init__(self, num_vectors: int) -> None:
        super().__init__()
        rows, cols = torch.triu_indices(num_vectors, num_vectors, offset=1)
        # Not persistent: derived from the shape, so checkpoints and exports stay weights-only.
        self.register_buffer("pair_index", rows * num_vectors + cols, persistent=False)
        self.num_vectors = num_vectors
        self.out_features = int(rows.numel())

    def forward(self, vectors: Tensor) -> Tensor:
        """[B, num_vectors, d] -> [B, num_vectors * (num_vectors - 1) / 2]."""
        gram = torch.bmm(vectors, vectors.transpose(1, 2))
        return gram.flatten(1).index_select(1, self.pair_index)


def fm_interaction(fields: Tensor) -> Tensor:
    """Factorization-machine second-order term: sum over field pairs i<j of <e_i, e_j>.

    Uses Rendle's identity 0.5 * ((sum_f e_f)^2 - sum_f e_f^2) summed over dimensions, which
    is linear in the number of fields instead of quadratic. [B, F, d] -> [B].
    """
    square_of_sum = fields.sum(dim=1).pow(2)
    sum_of_squares = fields.pow(2).sum(dim=1)
    return 0.5 * (square_of_sum - sum_of_squares).sum(dim=1)


class CrossLayer(nn.Module):
    """One DCN-v2 cross layer: x_{l+1} = x0 * (W x_l + b) + x_l.

    With `low_rank` the weight is factored as W = U V^T (rank r), which cuts parameters from
    d^2 to 2 d r; the paper finds that cross weights are close to low rank anyway.
    """

    def __init__(self, width: int, low_rank: int | None = None) -> None:
        super().__init__()
        self.weight: nn.Module
        if low_rank is None:
            self.weight = nn.Linear(width, width)
        else:
            # V^T projects down without bias; U projects back up and carries the bias b.
            self.weight = nn.Sequential(
                nn.Linear(width, low_rank, bias=False), nn.Linear(low_rank, width)
            )

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        return x0 * self.weight(x) + x


class CrossNet(nn.Module):
    """A stack of `num_layers` cross layers, all fed the same x0."""

    def __init__(self, width: int, num_layers: int, low_rank: int | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CrossLayer(width, low_rank) for _ in range(num_layers))

    def forward(self, x0: Tensor) -> Tensor:
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x
