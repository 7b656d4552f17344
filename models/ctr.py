"""CTR models (DLRM, DeepFM, DCN-v2) over pooled embeddings, blind to the table variant.

Every model takes `(dense [B, num_dense], embeddings [B, sum(sparse_dims)])`, the latter
being the per-feature pooled embeddings concatenated in feature order (torchrec's
`KeyedTensor.values()`), and returns logits [B]. Plain tensors in, plain tensors out: the
same module trains behind any table variant or sharding and exports with `torch.export`
for serving, with a symbolic batch dimension. Branches in `forward` depend only on the
architecture fixed at build time, never on tensor values.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from models.layers import MLP, CrossNet, DotInteraction, fm_interaction
from recsys.config import ModelConfig


class CtrModel(nn.Module, ABC):
    """The interface the training loop, evaluation and export rely on."""

    def __init__(self, cfg: ModelConfig, num_dense: int, sparse_dims: list[int]) -> None:
        super().__init__()
        if num_dense < 0:
            raise ValueError(f"{cfg.name}: num_dense must be >= 0, got {num_dense}")
        if not sparse_dims or min(sparse_dims) <= 0:
            raise ValueError(
                f"{cfg.name}: needs at least one sparse feature with a positive embedding "
                f"dim, got sparse_dims={sparse_dims}"
            )
        self.num_dense = num_dense
        self.sparse_dims = list(sparse_dims)

    @abstractmethod
    def forward(self, dense: Tensor, embeddings: Tensor) -> Tensor:
        """dense [B, num_dense], embeddings [B, sum(sparse_dims)] -> logits [B]."""


class DLRM(CtrModel):
    """DLRM (Naumov et al. 2019) with the dot interaction.

    The bottom MLP maps dense features to one more embedding-width vector; the top MLP sees
    that vector plus all pairwise dot products of [bottom_out, e_1, ..., e_F]. Without dense
    features there is no bottom MLP and only the embeddings interact.

    The dot interaction needs vectors of one width: the bottom MLP's output width, or
    without dense features the largest width dividing every embedding's. An embedding k
    times as wide (multiplexed probes or quotient-remainder chunks, concatenated) enters as
    its k consecutive chunks, each a vector of its own, rather than through a learned
    projection: no parameters are added and each chunk keeps its own interactions.
    """

    def __init__(self, cfg: ModelConfig, num_dense: int, sparse_dims: list[int]) -> None:
        super().__init__(cfg, num_dense, sparse_dims)
        dim = cfg.dense_arch[-1] if num_dense > 0 else math.gcd(*sparse_dims)
        if any(d % dim for d in sparse_dims):
            raise ValueError(
                f"dlrm: the dot interaction cuts embeddings into vectors of dense_arch's "
                f"last width {dim}; every embedding dim must be a multiple of it, got "
                f"dense_arch={cfg.dense_arch} and embedding dims {sparse_dims}"
            )
        self.num_chunks = sum(sparse_dims) // dim
        num_vectors = self.num_chunks + (1 if num_dense > 0 else 0)
        if num_vectors < 2:
            raise ValueError(
                "dlrm: the dot interaction needs at least two vectors; with no dense "
                "features give it at least two sparse features"
            )
        self.dim = dim
        self.bottom = mlp(cfg, num_dense, cfg.dense_arch) if num_dense > 0 else None
        self.interaction = DotInteraction(num_vectors)
        top_in = self.interaction.out_features + (dim if num_dense > 0 else 0)
        self.top = mlp(cfg, top_in, [*cfg.over_arch, 1], relu_last=False)

    def forward(self, dense: Tensor, embeddings: Tensor) -> Tensor:
        fields = embeddings.unflatten(1, (self.num_chunks, self.dim))
        if self.bottom is None:
            features = self.interaction(fields)
        else:
            bottom = self.bottom(dense)
            pairs = self.interaction(torch.cat([bottom.unsqueeze(1), fields], dim=1))
            features = torch.cat([bottom, pairs], dim=1)
        return self.top(features).squeeze(-1)


class DeepFM(CtrModel):
    """DeepFM (Guo et al. 2017): FM second-order + first-order linear + DNN, summed.

    The FM term needs one width for all fields. When widths differ (e.g. per-field dims
    chosen by OptEmbed), each narrower field is lifted to the widest dim by its own
    bias-free linear map; widening rather than cutting keeps every field's information,
    and fields already at that width stay as they are, so equal dims add no parameters.
    """

    def __init__(self, cfg: ModelConfig, num_dense: int, sparse_dims: list[int]) -> None:
        super().__init__(cfg, num_dense, sparse_dims)
        width = max(sparse_dims)
        self.fm_dim = width
        self.lifts = (
            None
            if len(set(sparse_dims)) == 1
            else nn.ModuleList(
                nn.Identity() if d == width else nn.Linear(d, width, bias=False)
                for d in sparse_dims
            )
        )
        flat = num_dense + sum(sparse_dims)
        self.first_order = nn.Linear(flat, 1)
        self.deep = mlp(cfg, flat, [*cfg.over_arch, 1], relu_last=False)

    def fm_fields(self, embeddings: Tensor) -> Tensor:
        """[B, sum(sparse_dims)] -> [B, F, fm_dim], the fields the FM term pairs up."""
        if self.lifts is None:
            return embeddings.unflatten(1, (len(self.sparse_dims), self.fm_dim))
        parts = torch.split(embeddings, self.sparse_dims, dim=1)
        return torch.stack([lift(p) for lift, p in zip(self.lifts, parts, strict=True)], dim=1)

    def forward(self, dense: Tensor, embeddings: Tensor) -> Tensor:
        flat = torch.cat([dense, embeddings], dim=1)
        second = fm_interaction(self.fm_fields(embeddings))
        return second + self.first_order(flat).squeeze(-1) + self.deep(flat).squeeze(-1)


class DCNv2(CtrModel):
    """DCN-v2 (Wang et al. 2021) in the paper's two structures.

    stacked: the cross network, then the deep MLP on its output, then a logit.
    parallel: the cross network and the deep MLP both read x0; one linear logit over
    their outputs side by side (the structure of the BARS MovieLens and Frappe runs).
    Full-rank cross weights by default, low-rank U V^T when `cfg.cross_low_rank` is set.
    """

    def __init__(self, cfg: ModelConfig, num_dense: int, sparse_dims: list[int]) -> None:
        super().__init__(cfg, num_dense, sparse_dims)
        width = num_dense + sum(sparse_dims)
        self.parallel = cfg.cross_structure == "parallel"
        self.cross = CrossNet(width, cfg.cross_layers, cfg.cross_low_rank)
        self.deep = mlp(cfg, width, cfg.over_arch)
        self.logit = nn.Linear(self.deep.out_features + (width if self.parallel else 0), 1)

    def forward(self, dense: Tensor, embeddings: Tensor) -> Tensor:
        x0 = torch.cat([dense, embeddings], dim=1)
        cross = self.cross(x0)
        features = torch.cat([cross, self.deep(x0)], dim=1) if self.parallel else self.deep(cross)
        return self.logit(features).squeeze(-1)


def mlp(cfg: ModelConfig, in_features: int, sizes: list[int], relu_last: bool = True) -> MLP:
    """An MLP with the configured dropout and batch norm."""
    return MLP(in_features, sizes, cfg.dropout, relu_last=relu_last, batch_norm=cfg.batch_norm)


_MODELS: dict[str, type[CtrModel]] = {"dlrm": DLRM, "deepfm": DeepFM, "dcnv2": DCNv2}


def build_ctr_model(cfg: ModelConfig, num_dense: int, sparse_dims: list[int]) -> CtrModel:
    """The model named by `cfg.name`, for `num_dense` dense and len(sparse_dims) sparse inputs."""
    try:
        cls = _MODELS[cfg.name]
    except KeyError:
        raise ValueError(f"unknown CTR model {cfg.name!r}; known: {sorted(_MODELS)}") from None
    return cls(cfg, num_dense, sparse_dims)
