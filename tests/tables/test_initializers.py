"""Table init: every variant's rows start from the configured distribution, per seed.

Statistics are checked against the distribution within 5 standard errors of the sample
(mean, and variance: sd of the sample variance is sigma^2 sqrt(2/n) for a normal,
b^2 sqrt(4/(45 n)) for U(-b, b)); the draws are fixed by the seed, so nothing is flaky.
The sharded tables' rows (every sharding type) equal these: tests/tables/test_sharding.py.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pipelines.build import build_model
from recsys.config import config_from_dict
from tables.initializers import BLOCK_ROWS, RowInit
from tests.tables.test_sequence_tables import CATEGORIES, seq_doc

DIM = 16
SMALL, LARGE = 3, 20_000  # gender-sized (3 rows: 2 IDs and the OOV row), item-sized


def _doc(init: Any = None, seed: int = 0, **table: Any) -> dict[str, Any]:
    """`g` a full table of 3 rows, `big` a hash table of LARGE rows, both with `init`."""
    extra = {} if init is None else {"init": init}
    return {
        "name": "init",
        "features": {"sparse": ["g", "big"]},
        "tables": [
            {"features": ["g"], "embedding_dim": DIM, **extra},
            {"features": ["big"], "variant": "hash", "num_embeddings": LARGE}
            | {"embedding_dim": DIM, **extra, **table},
        ],
        "model": {"name": "deepfm"},
        "train": {"seed": seed},
    }


def _tables(doc: dict[str, Any], vocabularies: dict[str, np.ndarray] | None = None):
    """Physical table name -> its initial weights, unsharded on the CPU."""
    cfg = config_from_dict(doc)
    model = build_model(cfg, {"g": np.array([1, 2])} if vocabularies is None else vocabularies)
    return {
        key.split(".")[-2]: value
        for key, value in model.state_dict().items()
        if key.endswith(".weight") and (".embedding_bags." in key or ".embeddings." in key)
    }


def assert_drawn_from(values: torch.Tensor, distribution: str, scale: float) -> None:
    """`values` are a sample of N(0, scale^2) or U(-scale, scale), within 5 standard errors."""
    x = values.double().flatten()
    n = x.numel()
    if distribution == "normal":
        var, var_se = scale**2, scale**2 * math.sqrt(2 / n)
    else:
        var, var_se = scale**2 / 3, scale**2 * math.sqrt(4 / (45 * n))
        assert x.abs().max() <= scale
    assert abs(x.mean()) <= 5 * math.sqrt(var / n), (x.mean(), var, n)
    assert abs(x.var() - var) <= 5 * var_se, (x.var(), var, n)


def test_default_is_normal_1e_4_whatever_the_table_size() -> None:
    tables = _tables(_doc())
    assert tables["g"].shape == (SMALL, DIM) and tables["big"].shape == (LARGE, DIM)
    for weight in tables.values():
        assert_drawn_from(weight, "normal", 1e-4)


@pytest.mark.parametrize(
    ("init", "distribution", "scale"),
    [
        ({"std": 0.01}, "normal", {"g": 0.01, "big": 0.01}),
        ({"distribution": "uniform", "bound": 0.05}, "uniform", {"g": 0.05, "big": 0.05}),
        # torchrec's default: sqrt(1 / rows), 0.58 for 3 rows
        ("uniform", "uniform", {"g": math.sqrt(1 / SMALL), "big": math.sqrt(1 / LARGE)}),
    ],
)
def test_small_and_large_tables_follow_the_configured_init(
    init: Any, distribution: str, scale: dict[str, float]
) -> None:
    for name, weight in _tables(_doc(init)).items():
        assert_drawn_from(weight, distribution, scale[name])


def test_init_is_deterministic_per_seed_and_table() -> None:
    first, again, other = (_tables(_doc(seed=s)) for s in (3, 3, 4))
    for name in first:
        assert torch.equal(first[name], again[name])
        assert not torch.equal(first[name], other[name])
    # two tables of one run draw apart, even of the same size
    twin = _doc(seed=3)
    twin["tables"][0] = {"features": ["g"], "variant": "hash", "num_embeddings": LARGE}
    twin["tables"][0]["embedding_dim"] = DIM
    tables = _tables(twin)
    assert not torch.equal(tables["g"], tables["big"])


def test_blocks_of_a_shard_are_the_tables_own_rows() -> None:
    init = RowInit("normal", 0.1, seed=5)
    rows = 2 * BLOCK_ROWS + 7
    table = torch.empty(rows, DIM)
    init(table)
    for first_row, first_col, n, cols in [(0, 0, 1, DIM), (BLOCK_ROWS - 3, 4, 9, 8), (9, 12, 5, 4)]:
        shard = torch.empty(n, cols)
        init.fill(shard, first_row, first_col, DIM)
        assert torch.equal(shard, table[first_row : first_row + n, first_col : first_col + cols])
    assert_drawn_from(table, "normal", 0.1)


@pytest.mark.parametrize(
    "table",
    [
        {"variant": "multiplexed", "name": "mx", "features": ["g", "big"], "probes": 2},
        {"variant": "qr", "features": ["big"]},
        {"variant": "optembed", "storage": "hash", "features": ["g", "big"]},
        {"variant": "optembed", "storage": "full", "features": ["g", "big"]},
    ],
    ids=lambda t: f"{t['variant']}-{t.get('storage', '')}",
)
def test_every_variant_draws_its_tables_from_its_init(table: dict[str, Any]) -> None:
    doc = _doc({"std": 0.01})
    big = {k: v for k, v in doc["tables"][1].items() if k not in ("features", "variant")}
    if table["variant"] == "qr":
        doc["tables"][1] = big | table
    else:
        doc["tables"] = [big | table]
        if table.get("storage") == "full":
            del doc["tables"][0]["num_embeddings"]
    vocabularies = {"g": np.array([1, 2]), "big": np.arange(LARGE - 1)}
    tables = _tables(doc, vocabularies)
    expected = {"qr": ["big@q", "big@r"], "multiplexed": ["mx"]}.get(table["variant"])
    assert expected is None or set(expected) <= set(tables)
    for weight in tables.values():
        assert_drawn_from(weight, "normal", 0.01)


@pytest.mark.parametrize("decoupled", [False, True])
def test_sequence_tables_follow_the_configured_init(decoupled: bool) -> None:
    doc = seq_doc("dare" if decoupled else "twin", decoupled)
    for table in doc["tables"]:
        table["init"] = {"distribution": "uniform", "bound": 0.03}
    tables = _tables(doc, {"category": CATEGORIES})
    roles = ["item@att", "item@rep", "item@time@att"] if decoupled else ["item", "item@time"]
    assert set(roles) <= set(tables)
    for weight in tables.values():
        assert_drawn_from(weight, "uniform", 0.03)


def _collisionless(std: float, seed: int) -> Any:
    doc = _doc(seed=seed)
    doc["tables"] = [
        {"features": ["g", "big"], "variant": "collisionless", "capacity": 4 * LARGE}
        | {"embedding_dim": DIM, "init": {"std": std}}
    ]
    return build_model(config_from_dict(doc), {}).sparse


def test_collisionless_rows_start_from_the_init_when_given_out() -> None:
    sparse = _collisionless(0.02, seed=1)
    ids = torch.arange(LARGE, dtype=torch.int64) * 7919
    features = KeyedJaggedTensor(
        keys=["g", "big"],
        values=torch.cat([ids[:2], ids]),  # g: 2 IDs of the batch, big: all
        lengths=(torch.arange(2 * LARGE) >= 2).logical_xor(torch.arange(2 * LARGE) < LARGE).int(),
    )
    sparse(features, torch.zeros(LARGE, dtype=torch.int64))
    transform = sparse.transforms["big"]
    live, rows = transform.live_rows()
    weight = sparse.ebc.embedding_bags["big"].weight.detach()
    assert live.numel() == LARGE
    assert torch.equal(weight[rows], transform.row_init.rows_of(live, DIM))
    assert_drawn_from(weight[rows], "normal", 0.02)
    again = _collisionless(0.02, seed=1).transforms["big"].row_init.rows_of(live, DIM)
    other = _collisionless(0.02, seed=2).transforms["big"].row_init.rows_of(live, DIM)
    assert torch.equal(again, weight[rows]) and not torch.equal(other, weight[rows])
    uniform = RowInit("uniform", 0.5, seed=9).rows_of(live, DIM)
    assert_drawn_from(uniform, "uniform", 0.5)
