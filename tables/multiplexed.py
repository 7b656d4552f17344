"""Feature multiplexing (Unified Embedding) and the quotient-remainder baseline, ID side.

Both turn a feature into several *virtual features* whose rows a torchrec
`EmbeddingBagCollection` looks up and pools like any other feature, so sharding, fused
optimizers and checkpoints stay torchrec's. The feature's embedding is the concatenation of
its virtual features' pooled outputs (`combine`). Pooling is linear, so pooling each
virtual feature over the bag and then concatenating equals pooling the concatenated rows:
bags need nothing special, and a mean is the concatenation divided by the bag length.

Salts and sizes live in buffers, so a state dict carries everything that decides a row and
serving reproduces training lookups exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import NamedTuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.hashing import derive_salt, mix64_
from tables.transforms import IdTransform, ServedRows


class HashProbe(NamedTuple):
    """One virtual feature's row, as the export manifest states it for serving.

    row = (bucket(id, salt, hash_size) // divisor) mod rows of the table it reads, where
    `bucket` is `recsys.hashing.bucket`: the salted splitmix64 taken modulo `hash_size`.
    """

    salt: int
    hash_size: int
    divisor: int


class VirtualFeatureTransform(IdTransform):
    """Raw IDs of feature f -> rows for each of f's virtual features, in bulk tensor ops.

    Subclasses name the virtual features, give each a salt and turn its salted 64-bit
    hashes into rows (`_rows_`).
    """

    def __init__(
        self, features: Sequence[str], virtual: Sequence[Sequence[str]], salts: Sequence[int]
    ) -> None:
        super().__init__()
        if len(set(features)) != len(features):
            raise ValueError("feature names must be unique")
        self.features = tuple(features)
        self._virtual = {f: tuple(v) for f, v in zip(features, virtual, strict=True)}
        names = self.virtual_feature_names
        if len(set(names)) != len(names):
            raise ValueError(f"virtual feature names collide: {names}")
        if len(salts) != len(names):
            raise ValueError("one salt per virtual feature")
        starts = accumulate((len(v) for v in virtual), initial=0)
        self._first = dict(zip(features, starts, strict=False))  # starts has one more
        self.register_buffer("salts", torch.tensor(list(salts), dtype=torch.int64))

    @property
    def virtual_feature_names(self) -> list[str]:
        """All virtual features, feature by feature in constructor order."""
        return [v for f in self.features for v in self._virtual[f]]

    def virtual_features(self, feature: str) -> list[str]:
        """The virtual features whose pooled outputs, concatenated, embed `feature`."""
        return list(self._virtual[feature])

    def _rows_(self, hashed: torch.Tensor, spans: list[tuple[int, int, int]]) -> None:
        """In place: salted hashes -> rows; `spans` holds (virtual feature, start, end)."""
        raise NotImplementedError

    def hash_probes(self) -> dict[str, HashProbe]:
        """Every virtual feature's lookup in the terms of the export format (`HashProbe`)."""
        raise NotImplementedError

    def served_rows(self, table: str, weights: torch.Tensor) -> ServedRows:
        """Every row; a reader recomputes each probe's row with `hash_probes`."""
        return ServedRows.every_row(weights, "hash")

    def expand(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """Raw IDs keyed by feature -> rows keyed by virtual feature.

        `features` may hold any subset of this transform's features, in any order; the
        output lists each input key's virtual features in its place. Every virtual feature
        of f repeats f's lengths (and weights), so bags keep their sizes. The IDs are
        salted with one op per virtual feature straight into the output, then hashed and
        mapped to rows in place: no per-value salt or index tensors.
        """
        keys = features.keys()
        unknown = [k for k in keys if k not in self._virtual]
        if unknown:
            raise KeyError(f"not features of this transform: {unknown}")
        if features.variable_stride_per_key():
            raise ValueError("variable batch size per feature is not supported")
        offsets = features.offset_per_key()
        # (input key, virtual feature) of every output segment, in output order.
        segments = [
            (i, self._first[key] + j)
            for i, key in enumerate(keys)
            for j in range(len(self._virtual[key]))
        ]
        seg_len = [offsets[i + 1] - offsets[i] for i, _ in segments]
        out_offsets = list(accumulate(seg_len, initial=0))
        values = features.values().to(torch.int64)
        rows = torch.empty(out_offsets[-1], dtype=torch.int64, device=values.device)
        spans = []
        for (i, v), start, end in zip(segments, out_offsets, out_offsets[1:], strict=False):
            torch.bitwise_xor(
                values[offsets[i] : offsets[i + 1]], self.salts[v], out=rows[start:end]
            )
            spans.append((v, start, end))
        mix64_(rows)
        self._rows_(rows, spans)

        lengths = features.lengths().view(len(keys), features.stride())
        weights = features.weights_or_none()
        if weights is not None:
            weights = torch.cat([weights[offsets[i] : offsets[i + 1]] for i, _ in segments])
        return KeyedJaggedTensor(
            keys=[v for k in keys for v in self._virtual[k]],
            values=rows,
            weights=weights,
            lengths=torch.cat([lengths[i] for i, _ in segments]),
            stride=features.stride(),
            length_per_key=seg_len,
            offset_per_key=out_offsets,
        )

    def combine(self, pooled: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pooled outputs by virtual feature -> each feature's concatenated embedding."""
        return {
            f: torch.cat([pooled[v] for v in self._virtual[f]], dim=1)
            for f in self.features
            if self._virtual[f][0] in pooled
        }


class MultiplexedTransform(VirtualFeatureTransform):
    """Feature multiplexing: feature f makes k_f probes into one shared table of M rows.

    Probe j of f reads row h_{f,j}(x) mod M, named `f@j`, with the salt of
    (feature index, j). Because every (feature, probe) has its own hash, equal values of
    different features, and the probes of one value, land on unrelated rows, so
    collisions spread over features instead of piling up inside one.

    `feature_indices` should be stable ids (e.g. positions in the config's feature list),
    so adding a feature to the group leaves the rows of the others where they were.
    """

    def __init__(
        self,
        features: Sequence[str],
        probes: Sequence[int],
        feature_indices: Sequence[int],
        num_rows: int,
        seed: int = 0,
    ) -> None:
        if any(k < 1 for k in probes):
            raise ValueError("every feature needs at least one probe")
        if len(set(feature_indices)) != len(feature_indices):
            raise ValueError("feature indices must be distinct: they decide the salts")
        if num_rows < 1:
            raise ValueError("the shared table needs at least one row")
        virtual = [[f"{f}@{j}" for j in range(k)] for f, k in zip(features, probes, strict=True)]
        salts = [
            derive_salt(index, j, seed)
            for index, k in zip(feature_indices, probes, strict=True)
            for j in range(k)
        ]
        super().__init__(features, virtual, salts)
        self.register_buffer("num_rows", torch.tensor(num_rows, dtype=torch.int64))

    def _rows_(self, hashed: torch.Tensor, spans: list[tuple[int, int, int]]) -> None:
        hashed.remainder_(self.num_rows)

    def table_rows(self) -> dict[str, int]:
        """Rows of the table each virtual feature reads: the one shared table."""
        return dict.fromkeys(self.virtual_feature_names, int(self.num_rows))

    def hash_probes(self) -> dict[str, HashProbe]:
        rows = int(self.num_rows)
        return {
            v: HashProbe(salt, rows, 1)
            for v, salt in zip(self.virtual_feature_names, self.salts.tolist(), strict=True)
        }

    def extra_repr(self) -> str:
        probes = {f: len(v) for f, v in self._virtual.items()}
        return f"num_rows={int(self.num_rows)}, probes={probes}"


class QuotientRemainderTransform(VirtualFeatureTransform):
    """The quotient-remainder trick (Shi et al., KDD 2020) as two virtual features.

    Feature f's value is hashed into [0, V_f), then `f@q` reads row x // m_f of a table of
    ceil(V_f / m_f) rows and `f@r` reads row x mod m_f of a table of m_f rows. Distinct
    hashed values always get distinct (q, r) pairs, so ceil(V/m) + m rows tell V values
    apart. The two embeddings are concatenated, not multiplied elementwise as in the
    paper's best variant: the product of two pooled sums is not the sum of per-value
    products, so only concatenation keeps bags exact with torchrec's pooled lookups, and it
    reuses the multiplexing output path unchanged (at the cost of a 2d-wide output).
    """

    def __init__(
        self,
        features: Sequence[str],
        feature_indices: Sequence[int],
        hash_sizes: Sequence[int],
        remainder_rows: Sequence[int],
        seed: int = 0,
    ) -> None:
        if any(v < 1 for v in hash_sizes) or any(m < 1 for m in remainder_rows):
            raise ValueError("hash sizes and remainder rows must be positive")
        if len(set(feature_indices)) != len(feature_indices):
            raise ValueError("feature indices must be distinct: they decide the salts")
        virtual = [[f"{f}@q", f"{f}@r"] for f in features]
        salts = [derive_salt(index, 0, seed) for index in feature_indices for _ in range(2)]
        super().__init__(features, virtual, salts)
        for name, value in (("hash_sizes", hash_sizes), ("remainder_rows", remainder_rows)):
            self.register_buffer(name, torch.tensor(list(value), dtype=torch.int64))

    def _rows_(self, hashed: torch.Tensor, spans: list[tuple[int, int, int]]) -> None:
        for v, start, end in spans:
            feature, is_remainder = divmod(v, 2)
            part = hashed[start:end].remainder_(self.hash_sizes[feature])
            if is_remainder:
                part.remainder_(self.remainder_rows[feature])
            else:
                part.div_(self.remainder_rows[feature], rounding_mode="floor")

    def table_rows(self) -> dict[str, int]:
        """Rows of each virtual feature's own table: ceil(V/m) for `f@q`, m for `f@r`."""
        pairs = zip(self.hash_sizes.tolist(), self.remainder_rows.tolist(), strict=True)
        rows = [n for v, m in pairs for n in (math.ceil(v / m), m)]
        return dict(zip(self.virtual_feature_names, rows, strict=True))

    def hash_probes(self) -> dict[str, HashProbe]:
        """`f@q` divides the hash by m; `f@r` takes it modulo its table's m rows."""
        sizes = zip(self.hash_sizes.tolist(), self.remainder_rows.tolist(), strict=True)
        divisors = [d for _, m in sizes for d in (m, 1)]
        hash_sizes = [v for v in self.hash_sizes.tolist() for _ in range(2)]
        return {
            name: HashProbe(salt, size, divisor)
            for name, salt, size, divisor in zip(
                self.virtual_feature_names, self.salts.tolist(), hash_sizes, divisors, strict=True
            )
        }


def shared_table_rows(budget: int, dim: int, num_tables: int = 1) -> int:
    """Rows per shared table so that `num_tables` tables of width `dim` fit in `budget`."""
    rows = budget // (dim * num_tables)
    if rows < 1:
        raise ValueError(f"a budget of {budget} parameters cannot hold one row of {dim}")
    return rows


def hashed_table_rows(
    budget: int, cardinalities: Mapping[str, int], dims: Mapping[str, int]
) -> dict[str, int]:
    """Per-feature hashing at a parameter budget: rows in proportion to cardinality.

    This is the paper's non-multiplexed baseline: every feature's rows are the same fraction
    of its vocabulary, each at least one row, and sum(rows * dim) <= budget. Features whose
    share rounds below one row are pinned at one and the rest re-split; the rows lost to
    rounding go back, largest remainder first, while they fit. Rows are not capped at the
    cardinality: above it, extra rows still cut hash collisions.
    """
    if any(v < 1 for v in cardinalities.values()):
        raise ValueError("cardinalities must be positive")
    if budget < sum(dims[f] for f in cardinalities):
        raise ValueError(f"a budget of {budget} parameters cannot give every feature one row")
    pinned: set[str] = set()
    while True:
        free = [f for f in cardinalities if f not in pinned]
        left = budget - sum(dims[f] for f in pinned)
        weight = sum(cardinalities[f] * dims[f] for f in free)
        small = [f for f in free if left * cardinalities[f] < weight]
        if not small:
            break
        pinned.update(small)
    rows = dict.fromkeys(pinned, 1)
    shares = {f: divmod(left * cardinalities[f], weight) for f in free}
    rows.update({f: whole for f, (whole, _) in shares.items()})
    spare = budget - sum(rows[f] * dims[f] for f in rows)
    for f in sorted(free, key=lambda f: shares[f][1], reverse=True):
        if dims[f] <= spare:
            rows[f] += 1
            spare -= dims[f]
    return {f: rows[f] for f in cardinalities}


def quotient_remainder_sizes(rows: int) -> tuple[int, int]:
    """(hash size V, remainder rows m) that use exactly `rows` rows over the two tables.

    V = m * ceil(V/m) is largest for m = rows // 2, so hashing into [0, V) collides least.
    """
    if rows < 2:
        raise ValueError("the quotient-remainder trick needs at least two rows")
    remainder = rows // 2
    return remainder * (rows - remainder), remainder
