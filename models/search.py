"""Stage 1 of the two-stage long-sequence models: the top-K behaviours of every user.

Every behaviour of every history is scored against its user's target,

    score_i = <A(t), A(h_i)> / sqrt(d_sem) + <A_t(t), A_t(h_i)> / sqrt(d_time),

where a vector is the concatenation of its semantic part (item, category) and its time part
(the last `time_dim` columns). Folding both scales into the target turns this into one dot
product per behaviour, computed for the whole batch by one jagged-times-dense batched matmul
(`fbgemm.jagged_dense_bmm`) straight on the jagged values: histories are never padded, and
the cost is one pass over N x d_a attention values, which is why narrower attention
embeddings search proportionally faster. Only the scalar scores are padded, to the batch's
longest history, for `topk`.

Ties are broken towards the more recent behaviour, exactly and reproducibly: `topk` runs on
int64 keys that order like (score, position) instead of on the scores themselves, whose tie
order is unspecified.

The search selects and does not learn (no gradient flows through an index), so it runs
without autograd; the stage-2 attention recomputes the K scores it trains on.
"""

from __future__ import annotations

from dataclasses import dataclass

import fbgemm_gpu  # noqa: F401  (registers the torch.ops.fbgemm jagged kernels)
import torch
from torch import Tensor

_INT64_MIN = torch.iinfo(torch.int64).min


@dataclass
class TopK:
    """The selected behaviours, best first, [B, K] each.

    indices: position in the user's history (0 = oldest), 0 where not valid; scores: the
    stage-1 scores, -inf where not valid; valid: False in the slots that a history shorter
    than K cannot fill.
    """

    indices: Tensor
    scores: Tensor
    valid: Tensor


def scaled_query(target: Tensor, time_dim: int) -> Tensor:
    """The target with both score scales folded in, so that <query, h> is the full score."""
    sem = target.shape[-1] - time_dim
    if time_dim == 0:
        return target * sem**-0.5
    return torch.cat([target[..., :sem] * sem**-0.5, target[..., sem:] * time_dim**-0.5], -1)


def ordered_keys(scores: Tensor) -> Tensor:
    """int64 keys that order like (score, position along the last dim) for float scores.

    The IEEE bits of a float, read as a signed integer, order like the float for positive
    values and in reverse for negative ones; flipping the 31 low bits of the negatives
    fixes that. The position fills the low 32 bits, so equal scores order by position.
    """
    # + 0.0 turns -0.0 into +0.0, which the bit trick would otherwise rank below it.
    bits = (scores.float() + 0.0).view(torch.int32).to(torch.int64)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    position = torch.arange(scores.shape[-1], device=scores.device)
    return ordered * 2**32 + position


@torch.no_grad()
def search_top_k(
    target: Tensor,
    history: Tensor,
    offsets: Tensor,
    time_dim: int,
    k: int = 20,
    max_length: int | None = None,
) -> TopK:
    """Top-`k` behaviours per user by attention score; ties go to the more recent one.

    target: [B, d_a] attention embedding of each target; history: [N, d_a] attention
    embeddings of all behaviours, user after user (oldest first within a user); offsets:
    [B + 1] int64 starts of the users' histories in `history`; time_dim: width of the time
    part at the end of each vector. max_length: a static upper bound on history lengths,
    needed to trace the search with `torch.export` (the fbgemm kernel takes its row bound as
    a plain int); None uses the batch's longest history, read back from the device once.
    """
    query = scaled_query(target, time_dim).unsqueeze(-1).to(history.dtype)
    lengths = offsets[1:] - offsets[:-1]
    longest = lengths.max().item()
    torch._check(longest >= 0)
    if max_length is not None:
        torch._check(longest <= max_length)
    bound = longest if max_length is None else max_length
    flat, _ = torch.ops.fbgemm.jagged_dense_bmm(history.contiguous(), offsets, query, bound)
    width = torch.sym_max(longest, k)
    scores = torch.ops.fbgemm.jagged_to_padded_dense(flat, [offsets], [width], float("-inf"))
    scores = scores.squeeze(-1)
    keys = ordered_keys(scores)
    past_end = torch.arange(width, device=scores.device) >= lengths.unsqueeze(1)
    _, indices = keys.masked_fill(past_end, _INT64_MIN).topk(k, dim=1)
    valid = indices < lengths.unsqueeze(1)
    return TopK(
        indices=indices.masked_fill(~valid, 0),
        scores=scores.gather(1, indices).masked_fill(~valid, float("-inf")),
        valid=valid,
    )
