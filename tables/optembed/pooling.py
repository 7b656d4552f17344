"""OptEmbed's masked pooling: unpooled rows per feature -> masked, pooled rows per sample.

A row's mask depends on that row's own norm, so it cannot be applied to a pooled sum:
OptEmbed tables look rows up unpooled (torchrec `EmbeddingCollection`, sharded and
updated by fbgemm's fused optimizers like every other table), and `OptEmbedPooling` masks
and pools them per sample. Everything is tensor ops per feature or per block of
single-valued features, never per row. On CPU the same rows come faster from pooled
lookups with one ID per bag (`one_bag_per_id`, `bag_rows`, `single_rows`; see there).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from tables.optembed import fused as optembed_fused
from tables.optembed.masks import (
    FieldThresholds,
    Mode,
    prefix_masks,
    row_mask,
    row_norms,
    sample_dims,
    step_surrogate_grad,
)


class OptEmbedPooling(nn.Module):
    """Unpooled rows per feature (an `EmbeddingCollection`'s output) -> masked pooled rows.

    `features` fixes the output order; `fields[i]` is feature i's field (features of one
    field share its threshold and dim); `field_dims[f]` is field f's full width, which must
    equal its tables' embedding dim. Returns a `KeyedTensor` of [B, D_f] per feature, like
    the pooled tables, so the dense model sees the same input either way.

    The mode's dims and keep masks are configuration, not state: they are not in
    `state_dict()`, and a checkpoint keeps them next to the model (with the search result).
    """

    def __init__(
        self,
        features: Sequence[str],
        fields: Sequence[int],
        field_dims: Sequence[int],
        mean_features: Collection[str] = (),
        norm: int = 1,
    ) -> None:
        super().__init__()
        if len(features) != len(fields):
            raise ValueError("fields needs one entry per feature")
        if not all(0 <= f < len(field_dims) for f in fields):
            raise ValueError(f"field index out of range 0..{len(field_dims) - 1}: {fields}")
        if min(field_dims) < 1:
            raise ValueError(f"field dims must be >= 1, got {field_dims}")
        if norm not in (1, 2):
            raise ValueError(f"norm must be 1 or 2, got {norm}")
        self.features = list(features)
        self._position = {f: i for i, f in enumerate(self.features)}
        self.fields = list(fields)
        self.feature_dims = [int(field_dims[f]) for f in fields]
        self.mean_features = frozenset(mean_features)
        self.norm = norm
        self.thresholds = FieldThresholds(len(field_dims))
        self.register_buffer("field_dims", torch.tensor(field_dims), persistent=False)
        self.register_buffer("dims", self.field_dims.clone(), persistent=False)
        for width in sorted(set(field_dims)):
            self.register_buffer(f"prefix_{width}", prefix_masks(width), persistent=False)
        self.mode = Mode.SUPERNET
        self.keep: dict[str, Tensor] = {}
        self.generator: torch.Generator | None = None
        self.last_dims: Tensor | None = None

    def use_supernet(self, generator: torch.Generator | None = None) -> None:
        """Sample dims per sample and field; `generator` makes the draws reproducible."""
        self.mode, self.generator, self.keep = Mode.SUPERNET, generator, {}

    def use_search(self, dims: Sequence[int]) -> None:
        """Evaluate one candidate: `dims[f]` columns of field f, rows pruned by thresholds."""
        self.mode, self.keep = Mode.SEARCH, {}
        self.dims = self._checked_dims(dims)

    def use_retrain(self, dims: Sequence[int], keep: Mapping[str, Tensor]) -> None:
        """Fixed masks: `keep[feature]` is a bool per row of that feature's table.

        The lookup must then carry row IDs: build the `EmbeddingCollection` with
        `need_indices=True` (its output puts them in `weights()`).
        """
        missing = set(self.features) - set(keep)
        if missing:
            raise ValueError(f"retrain needs a keep mask for features {sorted(missing)}")
        self.mode = Mode.RETRAIN
        self.dims = self._checked_dims(dims)
        device = self.field_dims.device
        self.keep = {f: keep[f].to(device=device, dtype=torch.bool) for f in self.features}

    def _checked_dims(self, dims: Sequence[int]) -> Tensor:
        d = torch.as_tensor(list(dims), dtype=torch.long, device=self.field_dims.device)
        if d.shape != self.field_dims.shape or bool(((d < 1) | (d > self.field_dims)).any()):
            raise ValueError(
                f"dims must give one dim in 1..D_f per field (D = {self.field_dims.tolist()}), "
                f"got {list(dims)}"
            )
        return d

    def forward(
        self, rows: Mapping[str, JaggedTensor], single: KeyedTensor | None = None
    ) -> KeyedTensor:
        """Masked, pooled [B, D_f] per feature, in `features` order.

        `rows` maps features to their looked-up rows (other keys are ignored), except those
        in `single`. Features with exactly one row per sample are masked together as one
        [B, F, D] block (pooling is the identity for them), the others feature by feature.
        `single` optionally gives features with at most one ID per sample as a pooled
        lookup's output (an `EmbeddingBagCollection`'s, one width): its [B, F * D] values
        are that block as they are, with no copy in or out. It cannot serve retrain mode,
        which reads row IDs (use `single_rows`).
        """
        single_keys = single.keys() if single is not None else []
        in_single = set(single_keys)
        if len(in_single) < len(single_keys) or in_single - set(self.features):
            raise ValueError(f"single must hold distinct features of {self.features}")
        # Only indexed: a sharded collection's output is a lazy mapping without iteration.
        try:
            rows = {f: rows[f] for f in self.features if f not in in_single}
        except KeyError as e:
            raise ValueError(f"no rows for feature {e}") from e
        if single is not None:
            batch_size = single.values().size(0)
        else:
            batch_size = rows[self.features[0]].lengths().numel()
        if self.mode is Mode.SUPERNET:
            dims = sample_dims(batch_size, self.field_dims, self.generator)  # [B, fields]
        else:
            dims = self.dims.unsqueeze(0)  # [1, fields]: the same for every sample
        self.last_dims = dims  # for terms added to the output outside (their dim masks)
        pieces: list[tuple[list[str], Tensor]] = []  # (features, [B, their widths summed])
        if single is not None:
            pieces += self._single_block(single, dims)
        by_width: dict[int, list[str]] = {}  # one-row-per-sample features in `rows`
        for feature, jt in rows.items():
            width = self.feature_dims[self._position[feature]]
            if jt.values().size(-1) != width:
                raise ValueError(
                    f"feature {feature!r}: rows are {jt.values().size(-1)} wide, "
                    f"its field's dim is {width}"
                )
            if jt.values().size(0) == batch_size and bool((jt.lengths() == 1).all()):
                by_width.setdefault(width, []).append(feature)
            else:
                pieces.append(([feature], self._pool_jagged(feature, jt, dims)))
        for group in by_width.values():
            x = torch.stack([rows[f].values() for f in group], dim=1)  # [B, F, D]
            kept = None
            if self.mode is Mode.RETRAIN:
                kept = torch.stack([self._kept(f, rows[f]) for f in group], dim=1)
            pieces += self._in_order(group, self._mask_block(group, x, dims, kept))
        pieces.sort(key=lambda piece: self._position[piece[0][0]])
        values = pieces[0][1] if len(pieces) == 1 else torch.cat([p for _, p in pieces], dim=1)
        return KeyedTensor(keys=self.features, length_per_key=self.feature_dims, values=values)

    def _single_block(self, single: KeyedTensor, dims: Tensor) -> list[tuple[list[str], Tensor]]:
        """The masked block of `single`, read as [B, F, D] in place."""
        if self.mode is Mode.RETRAIN:
            raise ValueError("retrain mode needs row IDs: pass single_rows(..., with_ids=True)")
        group = single.keys()
        widths = {self.feature_dims[self._position[f]] for f in group}
        if len(widths) != 1 or single.length_per_key() != [widths.pop()] * len(group):
            raise ValueError("single needs features of one width, equal to their fields' dims")
        x = single.values().view(single.values().size(0), len(group), -1)
        return self._in_order(group, self._mask_block(group, x, dims, None))

    def _in_order(self, group: list[str], block: Tensor) -> list[tuple[list[str], Tensor]]:
        """A masked [B, F, D] block as output pieces: whole when its features follow each
        other in `features` (no copy), else one per feature."""
        start = self._position[group[0]]
        if self.features[start : start + len(group)] == group:
            return [(group, block.flatten(1))]
        return [([f], part) for f, part in zip(group, block.unbind(1), strict=True)]

    def _mask_block(self, group: list[str], x: Tensor, dims: Tensor, kept: Tensor | None) -> Tensor:
        """[B, F, D] masked rows of features with one row per sample; `kept` [B, F] is the
        retrain mode's fixed row mask."""
        fields = torch.tensor([self.fields[self._position[f]] for f in group])
        fields = fields.to(dims.device)
        if kept is None and self.norm == 1:
            chosen = dims[:, fields]
            if optembed_fused.usable(x, chosen):
                return optembed_fused.masked_block(x, self.thresholds.threshold[fields], chosen)
        width = x.size(-1)
        table = self.get_buffer(f"prefix_{width}")
        columns = table.index_select(0, (dims[:, fields] - 1).flatten())
        columns = columns.view(dims.size(0), len(group), width)
        if kept is not None:
            return x * (columns * kept.unsqueeze(-1))
        if self.norm != 1:
            m = row_mask(row_norms(x, self.norm) - self.thresholds.threshold[fields])
            return x * m.unsqueeze(-1) * columns
        return _L1MaskedBlock.apply(x, self.thresholds.threshold[fields], columns)

    def _pool_jagged(self, feature: str, jt: JaggedTensor, dims: Tensor) -> Tensor:
        """[B, D] masked pool of one feature's jagged rows."""
        field, values = self.fields[self._position[feature]], jt.values()
        if self.mode is Mode.RETRAIN:
            m = self._kept(feature, jt).to(values.dtype)
        else:
            m = row_mask(row_norms(values, self.norm) - self.thresholds.threshold[field])
        out = _masked_sum(values, jt.lengths(), m)
        if feature in self.mean_features:  # pruned rows count: they read zeros
            out = out / jt.lengths().clamp(min=1).unsqueeze(1).to(out.dtype)
        table = self.get_buffer(f"prefix_{values.size(-1)}")
        return out * table.index_select(0, dims[:, field] - 1)

    def column_mask(self, feature: str) -> Tensor:
        """Float [B or 1, D_f]: the columns of `feature` that the last forward kept."""
        if self.last_dims is None:
            raise ValueError("no forward yet: its dims are not drawn")
        field = self.fields[self._position[feature]]
        table = self.get_buffer(f"prefix_{self.feature_dims[self._position[feature]]}")
        return table.index_select(0, self.last_dims[:, field] - 1)

    def _kept(self, feature: str, jt: JaggedTensor) -> Tensor:
        """Bool [N]: the fixed retrain mask of the looked-up rows, by row ID."""
        ids = jt.weights_or_none()
        if ids is None:
            raise ValueError(
                "retrain mode needs the row IDs: build the EmbeddingCollection with "
                "need_indices=True (they come back as the rows' weights())"
            )
        return self.keep[feature][ids.long()]


class _L1MaskedBlock(torch.autograd.Function):
    """`x * step(||x||_1 - t) * columns` over a [B, F, D] block, forward and backward fused
    by hand: the same values and gradients as composing `row_mask`, in about half the
    memory passes (on CPU these elementwise passes are the cost of the masks)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: Tensor, threshold: Tensor, columns: Tensor
    ) -> Tensor:
        z = x.abs().sum(-1) - threshold  # [B, F]
        keep = (z > 0).unsqueeze(-1)
        out = x * columns
        out.mul_(keep)
        ctx.save_for_backward(x, columns, z, keep)
        return out

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor, Tensor, None]:
        x, columns, z, keep = ctx.saved_tensors  # type: ignore[attr-defined]
        grad_x = grad * columns
        # d out / d mask = <grad * columns, x>; through the estimator to z = ||x||_1 - t.
        grad_z = (grad_x * x).sum(-1) * step_surrogate_grad(z)
        grad_x.mul_(keep)
        grad_x.addcmul_(x.sign(), grad_z.unsqueeze(-1))  # d||x||_1 / dx = sign(x)
        return grad_x, -grad_z.sum(0), None


def _masked_sum(values: Tensor, lengths: Tensor, mask: Tensor) -> Tensor:
    """Sum of `mask_i * values_i` over each sample's rows: [N, D] -> [B, D].

    `embedding_bag` with per-row weights is one fused gather-scale-sum over the jagged
    segments, forward and backward (an `index_add_` segment sum is several times slower
    on CPU).
    """
    lengths = lengths.long()
    offsets = lengths.cumsum(0) - lengths
    positions = torch.arange(values.size(0), device=values.device)
    return F.embedding_bag(positions, values, offsets, mode="sum", per_sample_weights=mask)


# Rows from pooled lookups. On CPU, fbgemm's unpooled (`EmbeddingCollection`) backward with a
# fused optimizer accumulates gradients in per-ID hash maps and runs several times slower
# than its pooled (`EmbeddingBagCollection`) backward over the same IDs. A pooled lookup
# whose bags hold one ID each returns the unpooled rows through the fast kernels; these
# adapters build such inputs and read the rows back as `OptEmbedPooling` expects them.


def one_bag_per_id(features: KeyedJaggedTensor, stride: int | None = None) -> KeyedJaggedTensor:
    """The same IDs, each in its own bag: every key gets `stride` bags (by default the most
    IDs any key has in this batch), its IDs in the first bags and empty bags after them.

    A sharded lookup needs one stride on every rank: pass the ranks' largest."""
    counts = torch.tensor(features.length_per_key(), device=features.values().device)
    most = int(counts.max()) if counts.numel() else 0
    if stride is None:
        stride = most
    elif stride < most:
        raise ValueError(f"stride {stride} is below the {most} IDs of a key")
    lengths = torch.arange(stride, device=counts.device) < counts.unsqueeze(1)
    return KeyedJaggedTensor(
        keys=features.keys(),
        values=features.values(),
        lengths=lengths.flatten().to(features.lengths().dtype),
        stride=stride,
    )


def bag_rows(
    pooled: KeyedTensor, features: KeyedJaggedTensor, with_ids: bool = False
) -> dict[str, JaggedTensor]:
    """Rows of a pooled lookup of `one_bag_per_id(features)`, jagged as in `features`.

    `with_ids` puts the row IDs in `weights()` (what retrain mode reads).
    """
    rows = {}
    by_key = _split_keys(pooled)
    for key, jt in features.to_dict().items():
        values = by_key[key][: jt.values().numel()]
        rows[key] = JaggedTensor(
            values=values, lengths=jt.lengths(), weights=jt.values() if with_ids else None
        )
    return rows


def single_rows(
    pooled: KeyedTensor, features: KeyedJaggedTensor, with_ids: bool = False
) -> dict[str, JaggedTensor]:
    """Rows of an ordinary pooled lookup of features with at most one ID per sample.

    Such a pooled vector is the sample's row (zeros for an empty sample, which masking and
    pooling leave at zero with zero gradient), so each sample gets exactly one row and the
    whole block is masked at once. An empty sample's ID reads as 0 in `weights()`.
    """
    rows = {}
    by_key = _split_keys(pooled)
    for key, jt in features.to_dict().items():
        lengths = jt.lengths()
        if bool((lengths > 1).any()):
            raise ValueError(f"feature {key!r} has samples with more than one ID")
        ids = None
        if with_ids:
            ids = torch.zeros(lengths.numel(), dtype=jt.values().dtype, device=lengths.device)
            ids[lengths == 1] = jt.values()
        rows[key] = JaggedTensor(values=by_key[key], lengths=torch.ones_like(lengths), weights=ids)
    return rows


def _split_keys(pooled: KeyedTensor) -> dict[str, Tensor]:
    """Per-key columns as one split, whose backward is one concatenation. (`pooled[key]`
    slices, and each slice's backward writes a zero-filled gradient of the whole output.)"""
    parts = pooled.values().split(pooled.length_per_key(), dim=pooled.key_dim())
    return dict(zip(pooled.keys(), parts, strict=True))
