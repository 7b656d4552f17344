"""OptEmbed (Lyu et al., CIKM 2022): the masks themselves, learned row pruning and per-field dims.

`tables.optembed.pooling` applies them to looked-up rows; this module holds the pieces that
do not depend on how rows are looked up (the step and its surrogate gradient, thresholds,
norms, sampled dims, the compact export's kept rows).

Masks (the paper's `dim_mask * row_mask * e`):

* **Row mask** `step(||e||_1 - t_f)` with a learnable threshold per field (`FieldThresholds`),
  trained through the paper's surrogate gradient (`row_mask`). A pruned row reads zeros.
* **Dimension mask**: keep the first `d` columns. The supernet draws `d ~ U{1..D_f}` per
  sample and field; search and retraining use one fixed `d` per field. The mask is the same
  for every row of a sample's bag, so it is applied once to the pooled vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import torch
from torch import Tensor, nn

# The surrogate gradient g(x) of the paper: 2 - 4|x| near the step, 0.4 on the shoulders.
_INNER = 0.4
_OUTER = 1.0


def step_surrogate_grad(x: Tensor) -> Tensor:
    """g(x) = 2 - 4|x| for |x| <= 0.4, 0.4 for 0.4 < |x| <= 1, 0 beyond."""
    a = x.abs()
    shoulder = torch.where(a <= _OUTER, torch.full_like(a, _INNER), torch.zeros_like(a))
    return torch.where(a <= _INNER, 2.0 - 4.0 * a, shoulder)


class _Step(torch.autograd.Function):
    """Heaviside step whose backward is the paper's estimator instead of zero almost everywhere."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad * step_surrogate_grad(x)


def row_mask(x: Tensor) -> Tensor:
    """1.0 where `x = ||e|| - t_f > 0`, else 0.0; differentiable through `step_surrogate_grad`."""
    return _Step.apply(x)  # type: ignore[no-any-return]


class FieldThresholds(nn.Module):
    """One learnable pruning threshold per field, initialised at 0 (every row kept).

    The paper trains them with their own plain SGD (`lr_t`), apart from the network's
    optimizer: give `parameters()` of this module to that optimizer.
    """

    def __init__(self, num_fields: int) -> None:
        super().__init__()
        self.threshold = nn.Parameter(torch.zeros(num_fields))

    def regularizer(self, alpha: float) -> Tensor:
        """`alpha * sum_f exp(-t_f)`: added to the loss, it pushes every threshold up."""
        return alpha * torch.exp(-self.threshold).sum()


def row_norms(rows: Tensor, norm: int = 1) -> Tensor:
    """Per-row L1 (default) or L2 norm, [N, D] -> [N].

    L1 as `abs().sum()`: on CPU, `vector_norm(ord=1)` over the last dim is ten times slower.
    """
    if norm == 1:
        return rows.abs().sum(-1)
    return torch.linalg.vector_norm(rows, ord=norm, dim=-1)


def kept_rows(
    weight: Tensor, threshold: float | Tensor, norm: int = 1, chunk_rows: int = 1 << 16
) -> Tensor:
    """Bool [rows]: the rows of a table that survive `threshold` (the compact export keeps them).

    Chunked so that a large table needs no temporary of its own size.
    """
    t = torch.as_tensor(threshold, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        parts = [row_norms(chunk, norm) > t for chunk in weight.split(chunk_rows)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool, device=weight.device)


def sparsity(
    kept: Sequence[int], dims: Sequence[int], rows: Sequence[int], full_dims: Sequence[int]
) -> float:
    """Share of embedding parameters removed: `1 - sum_f kept_f * d_f / sum_f rows_f * D_f`.

    Per field: rows kept, chosen dim, rows and full dim. With one full dim D for all fields
    this is the paper's `1 - sum_f kept_rows_f * dim_f / (rows * D)`.
    """
    if not len(kept) == len(dims) == len(rows) == len(full_dims):
        raise ValueError("kept, dims, rows and full_dims need one entry per field")
    total = sum(r * d for r, d in zip(rows, full_dims, strict=True))
    left = sum(k * d for k, d in zip(kept, dims, strict=True))
    return 1.0 - left / total


def sample_dims(
    batch_size: int, field_dims: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Long [B, F]: a dim drawn uniformly from 1..D_f per sample and field (the supernet's)."""
    u = torch.rand(batch_size, field_dims.numel(), generator=generator, device=field_dims.device)
    # floor(u * D) is uniform on 0..D-1; u < 1 strictly, so the top value stays in range.
    return (u * field_dims).long() + 1


def prefix_masks(width: int, device: torch.device | None = None) -> Tensor:
    """Float [width, width] whose row `d - 1` keeps the first `d` columns.

    The dims are nested prefixes, so every candidate shares its leading columns. A mask is a
    row gather (`table[dims - 1]`): cheaper on CPU than comparing and casting per element.
    """
    return torch.ones(width, width, device=device).tril()


class Mode(str, Enum):
    """What `OptEmbedPooling` masks with.

    SUPERNET: row mask from norms and thresholds + per-sample sampled dims (training).
    SEARCH: row mask from norms and thresholds + one candidate dim per field (evaluation).
    RETRAIN: fixed per-row keep masks + fixed dims; thresholds are no longer read.
    """

    SUPERNET = "supernet"
    SEARCH = "search"
    RETRAIN = "retrain"
