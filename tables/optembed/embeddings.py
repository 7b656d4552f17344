"""The `optembed` table variant: storage tables (`full`, `hash` or `collisionless`) behind
OptEmbed's masks.

`OptEmbedEmbeddings` has `PooledEmbeddings`' interface (raw-ID `KeyedJaggedTensor` in,
`KeyedTensor` of `feature_dims` wide per feature out), so models and the training loop see
an ordinary embedding layer. Inside, the storage variant's ID transform maps raw IDs to
rows, torchrec `EmbeddingBagCollection`s look the rows up (sharded, fused optimizer, as
every table here), and `tables.optembed.pooling.OptEmbedPooling` masks and pools them. Rows come
from pooled lookups, the fast CPU kernels: single-valued features' pooled output is their
row, multi-valued features are looked up with one ID per bag (see `tables.optembed.pooling`).

Each feature is its own field: its own pruning threshold and its own searched dim.

Stages (`recsys.config.OptEmbedConfig.stage`):

* supernet: in training mode dims are sampled per sample; in evaluation mode (`eval()`)
  every feature keeps its full width and only the row masks apply (the supernet's
  validation score); `use_search(dims)` after `eval()` scores one candidate.
* retrain: dims and per-row keep masks are fixed (`use_retrain`); thresholds are frozen.
  A pruned row of a `full` table reads the out-of-vocabulary row instead (itself read as
  zeros if pruned), so that a compact export whose ID map lists only kept IDs scores
  exactly what this model scores; a pruned row of a `hash` table reads zeros.

Over `collisionless` storage (`tables.collisionless.transform`) the masks prune the rows of admitted
IDs. IDs without a row read the table's default embedding, added after the masks (cut to
the same dims); a retrain's masks are the supernet's kept IDs (live, admitted, above the
threshold), and the other IDs are left out before routing, so they are never admitted and
read the default, as they do in the compact export. Such tables pool by sum.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from tables.collisionless.exchange import route_tables
from tables.collisionless.transform import CollisionlessTransform
from tables.optembed.masks import Mode, kept_rows
from tables.optembed.pooling import OptEmbedPooling, bag_rows, one_bag_per_id, single_rows
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
                init_fn=s.init,
            )
            for s in specs
        ],
        device=device,
    )


def _common_stride(features: KeyedJaggedTensor) -> int:
    """The most IDs of any key on any rank: sharded lookups need one batch size on all ranks,
    and the bags of one ID each make the batch size that count."""
    # At least one bag: a batch whose IDs all read the default (collisionless) has none.
    most = max([*features.length_per_key(), 1])
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

    # pruned rows and searched dims: an export writes the compact tables instead
    prunes_rows: ClassVar[bool] = True

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
        if any(s.variant not in ("full", "hash", "collisionless") for s in specs):
            raise ValueError("optembed tables need full, hash or collisionless storage")
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
        self.single_tables = frozenset(s.name for s in single)
        # Collisionless tables: their transforms route IDs to rows (one exchange for all).
        self.routing = {
            name for name, t in transforms.items() if isinstance(t, CollisionlessTransform)
        }
        self.kept_ids: dict[str, Tensor] = {}  # retrain, collisionless: the kept raw IDs
        self._orders: dict[tuple[str, ...], list[int]] = {}  # key order -> single then multi

    @property
    def mode(self) -> Mode:
        return self.pooling.mode

    def use_search(self, dims: Sequence[int]) -> None:
        """Score with `dims[i]` columns of feature i (in `feature_names` order)."""
        self.pooling.use_search(dims)

    def use_retrain(self, dims: Sequence[int], keep: Mapping[str, Tensor]) -> None:
        """Fix dims and per-row keep masks (`keep[feature]`: bool per row of its table, or
        for a collisionless table the kept raw IDs; see `keep_mask`)."""
        rows = {f: s.num_rows for s in self.specs for f in s.features}
        by_row = dict(keep)
        for f in self._routed_features():
            if f in keep:
                self.kept_ids[f] = torch.unique(keep[f].long())
                by_row[f] = torch.ones(rows[f], dtype=torch.bool)  # pruned IDs never get here
        self.pooling.use_retrain(dims, by_row)
        self.pooling.thresholds.requires_grad_(False)

    def keep_mask(self, feature: str) -> Tensor:
        """What a retrain keeps of `feature`: its table's rows above the feature's threshold
        (bool per row); for a collisionless table the live IDs whose rows those are."""
        kept = kept_rows(
            self.feature_weight(feature), self.threshold_of(feature), self.pooling.norm
        )
        transform = self.transforms[self.feature_transform[feature]]
        if not isinstance(transform, CollisionlessTransform):
            return kept
        ids, rows = transform.live_rows()
        return ids[kept[rows]]

    def sharding(self) -> dict[str, str]:
        """Every physical table -> its configured sharding choice."""
        return {s.name: s.sharding for s in self.specs}

    def collection_of(self, table: str) -> nn.Module:
        """The collection (sharded or not) that holds `table`."""
        collection = self.ebc_single if table in self.single_tables else self.ebc_multi
        if collection is None:
            raise KeyError(f"no table {table!r}")
        return collection

    def _routed_features(self) -> list[str]:
        return [f for f in self.feature_names if self.feature_transform[f] in self.routing]

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

    def _route(
        self, features: KeyedJaggedTensor, event_times: Tensor | None
    ) -> tuple[KeyedJaggedTensor, dict[str, Tensor]]:
        """`_rows` for per-value tables; collisionless tables' IDs routed to their owners'
        rows (`route_tables`, one exchange), with per feature and sample the number of IDs
        that read the default (no row, or pruned in a retrain)."""
        keys = features.keys()
        by_table: dict[str | None, list[int]] = {}
        for i, key in enumerate(keys):
            name = self.feature_transform[key]
            by_table.setdefault(name if name in self.routing else None, []).append(i)
        if list(by_table) == [None]:
            return self._rows(features), {}
        order = [i for positions in by_table.values() for i in positions]
        parts = features.permute(order).split([len(p) for p in by_table.values()])
        out, pending, dropped = [], [], []
        for name, part in zip(by_table, parts, strict=True):
            if name is None:
                out.append(self._rows(part))
                continue
            pruned = None
            if self.pooling.mode is Mode.RETRAIN:
                part, pruned = self._drop_pruned(part)
            pending.append((self.transforms[name], part))
            dropped.append(pruned)
        missing: dict[str, Tensor] = {}
        routed = route_tables(pending, event_times)
        for (_, part), (rows, counts), pruned in zip(pending, routed, dropped, strict=True):
            out.append(rows)
            if pruned is not None:
                counts = counts + pruned
            missing.update(zip(part.keys(), counts.view(len(part.keys()), -1), strict=True))
        return KeyedJaggedTensor.concat(out), missing

    def _drop_pruned(self, part: KeyedJaggedTensor) -> tuple[KeyedJaggedTensor, Tensor]:
        """Leave out the IDs a retrain does not keep; key-major counts of them per bag."""
        values = part.values().split(part.length_per_key())
        keep = torch.cat(
            [
                torch.isin(v, self.kept_ids[k].to(v.device))
                for k, v in zip(part.keys(), values, strict=True)
            ]
        )
        lengths = part.lengths().long()
        bag = torch.repeat_interleave(torch.arange(lengths.numel()), lengths.cpu())
        kept = torch.bincount(bag[keep.cpu()], minlength=lengths.numel()).to(lengths.device)
        trimmed = KeyedJaggedTensor(
            keys=part.keys(),
            values=part.values()[keep],
            lengths=kept.to(part.lengths().dtype),
            stride=part.stride(),
        )
        return trimmed, lengths - kept

    def _add_defaults(self, out: KeyedTensor, missing: dict[str, Tensor]) -> KeyedTensor:
        """Per collisionless feature, its samples' IDs without rows times the default, cut
        to the columns the masks kept."""
        parts = dict(zip(self.feature_names, out.values().split(self.feature_dims, 1), strict=True))
        for feature, counts in missing.items():
            default = self.transforms[self.feature_transform[feature]].default
            columns = self.pooling.column_mask(feature)
            term = counts.unsqueeze(1).to(default.dtype) * default * columns
            parts[feature] = parts[feature] + term
        values = torch.cat([parts[f] for f in self.feature_names], dim=1)
        return KeyedTensor(keys=self.feature_names, length_per_key=self.feature_dims, values=values)

    def forward(
        self, features: KeyedJaggedTensor, event_times: torch.Tensor | None = None
    ) -> KeyedTensor:
        """Like `PooledEmbeddings.forward`; `event_times` (one per sample) drive the
        collisionless tables' last-seen times and expiry."""
        routed, missing = self._route(features, event_times)
        for name in self.routing:
            self.transforms[name].reset_new_rows(self.collection_of(name))
        out = self._lookup(routed)
        return self._add_defaults(out, missing) if missing else out

    def _lookup(self, routed: KeyedJaggedTensor) -> KeyedTensor:
        keys = tuple(routed.keys())
        if keys not in self._orders:
            position = {k: i for i, k in enumerate(keys)}
            try:
                order = [position[f] for f in self.single_features + self.multi_features]
            except KeyError as e:
                raise ValueError(f"no IDs for optembed feature {e}") from None
            self._orders[keys] = order
        rows = routed.permute(self._orders[keys])
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
