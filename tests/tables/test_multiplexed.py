"""Multiplexed and quotient-remainder ID transforms: hashing, expansion, torchrec lookups."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.hashing import bucket, derive_salt, mix64, mix64_int, to_int64
from tables.multiplexed import (
    MultiplexedTransform,
    QuotientRemainderTransform,
    hashed_table_rows,
    quotient_remainder_sizes,
    shared_table_rows,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
EDGE_IDS = [0, 1, -1, 42, INT64_MAX, INT64_MIN]
GOLDEN = 0x9E3779B97F4A7C15


def kjt(columns: dict[str, list[list[int]]]) -> KeyedJaggedTensor:
    """Key-major KJT from per-feature lists of bags (one bag per sample)."""
    values = [x for bags in columns.values() for bag in bags for x in bag]
    lengths = [len(bag) for bags in columns.values() for bag in bags]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(columns),
        values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int64),
    )


def rows_by_key(features: KeyedJaggedTensor) -> dict[str, list[int]]:
    return {k: jt.values().tolist() for k, jt in features.to_dict().items()}


def reference_row(x: int, salt: int, num_rows: int) -> int:
    """The row from the pure-Python hash, independent of the tensor code path."""
    return to_int64(mix64_int(x ^ salt)) % num_rows


def test_mixer_is_splitmix64_bit_for_bit() -> None:
    # The first three outputs of the published splitmix64 generator seeded with 0.
    expected = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    states = torch.tensor([to_int64(i * GOLDEN) for i in (1, 2, 3)])
    assert mix64(states).tolist() == [to_int64(e) for e in expected]

    generator = torch.Generator().manual_seed(0)
    ids = torch.cat(
        [
            torch.tensor(EDGE_IDS),
            torch.randint(INT64_MIN, INT64_MAX, (4096,), generator=generator),
        ]
    )
    assert mix64(ids).tolist() == [to_int64(mix64_int(x)) for x in ids.tolist()]


def test_salts_and_rows_are_pinned() -> None:
    """Hard-coded values: changing the hash or the salt derivation moves every row."""
    assert [derive_salt(3, 0), derive_salt(3, 1), derive_salt(7, 0), derive_salt(3, 0, 1)] == [
        1576197287663575836,
        2957638021935652901,
        381878138362221905,
        1472571583528600609,
    ]
    t = MultiplexedTransform(["a", "b"], [2, 1], [3, 7], num_rows=1_000_003)
    rows = rows_by_key(t.expand(kjt({"a": [EDGE_IDS], "b": [EDGE_IDS]})))
    assert rows == {
        "a@0": [558121, 874891, 955725, 476979, 641398, 574427],
        "a@1": [903768, 317192, 263872, 475168, 271756, 85145],
        "b@0": [635531, 680710, 379669, 174442, 904281, 990328],
    }


def test_rows_are_stable_across_processes(repo: Path) -> None:
    script = textwrap.dedent(
        f"""
        import json, torch
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        from tables.multiplexed import MultiplexedTransform
        ids = torch.tensor({EDGE_IDS} * 2)
        t = MultiplexedTransform(["a", "b"], [3, 2], [5, 9], num_rows=7919, seed=11)
        f = KeyedJaggedTensor.from_lengths_sync(["a", "b"], ids, torch.tensor([6, 6]))
        print(json.dumps({{k: v.values().tolist() for k, v in t.expand(f).to_dict().items()}}))
        """
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(repo)}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=repo, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    t = MultiplexedTransform(["a", "b"], [3, 2], [5, 9], num_rows=7919, seed=11)
    here = rows_by_key(t.expand(kjt({"a": [EDGE_IDS], "b": [EDGE_IDS]})))
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


def test_rows_lie_in_range_and_match_the_python_hash() -> None:
    generator = torch.Generator().manual_seed(1)
    ids = [*EDGE_IDS, *torch.randint(INT64_MIN, INT64_MAX, (2000,), generator=generator).tolist()]
    t = MultiplexedTransform(["f"], [4], [2], num_rows=97)
    rows = rows_by_key(t.expand(kjt({"f": [ids]})))
    for j in range(4):
        salt = derive_salt(2, j)
        assert rows[f"f@{j}"] == [reference_row(x, salt, 97) for x in ids]
        assert all(0 <= r < 97 for r in rows[f"f@{j}"])


def test_features_and_probes_read_unrelated_rows() -> None:
    """Equal values collide across features or probes only at the chance rate 1/M."""
    values = list(range(-5000, 5000))
    big = MultiplexedTransform(["a", "b"], [3, 3], [0, 1], num_rows=1 << 24)
    rows = rows_by_key(big.expand(kjt({"a": [values], "b": [values]})))
    pairs = [(f"a@{i}", f"b@{j}") for i in range(3) for j in range(3)]
    pairs += [(f"{f}@{i}", f"{f}@{j}") for f in "ab" for i in range(3) for j in range(i)]
    for u, v in pairs:
        same = sum(x == y for x, y in zip(rows[u], rows[v], strict=True))
        assert same <= 2, (u, v, same)  # expected 10_000 / 2**24 = 0.0006

    m = 101
    small = MultiplexedTransform(["a", "b"], [2, 1], [0, 1], num_rows=m)
    rows = rows_by_key(small.expand(kjt({"a": [values], "b": [values]})))
    for u, v in [("a@0", "b@0"), ("a@1", "b@0"), ("a@0", "a@1")]:
        rate = sum(x == y for x, y in zip(rows[u], rows[v], strict=True)) / len(values)
        assert abs(rate - 1 / m) < 4 * math.sqrt(1 / m / len(values)), (u, v, rate)


def test_bags_keep_lengths_order_and_weights() -> None:
    bags = {"b": [[7, 8, 9], [], [INT64_MIN]], "a": [[], [1, -1], [5]]}
    features = kjt(bags)
    weights = torch.arange(features.values().numel(), dtype=torch.float32)
    features = KeyedJaggedTensor.from_lengths_sync(
        features.keys(), features.values(), features.lengths(), weights=weights
    )
    t = MultiplexedTransform(["a", "b", "c"], [2, 3, 1], [0, 1, 2], num_rows=1000)
    out = t.expand(features)
    assert out.keys() == ["b@0", "b@1", "b@2", "a@0", "a@1"]
    assert out.stride() == 3
    by_key = out.to_dict()
    weights_of = {"b": weights[:4].tolist(), "a": weights[4:].tolist()}
    for f, index in (("a", 0), ("b", 1)):
        flat = [x for bag in bags[f] for x in bag]
        for j, v in enumerate(t.virtual_features(f)):
            assert by_key[v].lengths().tolist() == [len(bag) for bag in bags[f]]
            assert by_key[v].values().tolist() == [
                reference_row(x, derive_salt(index, j), 1000) for x in flat
            ]
            assert by_key[v].weights().tolist() == weights_of[f]
    with pytest.raises(KeyError):
        t.expand(kjt({"z": [[1]]}))


def test_state_dict_carries_salts_and_size() -> None:
    trained = MultiplexedTransform(["a"], [2], [4], num_rows=500, seed=1)
    serving = MultiplexedTransform(["a"], [2], [4], num_rows=500, seed=2)
    features = kjt({"a": [EDGE_IDS]})
    assert rows_by_key(serving.expand(features)) != rows_by_key(trained.expand(features))
    serving.load_state_dict(trained.state_dict())
    assert rows_by_key(serving.expand(features)) == rows_by_key(trained.expand(features))


def test_end_to_end_with_a_shared_embedding_bag_collection() -> None:
    num_rows, dim = 257, 4
    t = MultiplexedTransform(["a", "b"], [3, 2], [0, 1], num_rows=num_rows)
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name="shared",
                embedding_dim=dim,
                num_embeddings=num_rows,
                feature_names=t.virtual_feature_names,
                pooling=PoolingType.SUM,
            )
        ],
        device=torch.device("cpu"),
    )
    bags = {"a": [[3, 3, 10], [], [INT64_MAX]], "b": [[3], [-7, 0], [1, 2, 3, 4]]}
    out = t.combine(ebc(t.expand(kjt(bags))).to_dict())
    table = ebc.embedding_bags["shared"].weight.detach()
    for index, f in enumerate(["a", "b"]):
        probes = len(t.virtual_features(f))
        assert out[f].shape == (3, probes * dim)
        for sample, bag in enumerate(bags[f]):
            expected = torch.cat(
                [
                    sum(
                        (table[reference_row(x, derive_salt(index, j), num_rows)] for x in bag),
                        torch.zeros(dim),
                    )
                    for j in range(probes)
                ]
            )
            torch.testing.assert_close(out[f][sample], expected)


def test_quotient_remainder_end_to_end() -> None:
    dim = 3
    t = QuotientRemainderTransform(["a", "b"], [0, 1], hash_sizes=[100, 50], remainder_rows=[10, 7])
    assert t.table_rows() == {"a@q": 10, "a@r": 10, "b@q": 8, "b@r": 7}
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name=v, embedding_dim=dim, num_embeddings=n, feature_names=[v])
            for v, n in t.table_rows().items()
        ],
        device=torch.device("cpu"),
    )
    bags = {"a": [[1, 2], [INT64_MIN], []], "b": [[5, 5, 6], [], [-3]]}
    out = t.combine(ebc(t.expand(kjt(bags))).to_dict())
    for index, (f, size, m) in enumerate([("a", 100, 10), ("b", 50, 7)]):
        q_table = ebc.embedding_bags[f"{f}@q"].weight.detach()
        r_table = ebc.embedding_bags[f"{f}@r"].weight.detach()
        for sample, bag in enumerate(bags[f]):
            hashed = [reference_row(x, derive_salt(index, 0), size) for x in bag]
            expected = torch.cat(
                [
                    sum((q_table[h // m] for h in hashed), torch.zeros(dim)),
                    sum((r_table[h % m] for h in hashed), torch.zeros(dim)),
                ]
            )
            torch.testing.assert_close(out[f][sample], expected)


def test_quotient_remainder_pairs_are_distinct() -> None:
    t = QuotientRemainderTransform(["f"], [0], hash_sizes=[1000], remainder_rows=[31])
    ids = list(range(-3000, 3000))
    rows = rows_by_key(t.expand(kjt({"f": [ids]})))
    hashed = bucket(torch.tensor(ids), derive_salt(0, 0), 1000).tolist()
    assert [q * 31 + r for q, r in zip(rows["f@q"], rows["f@r"], strict=True)] == hashed
    assert max(rows["f@q"]) < math.ceil(1000 / 31) and max(rows["f@r"]) < 31


def test_budget_helpers_stay_within_budget() -> None:
    assert shared_table_rows(10_000, dim=16) == 625
    assert shared_table_rows(10_000, dim=16, num_tables=3) * 16 * 3 <= 10_000
    with pytest.raises(ValueError):
        shared_table_rows(15, dim=16)

    generator = torch.Generator().manual_seed(3)
    for _ in range(50):
        n = int(torch.randint(1, 12, (1,), generator=generator))
        cards = torch.randint(1, 100_000, (n,), generator=generator).tolist()
        cards[0] = 1  # a tiny feature is pinned at one row
        dim_list = torch.randint(1, 33, (n,), generator=generator).tolist()
        names = [f"f{i}" for i in range(n)]
        cardinalities = dict(zip(names, cards, strict=True))
        dims = dict(zip(names, dim_list, strict=True))
        full = sum(c * d for c, d in zip(cards, dim_list, strict=True))
        budget = max(sum(dim_list), full // int(torch.randint(4, 100, (1,), generator=generator)))
        rows = hashed_table_rows(budget, cardinalities, dims)
        used = sum(rows[f] * dims[f] for f in names)
        assert used <= budget and min(rows.values()) >= 1
        assert budget - used < max(dim_list) * n  # rounding loses less than a row each
        split = [f for f in names if rows[f] > 1]  # not pinned: one rate, up to rounding
        for f, g in pairwise(split):
            drift = abs(rows[f] * cardinalities[g] - rows[g] * cardinalities[f])
            assert drift <= cardinalities[f] + cardinalities[g], (f, g)
    rows = hashed_table_rows(4 * 1100, {"x": 1000, "y": 100, "z": 1}, dict.fromkeys("xyz", 4))
    assert rows == {"x": 999, "y": 100, "z": 1}
    with pytest.raises(ValueError):
        hashed_table_rows(7, {"x": 10, "y": 10}, {"x": 4, "y": 4})

    for total in (2, 3, 10, 1001):
        size, m = quotient_remainder_sizes(total)
        assert math.ceil(size / m) + m == total
