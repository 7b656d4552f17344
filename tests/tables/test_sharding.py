"""Sharded tables equal unsharded ones: the plan, the forward pass, and training steps.

One 2-rank gloo job (spawned once per module, since each process pays torchrec's import)
runs every case; each rank compares the sharded model with an unsharded reference built
from the same seed, and the per-case mismatches come back as one pytest test per case.

Gradient semantics the reference mirrors (see tables/sharding.py): every parameter, sharded
table or DDP-replicated, receives the mean over ranks of the per-rank gradients. Each rank's
loss is a sum over its local samples, so the reference's loss is the global-batch sum
divided by the world size.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    DenseTableBatchedEmbeddingBagsCodegen,
)
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    JaggedTensor,
    KeyedJaggedTensor,
    PoolingType,
)
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import (
    EmbeddingModuleShardingPlan,
    ParameterSharding,
    ShardingPlan,
)

from tables import initializers
from tables.initializers import RowInit
from tables.sharding import (
    apply_sparse_optimizer,
    check_plan,
    combined_optimizer,
    dense_parameters,
    make_sharders,
    replicated_table_parameters,
    shard_model,
    sharding_constraints,
    sparse_optimizer_spec,
)
from tests.helpers import gloo_group, spawn_ranks

WORLD_SIZE = 2
GLOBAL_BATCH = 8
LOCAL_BATCH = GLOBAL_BATCH // WORLD_SIZE
STEPS = 2  # the second step checks that optimizer state carried over identically
SEED = 0
SPARSE_LR = 0.1
DENSE_LR = 0.05
ATOL = 1e-5
SPLIT_TYPES = ("row_wise", "column_wise", "table_row_wise")

# Tables drawn by a `RowInit` start sharded as unsharded; the others get torchrec's
# default, which draws per shard (the cases then copy the reference's rows in).
POOLED_TABLES = [
    EmbeddingBagConfig(
        name="t_user",
        embedding_dim=16,
        num_embeddings=64,
        feature_names=["user"],
        init_fn=RowInit("normal", 0.1, seed=7),
    ),
    EmbeddingBagConfig(
        name="t_item",
        embedding_dim=32,
        num_embeddings=100,
        feature_names=["item", "clicked"],
        init_fn=RowInit("uniform", 0.2, seed=8),
    ),
    EmbeddingBagConfig(name="t_cat", embedding_dim=8, num_embeddings=41, feature_names=["cat"]),
    EmbeddingBagConfig(
        name="t_geo",
        embedding_dim=16,
        num_embeddings=50,
        feature_names=["geo"],
        pooling=PoolingType.MEAN,
    ),
]
SEQUENCE_TABLES = [
    EmbeddingConfig(
        name="s_item",
        embedding_dim=16,
        num_embeddings=80,
        feature_names=["hist"],
        init_fn=RowInit("normal", 0.1, seed=9),
    ),
    EmbeddingConfig(name="s_cat", embedding_dim=16, num_embeddings=41, feature_names=["hist_cat"]),
]


# ------------------------------------------------------------------------------ models


class ModuloIds(nn.Module):
    """A parameter-free ID transform in front of the tables, as table variants have."""

    def __init__(self, tables: list[EmbeddingBagConfig]) -> None:
        super().__init__()
        self.keys = [f for t in tables for f in t.feature_names]
        rows = [t.num_embeddings for t in tables for _ in t.feature_names]
        self.register_buffer("rows", torch.tensor(rows))

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = features.keys()
        key_rows = self.rows[[self.keys.index(k) for k in keys]]
        per_value = torch.repeat_interleave(key_rows, torch.tensor(features.length_per_key()))
        return KeyedJaggedTensor(
            keys=keys,
            values=features.values() % per_value,
            lengths=features.lengths(),
        )


class PooledModel(nn.Module):
    """ID transform, EBC, dense head: DMP must shard only the EBC and DDP-wrap the head."""

    def __init__(self) -> None:
        super().__init__()
        self.ids = ModuloIds(POOLED_TABLES)
        self.ebc = EmbeddingBagCollection(tables=POOLED_TABLES)
        self.head = nn.Linear(sum(len(t.feature_names) * t.embedding_dim for t in POOLED_TABLES), 1)

    def forward(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        # By key: a sharded EBC orders its output keys by sharding, not by config.
        embeddings = self.ebc(self.ids(features))
        pooled = torch.cat([embeddings[f] for t in POOLED_TABLES for f in t.feature_names], dim=1)
        return pooled, self.head(pooled)


class SequenceModel(nn.Module):
    """An EC alone: sequence lookups return one jagged embedding list per feature."""

    def __init__(self) -> None:
        super().__init__()
        self.ec = EmbeddingCollection(tables=SEQUENCE_TABLES)

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        return self.ec(features)


# ------------------------------------------------------------------------------ data


@dataclass
class Batch:
    """The global batch as per-feature ID lists per sample; each rank takes a slice."""

    ids: dict[str, list[list[int]]]

    def kjt(self, lo: int, hi: int) -> KeyedJaggedTensor:
        keys = list(self.ids)
        samples = [bag for f in keys for bag in self.ids[f][lo:hi]]
        return KeyedJaggedTensor.from_lengths_sync(
            keys=keys,
            values=torch.tensor([i for bag in samples for i in bag], dtype=torch.int64),
            lengths=torch.tensor([len(bag) for bag in samples], dtype=torch.int32),
        )

    def value_range(self, feature: str, lo: int, hi: int) -> slice:
        """Positions of samples lo..hi in the feature's concatenated values."""
        lengths = [len(bag) for bag in self.ids[feature]]
        return slice(sum(lengths[:lo]), sum(lengths[:hi]))


def _make_batch(tables: list[Any], id_space: int) -> Batch:
    """Multi-valued and empty bags; every feature hits its first, middle and last row.

    IDs are drawn from `id_space` rows' worth of multiples of the table size, so that an ID
    transform taking them modulo the table size lands on the same rows.
    """
    gen = torch.Generator().manual_seed(SEED + 1)
    ids: dict[str, list[list[int]]] = {}
    for table in tables:
        rows = table.num_embeddings
        for feature in table.feature_names:
            lengths = torch.randint(0, 4, (GLOBAL_BATCH,), generator=gen).tolist()
            bags = [
                torch.randint(0, rows * id_space, (n,), generator=gen).tolist() for n in lengths
            ]
            bags[1] = []
            bags[0].append(0)
            bags[-1] += [rows - 1, rows // 2]
            ids[feature] = bags
    return Batch(ids)


def _pooled_loss(
    output: tuple[torch.Tensor, torch.Tensor], _batch: Batch, lo: int, hi: int
) -> torch.Tensor:
    """Sum over samples lo..hi with fixed per-sample weights, so row gradients differ."""
    pooled, logits = output
    gen = torch.Generator().manual_seed(SEED + 2)
    w_pooled = torch.randn(GLOBAL_BATCH, pooled.shape[1], generator=gen)[lo:hi]
    w_logits = torch.randn(GLOBAL_BATCH, 1, generator=gen)[lo:hi]
    return (pooled * w_pooled).sum() + (logits * w_logits).sum()


def _sequence_loss(output: dict[str, JaggedTensor], batch: Batch, lo: int, hi: int) -> torch.Tensor:
    """Sum over the embeddings of samples lo..hi with fixed per-position weights."""
    gen = torch.Generator().manual_seed(SEED + 2)
    dim = SEQUENCE_TABLES[0].embedding_dim
    loss = torch.zeros(())
    for feature, bags in batch.ids.items():
        weights = torch.randn(sum(map(len, bags)), dim, generator=gen)
        loss = loss + (output[feature].values() * weights[batch.value_range(feature, lo, hi)]).sum()
    return loss


def _pooled_outputs(output: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    pooled, logits = output
    return {"pooled": pooled, "logits": logits}


def _sequence_outputs(output: dict[str, JaggedTensor]) -> dict[str, torch.Tensor]:
    return {
        f"{f}.{part}": t
        for f, jt in output.items()
        for part, t in (("values", jt.values()), ("lengths", jt.lengths()))
    }


@dataclass(frozen=True)
class Kind:
    """A model family under test: how to build it, feed it, score it and read its output."""

    build: Callable[[], nn.Module]
    tables: list[Any]
    table_module: str  # FQN of its EBC / EC, the key of its plan
    table_attr: str  # where that module keeps its tables
    id_space: int
    loss: Callable[[Any, Batch, int, int], torch.Tensor]
    outputs: Callable[[Any], dict[str, torch.Tensor]]


KINDS = {
    "pooled": Kind(
        PooledModel, POOLED_TABLES, "ebc", "embedding_bags", 1000, _pooled_loss, _pooled_outputs
    ),
    "sequence": Kind(
        SequenceModel, SEQUENCE_TABLES, "ec", "embeddings", 1, _sequence_loss, _sequence_outputs
    ),
}


@dataclass(frozen=True)
class Case:
    """One sharded-vs-unsharded comparison: model kind, table -> sharding, sparse optimizer."""

    name: str
    kind: str
    sharding: tuple[tuple[str, str], ...]
    optimizer: str


def _uniform(kind: str, sharding: str, optimizer: str) -> Case:
    pairs = tuple((t.name, sharding) for t in KINDS[kind].tables)
    return Case(f"{kind}-{sharding}-{optimizer}", kind, pairs, optimizer)


CASES = [
    *(
        _uniform("pooled", s, "rowwise_adagrad")
        for s in ("table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")
    ),
    *(_uniform("pooled", s, "sgd") for s in ("table_wise", "column_wise", "data_parallel")),
    _uniform("pooled", "auto", "rowwise_adagrad"),
    Case(
        "pooled-mixed-sgd",
        "pooled",
        (
            ("t_user", "row_wise"),
            ("t_item", "column_wise"),
            ("t_cat", "table_row_wise"),
            ("t_geo", "data_parallel"),  # mean-pooled: row-sharded only with all others
        ),
        "sgd",
    ),
    *(
        _uniform("sequence", s, "rowwise_adagrad")
        for s in ("table_wise", "row_wise", "column_wise")
    ),
    _uniform("sequence", "row_wise", "sgd"),
    *(_uniform("pooled", s, "adagrad") for s in ("table_wise", "row_wise", "column_wise")),
    _uniform("sequence", "table_wise", "adagrad"),
]


# ------------------------------------------------------------------------------ checks


class Mismatches(list[str]):
    """Collected differences; empty means the case passed."""

    def close(self, label: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
        if actual.shape != expected.shape:
            self.append(f"{label}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
        elif not torch.allclose(actual.float(), expected.float(), rtol=0.0, atol=ATOL):
            diff = (actual.float() - expected.float()).abs().max().item()
            self.append(f"{label}: max abs diff {diff:.3g}")


def _table_plans(model: DistributedModelParallel, kind: Kind) -> dict[str, ParameterSharding]:
    return dict(model.plan.plan[kind.table_module].items())  # type: ignore[union-attr]


def _shard_ranks(sharding: ParameterSharding) -> list[int]:
    shards = sharding.sharding_spec.shards if sharding.sharding_spec else []  # type: ignore[union-attr]
    return sorted(s.placement.rank() for s in shards)  # type: ignore[union-attr]


def _check_plan(plans: dict[str, ParameterSharding], case: Case, errors: Mismatches) -> None:
    """The plan uses the requested type per table, and every split really spans both ranks."""
    for table, requested in case.sharding:
        planned = plans[table].sharding_type
        ranks = _shard_ranks(plans[table])
        if requested not in ("auto", planned):
            errors.append(f"{table}: planned {planned}, requested {requested}")
        if planned == "table_wise" and len(ranks) != 1:
            errors.append(f"{table}: table-wise on ranks {ranks}")
        if planned in SPLIT_TYPES and ranks != list(range(WORLD_SIZE)):
            errors.append(f"{table}: {planned} shards on ranks {ranks}")


def _check_parameter_split(
    model: DistributedModelParallel, reference: nn.Module, kind: Kind, errors: Mismatches
) -> None:
    """The dense optimizer gets the non-table parameters, the replicated part the DP tables."""
    tables = f"{kind.table_module}."
    expected_dense = {n for n, _ in reference.named_parameters() if not n.startswith(tables)}
    if set(dense_parameters(model)) != expected_dense:
        errors.append(f"dense parameters {sorted(dense_parameters(model))}")
    expected_replicated = {
        f"{tables}{kind.table_attr}.{table}.weight"
        for table, sharding in _table_plans(model, kind).items()
        if sharding.sharding_type == "data_parallel"
    }
    if set(replicated_table_parameters(model)) != expected_replicated:
        errors.append(f"replicated tables {sorted(replicated_table_parameters(model))}")


# ------------------------------------------------------------------------------ state


def _load_full_state(model: DistributedModelParallel, full: dict[str, torch.Tensor]) -> None:
    """Copy unsharded weights into the local shards, so both models start identical."""
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if isinstance(value, ShardedTensor):
                for shard in value.local_shards():
                    (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    shard.tensor.copy_(full[key][r0 : r0 + nr, c0 : c0 + nc])
            else:
                value.copy_(full[key])


def _gather_full_state(model: DistributedModelParallel, rank: int) -> dict[str, torch.Tensor]:
    """Full tensors on rank 0 (ShardedTensor.gather); other ranks get only replicated ones."""
    full: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if isinstance(value, ShardedTensor):
            out = torch.empty(value.size()) if rank == 0 else None
            value.gather(dst=0, out=out)
            if out is not None:
                full[key] = out
        else:
            full[key] = value.detach().clone()
    return full


# ------------------------------------------------------------------------------ reference


class ReferenceTrainer:
    """The unsharded model trained on the global batch with plain torch optimizers.

    Optimizer state lives per column shard in torchrec (it matters for row-wise Adagrad
    only), so each table's sparse optimizer runs on each of its column blocks separately.
    """

    def __init__(self, case: Case, plans: dict[str, ParameterSharding]) -> None:
        self.kind = KINDS[case.kind]
        torch.manual_seed(SEED)
        self.model = self.kind.build()
        optimizer_class, kwargs = sparse_optimizer_spec(case.optimizer, SPARSE_LR)
        self.blocks: list[tuple[nn.Parameter, slice, nn.Parameter]] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        for name, param in self.model.named_parameters():
            if not name.startswith(f"{self.kind.table_module}."):
                self.optimizers.append(torch.optim.SGD([param], lr=DENSE_LR))
                continue
            for columns in _column_blocks(plans[name.split(".")[-2]]):
                block = nn.Parameter(param.detach()[:, columns].clone())
                self.blocks.append((param, columns, block))
                self.optimizers.append(optimizer_class([block], **kwargs))

    def step(self, batch: Batch) -> None:
        output = self.model(batch.kjt(0, GLOBAL_BATCH))
        self.model.zero_grad()
        (self.kind.loss(output, batch, 0, GLOBAL_BATCH) / WORLD_SIZE).backward()
        with torch.no_grad():
            for param, columns, block in self.blocks:
                block.copy_(param[:, columns])
                block.grad = param.grad[:, columns].clone()  # type: ignore[index]
            for optimizer in self.optimizers:
                optimizer.step()
            for param, columns, block in self.blocks:
                param[:, columns] = block


def _column_blocks(sharding: ParameterSharding) -> list[slice]:
    """A table's column ranges as sharded: one per column shard, else the full width."""
    shards = sharding.sharding_spec.shards if sharding.sharding_spec else []  # type: ignore[union-attr]
    spans = sorted({(s.shard_offsets[1], s.shard_sizes[1]) for s in shards})
    return [slice(c0, c0 + n) for c0, n in spans] or [slice(None)]


# ------------------------------------------------------------------------------ one case


def _run_case(case: Case, rank: int) -> list[str]:
    kind = KINDS[case.kind]
    errors = Mismatches()
    torch.manual_seed(SEED + 3)  # unlike the reference: only _load_full_state equalises them
    model = shard_model(
        kind.build(),
        dict(case.sharding),
        case.optimizer,
        SPARSE_LR,
        dist.group.WORLD,
        torch.device("cpu"),
    )
    plans = _table_plans(model, kind)
    reference = ReferenceTrainer(case, plans)
    _check_plan(plans, case, errors)
    _check_parameter_split(model, reference.model, kind, errors)
    drawn = {t.name for t in kind.tables if isinstance(t.init_fn, RowInit)}
    initial = _gather_full_state(model, rank)
    for key, value in reference.model.state_dict().items():
        drawn_here = key.split(".")[-2] in drawn and key in initial
        if drawn_here and not torch.equal(initial[key], value):
            errors.append(f"initial {key}: not the unsharded table's rows")
    _load_full_state(model, reference.model.state_dict())
    optimizer = combined_optimizer(
        model, case.optimizer, SPARSE_LR, lambda ps: torch.optim.SGD(ps, lr=DENSE_LR)
    )

    batch = _make_batch(kind.tables, kind.id_space)
    lo, hi = rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH
    for step in range(STEPS):
        output = model(batch.kjt(lo, hi))
        with torch.no_grad():
            expected = kind.outputs(reference.model(batch.kjt(lo, hi)))
        for key, tensor in kind.outputs(output).items():
            errors.close(f"step {step} forward {key}", tensor.detach(), expected[key])
        optimizer.zero_grad()
        kind.loss(output, batch, lo, hi).backward()
        optimizer.step()
        reference.step(batch)

    trained = _gather_full_state(model, rank)
    for key, value in reference.model.state_dict().items():
        if key in trained:
            errors.close(f"after {STEPS} steps {key}", trained[key], value)
        elif rank == 0:
            errors.append(f"{key}: missing from the sharded state_dict")
    return [f"rank {rank}: {e}" for e in errors]


def _worker(rank: int, port: int, out_path: str) -> None:
    """One rank: run every case, then rank 0 writes all ranks' mismatches as JSON."""
    initializers.BLOCK_ROWS = 16  # so that shards and init blocks cut tables differently
    with gloo_group(rank, WORLD_SIZE, port):
        results: dict[str, list[str]] = {}
        for case in CASES:
            try:
                results[case.name] = _run_case(case, rank)
            except Exception as exc:  # reported per case; the other cases still run
                results[case.name] = [f"rank {rank}: {type(exc).__name__}: {exc}"]
        gathered: list[dict[str, list[str]] | None] = [None] * WORLD_SIZE
        dist.all_gather_object(gathered, results)
        if rank == 0:
            merged = {c.name: [e for r in gathered if r for e in r[c.name]] for c in CASES}
            Path(out_path).write_text(json.dumps(merged))


@pytest.fixture(scope="module")
def mismatches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    out = tmp_path_factory.mktemp("sharding") / "mismatches.json"
    spawn_ranks(_worker, WORLD_SIZE, str(out))
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_sharded_matches_unsharded(mismatches: dict[str, list[str]], case: Case) -> None:
    assert mismatches[case.name] == []


# ------------------------------------------------------------------------------ no processes


def test_cpu_sharders_offer_row_wise_and_drop_broken_types() -> None:
    ebc_sharder, ec_sharder = make_sharders()
    assert {"row_wise", "table_row_wise", "data_parallel"} <= set(ebc_sharder.sharding_types("cpu"))
    assert "row_wise" in ec_sharder.sharding_types("cpu")
    assert "data_parallel" not in ec_sharder.sharding_types("cpu")
    assert "data_parallel" in ec_sharder.sharding_types("cuda")


def test_constraints_pin_types_and_split_columns() -> None:
    model = nn.ModuleDict({"ebc": EmbeddingBagCollection(tables=POOLED_TABLES, device="meta")})
    sharding = {"t_user": "column_wise", "t_item": "auto", "t_cat": "row_wise"}
    constraints = sharding_constraints(model, sharding, WORLD_SIZE, "cpu")
    assert set(constraints) == {"t_user", "t_cat"}
    assert constraints["t_user"].sharding_types == ["column_wise"]
    assert constraints["t_user"].min_partition == 8
    assert constraints["t_cat"].sharding_types == ["row_wise"]


@pytest.mark.parametrize(
    ("sharding", "message"),
    [
        ({"nope": "row_wise"}, "not in the model"),
        ({"s_item": "diagonal"}, "'diagonal' is not available"),
        ({"s_item": "table_row_wise"}, "'table_row_wise' is not available on cpu"),
        ({"s_item": "data_parallel"}, "'data_parallel' is not available on cpu"),
    ],
)
def test_constraints_reject(sharding: dict[str, str], message: str) -> None:
    model = nn.ModuleDict({"ec": EmbeddingCollection(tables=SEQUENCE_TABLES, device="meta")})
    with pytest.raises(ValueError, match=message):
        sharding_constraints(model, sharding, WORLD_SIZE, "cpu")


def _plan(types: dict[str, str]) -> ShardingPlan:
    tables = {
        t: ParameterSharding(sharding_type=s, compute_kernel="fused") for t, s in types.items()
    }
    return ShardingPlan({"ebc": EmbeddingModuleShardingPlan(tables)})


@pytest.mark.parametrize(
    ("types", "accepted"),
    [
        ({"t_user": "table_wise", "t_geo": "row_wise"}, False),
        ({"t_user": "data_parallel", "t_geo": "table_row_wise"}, False),
        ({"t_user": "row_wise", "t_geo": "table_row_wise"}, True),
        ({"t_user": "row_wise", "t_geo": "column_wise"}, True),
    ],
)
def test_check_plan_mean_pooling(types: dict[str, str], accepted: bool) -> None:
    """t_geo is mean-pooled: row-sharding it breaks the EBC's differently sharded tables."""
    tables = [t for t in POOLED_TABLES if t.name in types]
    model = nn.ModuleDict({"ebc": EmbeddingBagCollection(tables=tables, device="meta")})
    if accepted:
        check_plan(model, _plan(types))
    else:
        with pytest.raises(ValueError, match=r"mean-pooled tables \['t_geo'\] are row-sharded"):
            check_plan(model, _plan(types))


def test_sparse_optimizer_rejects_unknown_and_cpu_adam() -> None:
    with pytest.raises(ValueError, match="unknown sparse optimizer"):
        sparse_optimizer_spec("lamb", 0.1)
    model = EmbeddingBagCollection(tables=POOLED_TABLES, device="meta")
    with pytest.raises(ValueError, match="no fused fbgemm kernel on CPU"):
        apply_sparse_optimizer(model, "adam", 0.1, torch.device("cpu"))


@pytest.mark.xfail(strict=True, reason="fbgemm CPU dense TBE ignores PoolingMode.NONE")
def test_fbgemm_cpu_dense_sequence_lookup() -> None:
    """Why data-parallel sequence tables are off on CPU; passing means they can come back."""
    tbe = DenseTableBatchedEmbeddingBagsCodegen(
        [(10, 4)], pooling_mode=PoolingMode.NONE, use_cpu=True
    )
    indices, offsets = torch.tensor([1, 2, 3]), torch.tensor([0, 2, 3])
    assert tbe(indices, offsets).shape == (3, 4)  # one row per ID; CPU returns (2, 4)


@pytest.mark.xfail(strict=True, reason="fbgemm's CPU row-wise Adagrad ignores weight_decay")
@pytest.mark.parametrize("mode", ["L2", "DECOUPLE"])
def test_fbgemm_cpu_rowwise_adagrad_weight_decay(mode: str) -> None:
    """Why embedding L2 is a loss term: the fused kernel's decay does nothing on CPU.
    Passing means `wd * w` reaches the looked-up rows there and the kernel could do it."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )
    from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode

    lr, decay = 0.1, 0.5
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(10, 8, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=lr,
        eps=1e-8,
        weight_decay=decay,
        weight_decay_mode=WeightDecayMode[mode],
    )
    torch.manual_seed(0)
    start = torch.randn(10, 8) * 0.1
    tbe.weights_host.data.copy_(start.flatten())
    out = tbe(torch.tensor([1, 2, 2, 5]), torch.tensor([0, 1, 3, 4]))
    upstream = torch.randn_like(out)
    out.backward(upstream)
    grad = torch.zeros(10, 8).index_add_(0, torch.tensor([1, 2, 2, 5]), upstream[[0, 1, 1, 2]])
    step = lr * grad / (grad.pow(2).mean(dim=1, keepdim=True).sqrt() + 1e-8)
    undecayed = start - step
    assert not torch.allclose(tbe.weights_host.view(10, 8), undecayed, atol=1e-6)
