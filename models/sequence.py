"""Long-sequence CTR models: DIN, TWIN (search, then attend), TWIN with projections, DARE.

All four read already-looked-up embeddings (`SequenceInputs`), never IDs, so they are blind
to the table variant and its sharding. Each input carries two embedding sets: `attention`,
used for every attention score, and `representation`, the vectors that are aggregated and
fed to the MLP. The coupled models (DIN, TWIN, TWIN with projections) are meant to be fed
the same tensors in both (one table per feature); DARE's whole difference is that its two
sets come from separate tables, the attention one possibly narrower, so with tied sets it
is exactly TWIN. `model.decoupled` tells the caller which kind of tables to build.

A vector (target or behaviour) is the concatenation of item, category and time-position
embeddings, in that order. The time index is the reverse position in the history (most
recent behaviour = 1, see `tables.sequence.reverse_positions`) and 0 for the target. A
model built with `time_gaps` also reads each behaviour's gap to its impression
(`SequenceInputs.gaps`, see `models.time_gaps`) and adds its embedding to the attention keys.

Export: every model traces with `torch.export` (symbolic batch size and history total)
when built with `max_length`, a static bound on history lengths; see `search_top_k`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.search import scaled_query, search_top_k
from models.segments import gather_rows, segment_mean, segment_softmax
from models.time_gaps import TimeGapEmbedding, with_time_gaps
from recsys.config import SEQUENCE_MODELS


@dataclass(frozen=True)
class FieldDims:
    """Embedding widths of one set's fields; its vectors are item | category | time."""

    item: int
    category: int
    time: int

    def __post_init__(self) -> None:
        if min(self.item, self.category) <= 0 or self.time < 0:
            raise ValueError(f"field dims must be positive (time may be 0), got {self}")

    @property
    def widths(self) -> list[int]:
        return [self.item, self.category, self.time]

    @property
    def total(self) -> int:
        return self.item + self.category + self.time


@dataclass
class EmbeddingSet:
    """One embedding set of a batch: target [B, d] and history values [N, d] (users one
    after the other, oldest behaviour first), each row item | category | time-position."""

    target: Tensor
    history: Tensor


@dataclass
class SequenceInputs:
    """Everything a sequence model reads for a batch of B impressions.

    offsets: [B + 1] int64 starts of each user's history in the history values (any
    history may be empty, all of them too: one new user's request); other: optional
    [B, other_dim] dense features and pooled embeddings of non-sequence features; gaps:
    optional [N] int64 seconds from each behaviour to its impression, read by a model built
    with time gaps (and ignored by one without).
    """

    attention: EmbeddingSet
    representation: EmbeddingSet
    offsets: Tensor
    other: Tensor | None = None
    gaps: Tensor | None = None

    @classmethod
    def coupled(
        cls,
        embeddings: EmbeddingSet,
        offsets: Tensor,
        other: Tensor | None = None,
        gaps: Tensor | None = None,
    ) -> SequenceInputs:
        """Inputs for a model with one embedding set serving attention and representation."""
        return cls(embeddings, embeddings, offsets, other, gaps)


torch.export.register_dataclass(EmbeddingSet)
torch.export.register_dataclass(SequenceInputs)


def masked_softmax(scores: Tensor, valid: Tensor) -> Tensor:
    """Softmax over the valid slots of each row; all-zero weights for a row with none."""
    floor = torch.finfo(scores.dtype).min
    return torch.softmax(scores.masked_fill(~valid, floor), dim=-1) * valid


class InterestHead(nn.Module):
    """The paper's prediction MLP on [R(t), u, mean, R(t) * u, R(t) * mean] (+ other).

    BatchNorm -> 200 -> 80 -> 1 with PReLU; one logit instead of the paper's two-way
    softmax, which is the same model under binary cross-entropy.
    """

    def __init__(self, width: int, other_dim: int) -> None:
        super().__init__()
        features = 5 * width + other_dim
        self.mlp = nn.Sequential(
            nn.BatchNorm1d(features),
            nn.Linear(features, 200),
            nn.PReLU(init=0.1),
            nn.Linear(200, 80),
            nn.PReLU(init=0.1),
            nn.Linear(80, 1),
        )

    def forward(
        self, target: Tensor, interest: Tensor, mean: Tensor, other: Tensor | None
    ) -> Tensor:
        parts = [target, interest, mean, target * interest, target * mean]
        if other is not None:
            parts.insert(0, other)
        return self.mlp(torch.cat(parts, dim=1)).squeeze(-1)


class FieldProjection(nn.Module):
    """Bias-free d_f x d_f linear maps, one per field, applied to concatenated vectors.

    Kept as one block-diagonal matrix so a projection is one matmul, and so its transpose
    can move onto the other side of a dot product: <P_t t, P_b h> = <P_b^T P_t t, h>.
    """

    def __init__(self, dims: FieldDims) -> None:
        super().__init__()
        self.fields = nn.ModuleList(nn.Linear(d, d, bias=False) for d in dims.widths if d)

    def matrix(self) -> Tensor:
        return torch.block_diag(*(f.weight for f in self.fields))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.matrix().T

    def transpose(self, x: Tensor) -> Tensor:
        """Applies P^T."""
        return x @ self.matrix()


class Projections(nn.Module):
    """The projection baseline's four maps: (attention | representation) x (target | behaviour).

    The two behaviour maps act where they are cheapest, which their linearity allows: the
    attention one is folded into the query (so the search stays one pass over the raw
    history values), the representation one acts after aggregation, on [B, d] instead of
    [N, d]. Same model as projecting every behaviour, up to float rounding.
    """

    def __init__(self, dims: FieldDims) -> None:
        super().__init__()
        self.attention_target = FieldProjection(dims)
        self.attention_behaviour = FieldProjection(dims)
        self.representation_target = FieldProjection(dims)
        self.representation_behaviour = FieldProjection(dims)

    def query(self, target: Tensor) -> Tensor:
        return self.attention_behaviour.transpose(self.attention_target(target))


class TwoStageModel(nn.Module):
    """TWIN / DARE: top-K search over the whole history, then softmax attention over the K.

    Stage 1 (`search_top_k`) picks the K behaviours with the highest attention scores;
    stage 2 recomputes those K scores with autograd, normalises them with a softmax and
    averages the K representation vectors with those weights into the user interest u.
    The head sees [R(t), u, mean of all R(h), R(t) * u, R(t) * mean].
    """

    def __init__(
        self,
        attention: FieldDims,
        representation: FieldDims,
        *,
        decoupled: bool,
        other_dim: int = 0,
        top_k: int = 20,
        project: bool = False,
        max_length: int | None = None,
        time_gaps: bool = False,
    ) -> None:
        super().__init__()
        if not decoupled and attention != representation:
            raise ValueError(
                f"a coupled model has one embedding set, got attention dims {attention} "
                f"and representation dims {representation}"
            )
        if project and decoupled:
            raise ValueError("the projection baseline is a coupled model")
        self.attention_dims = attention
        self.representation_dims = representation
        self.decoupled = decoupled
        self.top_k = top_k
        self.max_length = max_length
        self.projections = Projections(attention) if project else None
        self.time_gaps = TimeGapEmbedding(attention.total) if time_gaps else None
        self.head = InterestHead(representation.total, other_dim)

    def forward(self, inputs: SequenceInputs) -> Tensor:
        """-> logits [B]."""
        att, rep, offsets = inputs.attention, inputs.representation, inputs.offsets
        keys = with_time_gaps(att.history, inputs.gaps, self.time_gaps)
        target = att.target if self.projections is None else self.projections.query(att.target)
        time_dim = self.attention_dims.time
        top = search_top_k(target, keys, offsets, time_dim, self.top_k, self.max_length)
        rows = offsets[:-1].unsqueeze(1) + top.indices
        query = scaled_query(target, time_dim).unsqueeze(-1)
        scores = (gather_rows(keys, rows) @ query).squeeze(-1)
        weights = masked_softmax(scores, top.valid)
        interest = (weights.unsqueeze(1) @ gather_rows(rep.history, rows)).squeeze(1)
        mean = segment_mean(rep.history, offsets)
        represented = rep.target
        if self.projections is not None:
            represented = self.projections.representation_target(rep.target)
            interest = self.projections.representation_behaviour(interest)
            mean = self.projections.representation_behaviour(mean)
        return self.head(represented, interest, mean, inputs.other)


class DIN(nn.Module):
    """DIN (Zhou et al. 2018): target attention over the `length` most recent behaviours.

    The activation unit scores each behaviour with an MLP on [t, h, t - h, t * h] of the
    attention vectors (time part included), normalised with a softmax as in the DARE
    paper's baseline; the mean in the head covers the same window, all DIN sees. The window
    stays jagged, each user's min(length, history) behaviours one after the other: the unit
    never runs on padding, so a batch costs what its true histories hold.
    """

    def __init__(
        self,
        dims: FieldDims,
        *,
        other_dim: int = 0,
        length: int = 200,
        hidden: int = 36,
        time_gaps: bool = False,
    ) -> None:
        super().__init__()
        self.dims = dims
        self.decoupled = False
        self.length = length
        self.unit = nn.Sequential(
            nn.Linear(4 * dims.total, hidden), nn.PReLU(init=0.1), nn.Linear(hidden, 1)
        )
        self.time_gaps = TimeGapEmbedding(dims.total) if time_gaps else None
        self.head = InterestHead(dims.total, other_dim)

    def window(self, offsets: Tensor, total: int) -> tuple[Tensor, Tensor, Tensor]:
        """(rows [M] of each user's last `length` behaviours, oldest first, user after user;
        the user [M] of each; the window's lengths [B]) for `total` history rows."""
        lengths = offsets[1:] - offsets[:-1]
        users = torch.arange(lengths.shape[0], device=offsets.device)
        owner = torch.repeat_interleave(users, lengths, output_size=total)
        back = offsets[1:][owner] - torch.arange(total, device=offsets.device)  # 1 = newest
        rows = (back <= self.length).nonzero().squeeze(1)
        return rows, owner[rows], lengths.clamp(max=self.length)

    def forward(self, inputs: SequenceInputs) -> Tensor:
        """-> logits [B]."""
        att, rep = inputs.attention, inputs.representation
        batch = att.target.shape[0]
        rows, users, counts = self.window(inputs.offsets, att.history.shape[0])
        gaps = None if inputs.gaps is None else inputs.gaps[rows]
        keys = with_time_gaps(att.history[rows], gaps, self.time_gaps)
        target = att.target[users]
        scores = self.unit(torch.cat([target, keys, target - keys, target * keys], -1))
        weights = segment_softmax(scores.squeeze(-1), users, batch)
        values = rep.history[rows]
        zeros = values.new_zeros(batch, values.shape[1])
        interest = zeros.index_add(0, users, weights.unsqueeze(1) * values)
        mean = zeros.index_add(0, users, values) / counts.clamp(min=1).unsqueeze(1).to(zeros)
        return self.head(rep.target, interest, mean, inputs.other)


def build_sequence_model(
    name: str,
    dims: FieldDims,
    *,
    attention_dims: FieldDims | None = None,
    other_dim: int = 0,
    top_k: int = 20,
    din_length: int = 200,
    max_length: int | None = None,
    time_gaps: bool = False,
) -> nn.Module:
    """The sequence model `name` over vectors of field dims `dims` (the representation set).

    attention_dims: DARE's attention set (default: equal to `dims`); the coupled models
    share one set and reject it. other_dim: width of `SequenceInputs.other`. top_k: the
    two-stage models' K. din_length: DIN's window. max_length: static bound on history
    lengths, needed for `torch.export` of the two-stage models. time_gaps: read
    `SequenceInputs.gaps` (for a log with behaviour timestamps).
    """
    if name not in SEQUENCE_MODELS:
        raise ValueError(f"unknown sequence model {name!r}; known: {list(SEQUENCE_MODELS)}")
    if attention_dims is not None and name != "dare":
        raise ValueError(f"{name}: one embedding set; attention_dims is for 'dare' only")
    if name == "din":
        return DIN(dims, other_dim=other_dim, length=din_length, time_gaps=time_gaps)
    two_stage = {
        "other_dim": other_dim,
        "top_k": top_k,
        "max_length": max_length,
        "time_gaps": time_gaps,
    }
    if name == "dare":
        return dare(attention_dims or dims, dims, **two_stage)
    if name == "twin_proj":
        return twin_with_projections(dims, **two_stage)
    return twin(dims, **two_stage)


def twin(
    dims: FieldDims,
    *,
    other_dim: int = 0,
    top_k: int = 20,
    max_length: int | None = None,
    time_gaps: bool = False,
) -> TwoStageModel:
    """TWIN (Chang et al. 2023): one embedding set searches the history and is aggregated."""
    return TwoStageModel(
        dims,
        dims,
        decoupled=False,
        other_dim=other_dim,
        top_k=top_k,
        max_length=max_length,
        time_gaps=time_gaps,
    )


def twin_with_projections(
    dims: FieldDims,
    *,
    other_dim: int = 0,
    top_k: int = 20,
    max_length: int | None = None,
    time_gaps: bool = False,
) -> TwoStageModel:
    """TWIN with per-field linear projections for attention and representation: the DARE
    paper's cheaper alternative to a second embedding set."""
    return TwoStageModel(
        dims,
        dims,
        decoupled=False,
        project=True,
        other_dim=other_dim,
        top_k=top_k,
        max_length=max_length,
        time_gaps=time_gaps,
    )


def dare(
    attention: FieldDims,
    representation: FieldDims,
    *,
    other_dim: int = 0,
    top_k: int = 20,
    max_length: int | None = None,
    time_gaps: bool = False,
) -> TwoStageModel:
    """DARE (Feng et al. 2024): TWIN's two stages with decoupled embeddings, one set to
    search and weigh the history, another to aggregate it."""
    return TwoStageModel(
        attention,
        representation,
        decoupled=True,
        other_dim=other_dim,
        top_k=top_k,
        max_length=max_length,
        time_gaps=time_gaps,
    )
