"""The `optembed` table variant: storage tables (`full` or `hash`) behind OptEmbed's masks.

`OptEmbedEmbeddings` has `PooledEmbeddings`' interface (raw-ID `KeyedJaggedTensor` in,
`KeyedTensor` of `feature_dims` wide per feature out), so models and the training loop see
an ordinary embedding layer. Inside, the storage variant's ID transform maps raw IDs to
rows, torchrec `EmbeddingBagCollection`s look the rows up (sharded, fused optimizer, as
every table here), and `tables.optembed.OptEmbedPooling` masks and pools them. Rows come
from pooled lookups, the fast CPU kernels: single-valued features' pooled output is their
row, multi-valued features are looked up with one ID per bag (see `tables.optembed`).

Each feature is its own field: its own pruning threshold and its own searched dim.

Stages (`recsys.config.OptEmbedConfig.stage`):

* supernet: in training mode dims are sampled per sample; in evaluation mode (`eval()`)
  every feature keeps its full width and only the row masks apply (the supernet's
  validation score); `use_search(dims)` after `eval()` scores one candidate.
* retrain: dims and per-row keep masks are fixed (`use_retrain`); thresholds are frozen.
  A pruned row of a `full` table reads the out-of-vocabulary row instead (itself read as
  zeros if pruned), so that a compact export whose ID map lists only kept IDs scores
  exactly what this model scores; a pruned row of a `hash` table reads zeros.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from tables.optembed import Mode, OptEmbedPooling, bag_rows, one_bag_per_id, single_rows
from tables.pooled import TableSpec
from tables.transforms import VocabularyLookup


def _collection(specs: list[TableSpec], device: torch.device | None) -> EmbeddingBagCollection:
    return EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=s.name,
                embedding_dim=s.dim,
                num_embeddings=s.num_rows,
                feature_names=list(s.features),
                pooling=PoolingType.SUM,  # one row per bag: the sum is the row
            )
            for s in specs
        ],
        device=device,
    )


def _common_stride(features: KeyedJaggedTensor) -> int:
    """The most IDs of any key on any rank: sharded lookups need one batch size on all ranks,
    and the bags of one ID each make the batch size that count."""
    most = max(features.length_per_key(), default=0)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return most
    t = torch.tensor([most], device=features.values().device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


class OptEmbedEmbeddings(nn.Module):
    """Raw IDs -> masked, pooled embeddings of full width per feature (config order).

    `single_valued` names the features with at most one ID per sample; tables that serve
    only such features are looked up in `ebc_single`, the others in `ebc_multi`.
    """

    def __init__(
        self,
        specs: list[TableSpec],
        transforms: dict[str, nn.Module],
        single_valued: Collection[str],
        alpha: float,
        norm: int = 1,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if any(s.variant not in ("full", "hash") for s in specs):
            raise ValueError("optembed tables need full or hash storage")
        self.specs = specs
        self.transforms = nn.ModuleDict(transforms)
        self.feature_transform = {f: s.transform for s in specs for f in s.features}
        self.feature_names = [f for s in specs for f in s.features]
        self.feature_dims = [s.dim for s in specs for _ in s.features]
        self.alpha = alpha
        mean = [f for s in specs if s.pooling == "mean" for f in s.features]
        self.pooling = OptEmbedPooling(
            self.feature_names,
            list(range(len(self.feature_names))),
            self.feature_dims,
            mean_features=mean,
            norm=norm,
        )
        single = [s for s in specs if set(s.features) <= set(single_valued)]
        multi = [s for s in specs if s not in single]
        self.single_features = [f for s in single for f in s.features]
        self.multi_features = [f for s in multi for f in s.features]
        self.ebc_single = _collection(single, device) if single else None
        self.ebc_multi = _collection(multi, device) if multi else None
        # Features of `full` tables, whose pruned rows read the OOV row in retrain mode.
        self.vocabulary_features = frozenset(
            f for s in specs if s.variant == "full" for f in s.features
        )
        self._order: list[int] | None = None  # input key positions -> single then multi

    @property
    def mode(self) -> Mode:
        return self.pooling.mode

    def use_search(self, dims: Sequence[int]) -> None:
        """Score with `dims[i]` columns of feature i (in `feature_names` order)."""
        self.pooling.use_search(dims)

    def use_retrain(self, dims: Sequence[int], keep: Mapping[str, Tensor]) -> None:
        """Fix dims and per-row keep masks (`keep[feature]`: bool per row of its table)."""
        self.pooling.use_retrain(dims, keep)
        self.pooling.thresholds.requires_grad_(False)

    def train(self, mode: bool = True) -> OptEmbedEmbeddings:
        """Supernet only: training samples dims, evaluation reads full widths."""
        super().train(mode)
        if self.pooling.mode is not Mode.RETRAIN:
            if mode:
                self.pooling.use_supernet()
            else:
                self.pooling.use_search(self.feature_dims)
        return self

    def regularizer(self) -> Tensor | None:
        """`alpha * sum_f exp(-t_f)`, the loss term pushing thresholds up; None in retrain."""
        if self.pooling.mode is Mode.RETRAIN:
            return None
        return self.pooling.thresholds.regularizer(self.alpha)

    def table_weight(self, table: str) -> Tensor:
        """The rows of a storage table (unsharded module), [num_rows, dim], detached."""
        for ebc in (self.ebc_single, self.ebc_multi):
            if ebc is not None and table in ebc.embedding_bags:
                return ebc.embedding_bags[table].weight.detach()
        raise KeyError(f"no table {table!r}")

    def feature_weight(self, feature: str) -> Tensor:
        """The rows of the storage table that `feature` reads."""
        return self.table_weight(next(s.name for s in self.specs if feature in s.features))

    def threshold_of(self, feature: str) -> Tensor:
        return self.pooling.thresholds.threshold[self.feature_names.index(feature)]

    def _rows(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Raw IDs -> table rows, one tensor op per feature; in retrain mode a pruned row
        of a vocabulary table is replaced by the OOV row."""
        retrain = self.pooling.mode is Mode.RETRAIN
        parts = torch.split(features.values(), features.length_per_key())
        rows = []
        for key, part in zip(features.keys(), parts, strict=True):
            r = self.transforms[self.feature_transform[key]](part)
            if retrain and key in self.vocabulary_features:
                r = torch.where(self.pooling.keep[key][r], r, VocabularyLookup.OOV_ROW)
            rows.append(r)
        return KeyedJaggedTensor(
            keys=features.keys(),
            values=torch.cat(rows) if rows else features.values(),
            lengths=features.lengths(),
            stride=features.stride(),
        )

    def forward(
        self, features: KeyedJaggedTensor, event_times: torch.Tensor | None = None
    ) -> KeyedTensor:
        """Like `PooledEmbeddings.forward`; `event_times` is unused (no expiry here)."""
        if self._order is None:
            position = {k: i for i, k in enumerate(features.keys())}
            try:
                self._order = [position[f] for f in self.single_features + self.multi_features]
            except KeyError as e:
                raise ValueError(f"no IDs for optembed feature {e}") from None
        rows = self._rows(features).permute(self._order)
        single, multi = rows.split([len(self.single_features), len(self.multi_features)])
        retrain = self.pooling.mode is Mode.RETRAIN
        looked_up = {}
        if self.ebc_multi is not None:
            bags = one_bag_per_id(multi, _common_stride(multi))
            looked_up = bag_rows(self.ebc_multi(bags), multi, with_ids=retrain)
        if self.ebc_single is None:
            return self.pooling(looked_up)
        pooled = self.ebc_single(single)
        if retrain or len(set(pooled.length_per_key())) > 1:
            looked_up.update(single_rows(pooled, single, with_ids=retrain))
            return self.pooling(looked_up)
        return self.pooling(looked_up, single=pooled)
