"""OptEmbed's masks over a [B, F, D] block of rows, fused by `torch.compile`.

`x * step(||x||_1 - t) * prefix(d)` and its estimator backward are about ten elementwise
passes over the block when run op by op, and on CPU these passes are the masks' whole cost
(the rows themselves come from the lookup). Inductor compiles the forward and the backward
into one loop each: a row's norm, mask and output, or its dot product and gradient, are
computed while the row is in registers. Same values; the norm and the dot product may sum
in another order, so they can differ in the last bit.

Compiled once per process for all shapes (`dynamic=True`, cached on disk by Inductor, about
15 s the first time on a machine). Blocks under `MIN_ELEMENTS` stay eager, where compiling
would not pay; so does a machine on which Inductor cannot compile (warned once).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from tables.optembed.masks import step_surrogate_grad

MIN_ELEMENTS = 1 << 16

_broken = False


def _forward(x: Tensor, threshold: Tensor, dims: Tensor) -> tuple[Tensor, Tensor]:
    z = x.abs().sum(-1) - threshold  # [B, F]
    columns = torch.arange(x.size(-1), device=x.device) < dims.unsqueeze(-1)
    return torch.where(columns & (z > 0).unsqueeze(-1), x, 0.0), z


def _backward(grad: Tensor, x: Tensor, z: Tensor, dims: Tensor) -> tuple[Tensor, Tensor]:
    columns = torch.arange(x.size(-1), device=x.device) < dims.unsqueeze(-1)
    grad_columns = torch.where(columns, grad, 0.0)
    # d out / d mask = <grad * columns, x>; through the estimator to z = ||x||_1 - t.
    grad_z = (grad_columns * x).sum(-1) * step_surrogate_grad(z)
    grad_x = torch.where((z > 0).unsqueeze(-1), grad_columns, 0.0)
    return grad_x + x.sign() * grad_z.unsqueeze(-1), -grad_z.sum(0)


@functools.cache
def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(fn, dynamic=True)


def usable(x: Tensor, dims: Tensor) -> bool:
    """Whether `masked_block(x, ..., dims)` should serve this block: a large one, with a dim
    per sample (the supernet's), needing gradients, on a machine where compiling works."""
    return (
        not _broken
        and x.requires_grad
        and torch.is_grad_enabled()
        and x.numel() >= MIN_ELEMENTS
        and dims.shape == x.shape[:2]
    )


def masked_block(x: Tensor, threshold: Tensor, dims: Tensor) -> Tensor:
    """`x * step(||x||_1 - threshold) * (column < dims)`, [B, F, D] with threshold [F] and
    dims [B, F], differentiable in `x` and `threshold` through the paper's estimator."""
    return _FusedMaskedBlock.apply(x, threshold, dims)  # type: ignore[no-any-return]


def _run(fn: Callable[..., Any], *args: Tensor) -> Any:
    """`fn` compiled; run as it is if Inductor fails here (said once, and `usable` is then
    False, so the caller's eager path serves from the next block on)."""
    global _broken
    if not _broken:
        try:
            return _compiled(fn)(*args)
        except Exception as e:  # any compiler failure
            _broken = True
            warnings.warn(f"optembed: fused masks unavailable, run eagerly ({e})", stacklevel=3)
    return fn(*args)


class _FusedMaskedBlock(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: Tensor, threshold: Tensor, dims: Tensor
    ) -> Tensor:
        out, z = _run(_forward, x.detach(), threshold.detach(), dims)
        ctx.save_for_backward(x, z, dims)
        return out  # type: ignore[no-any-return]

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor, Tensor, None]:
        x, z, dims = ctx.saved_tensors  # type: ignore[attr-defined]
        grad_x, grad_threshold = _run(_backward, grad, x.detach(), z, dims)
        return grad_x, grad_threshold, None
